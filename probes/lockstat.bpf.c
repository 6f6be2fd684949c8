// SPDX-License-Identifier: Apache-2.0
/*
 * Kernel lock contention: every wait the kernel announces with the lock:contention_begin /
 * lock:contention_end tracepoints (kernel >= 5.19, include/trace/events/lock.h), measured in the
 * kernel and aggregated three ways, nothing sent to user space per event:
 *
 *   lock_contention_wait_seconds  per-CPU array, one histogram row per lock type (LT_*)
 *   lock_callers                  rows keyed by (lock type, return address of the caller): count, ns
 *   workload_lock_wait_seconds    per-workload rows: ns waited per lock type
 *
 * Where the start timestamp lives (no hash-map insert or delete per event):
 *   - a waiter that spins (LCB_F_SPIN without LCB_F_MUTEX: spinlocks, rwlocks) runs with
 *     preemption disabled on one CPU until contention_end, but an interrupt, softirq or NMI on that
 *     CPU can contend on another lock meanwhile (qspinlock keeps 4 MCS nodes per CPU for exactly
 *     these contexts, kernel/locking/qspinlock.c): a per-CPU stack of SPIN_DEPTH frames;
 *   - a sleeping lock's waiter (mutex, rwsem, rtmutex, percpu-rwsem, semaphore) can be preempted
 *     and woken on another CPU: a task-local storage slot (bpf_task_storage_get, >= 5.11, always
 *     present where these tracepoints are). A mutex announces its optimistic spin
 *     (LCB_F_MUTEX|LCB_F_SPIN) and then, without an end in between, its sleep (LCB_F_MUTEX)
 *     (kernel/locking/mutex.c __mutex_lock_common): the wait runs from the first begin.
 *
 * The caller is the first kernel frame outside the locking code, as perf lock contention reports
 * it: frames are read with bpf_get_stack() at begin (while the task waits anyway, not while it
 * holds the lock), and the first one outside [LOCK_TEXT_START, LOCK_TEXT_END) after at least one
 * inside is taken. That range spans .sched.text (mutex, rwsem and semaphore slow paths, schedule)
 * and .spinlock.text (_raw_spin_lock*, queued_spin_lock_slowpath), adjacent in vmlinux
 * (include/asm-generic/vmlinux.lds.h SCHED_TEXT, LOCK_TEXT); user space passes the bounds from
 * /proc/kallsyms. contention_end does only array and task-storage lookups and additions: it runs
 * with the lock held.
 */

#define LCB_F_SPIN (1U << 0)
#define LCB_F_READ (1U << 1)
#define LCB_F_WRITE (1U << 2)
#define LCB_F_RT (1U << 3)
#define LCB_F_PERCPU (1U << 4)
#define LCB_F_MUTEX (1U << 5)

#define STALE_NS 1000000000ULL /* a spin frame older than this lost its end (never a real wait) */
#define NO_ROW 0xffffffffU

/* The lock type of a contention, from its tracepoint flags (the mapping: probes/lockstat.py). */
static __always_inline u32 lock_type(u32 flags)
{
    switch (flags) {
    case LCB_F_SPIN:
        return LT_SPINLOCK;
    case LCB_F_SPIN | LCB_F_READ:
        return LT_RWLOCK_READ;
    case LCB_F_SPIN | LCB_F_WRITE:
        return LT_RWLOCK_WRITE;
    case LCB_F_MUTEX:
    case LCB_F_MUTEX | LCB_F_SPIN:
        return LT_MUTEX;
    case LCB_F_READ:
        return LT_RWSEM_READ;
    case LCB_F_WRITE:
        return LT_RWSEM_WRITE;
    case LCB_F_RT:
    case LCB_F_RT | LCB_F_READ:
    case LCB_F_RT | LCB_F_WRITE:
        return LT_RTMUTEX;
    case LCB_F_PERCPU | LCB_F_READ:
    case LCB_F_PERCPU | LCB_F_WRITE:
        return LT_PERCPU_RWSEM;
    case 0:
        return LT_SEMAPHORE;
    }
    return LT_OTHER;
}

struct wait {
    u64 lock;  /* lock address; 0 = slot empty */
    u64 ts;    /* ns at contention_begin */
    u64 wid;   /* workload of the waiting task */
    u32 wrow;  /* its workload row, or NO_ROW */
    u32 crow;  /* caller row, or NO_ROW */
    u32 type;    /* LT_* */
    u32 sampled; /* its stack was walked (see walk_budget) */
};

struct spin_stack {
    struct wait f[SPIN_DEPTH];
    u32 depth;
    u32 pad;
};

struct frames {
    u64 ip[MAX_FRAMES];
};

struct hist_row {
    u64 w[NSLOTS + 1];
};

struct pair {
    u64 count;
    u64 ns;
};

BPF_PERCPU_ARRAY(lockstat_spin, struct spin_stack, 1);
BPF_PERCPU_ARRAY(lockstat_frames, struct frames, 1);

/*
 * Stack walks are the probe's one expensive step (bpf_get_stack ~2.5 us here: the unwinder walks
 * the BPF and tracing frames too). Each CPU walks at most WALKS_PER_WINDOW stacks per 10 ms
 * window. A contention beyond that is still counted exactly by type and workload; for callers its
 * count and wait wait in this CPU's pool of its lock type until the next sampled contention of
 * that type ends on this CPU, which takes them to its caller. Totals per type are conserved, the
 * split between callers follows the samples, and below the budget every caller count is exact.
 */
#define WINDOW_NS 10000000ULL
struct walk_budget {
    u64 window; /* ts / WINDOW_NS of the current window */
    u64 walks;  /* stacks walked in it */
    u64 count[NTYPES]; /* per lock type: unsampled contentions not yet given to a caller */
    u64 ns[NTYPES];    /* and their wait */
};
BPF_PERCPU_ARRAY(lockstat_budget, struct walk_budget, 1);
BPF_TASK_STORAGE(lockstat_task, struct wait);
BPF_PERCPU_ARRAY(lock_contention_wait_seconds, struct hist_row, NTYPES);
BPF_PERCPU_ARRAY(lock_caller_unknown, struct pair, NTYPES); /* no caller found, or no caller row */

/* Row of the caller of the lock function that announced this contention, or NO_ROW. */
static __always_inline u32 caller_row(void *ctx, u32 type)
{
    u32 zero = 0;
    struct frames *fr = lockstat_frames.lookup(&zero);
    if (!fr)
        return NO_ROW;
    long n = bpf_get_stack(ctx, fr->ip, sizeof(fr->ip), 0);
    if (n <= 0)
        return NO_ROW;
    u32 nf = (u32)n / 8;
    int inside = 0;
    for (u32 i = 0; i < MAX_FRAMES; i++) {
        if (i >= nf)
            break;
        u32 j = i;
        asm volatile("" : "+r"(j)); /* keep the bound check next to the access (see hist_add) */
        if (j >= MAX_FRAMES)
            break;
        u64 ip = fr->ip[j];
        if (ip >= LOCK_TEXT_START && ip < LOCK_TEXT_END) {
            inside = 1;
            continue;
        }
        if (!inside)
            continue; /* the tracing frames above the lock function */
        /* Kernel text addresses keep their low 48 bits distinct; the type goes in the top byte. */
        int row = lock_callers_row_of((ip & 0xffffffffffffULL) | ((u64)type << 56));
        return row < 0 ? NO_ROW : (u32)row;
    }
    return NO_ROW;
}

static __always_inline void start_wait(void *ctx, struct wait *w, u64 lock, u64 ts, u32 type)
{
    w->ts = ts;
    w->type = type;
    w->wid = workload_id();
    int row = workload_lock_wait_seconds_row_cached(w->wid);
    w->wrow = row < 0 ? NO_ROW : (u32)row;
    w->crow = NO_ROW;
    w->sampled = 0;
    u32 zero = 0;
    struct walk_budget *b = lockstat_budget.lookup(&zero);
    if (b) {
        u64 window = ts / WINDOW_NS;
        if (b->window != window) {
            b->window = window;
            b->walks = 0;
        }
        if (b->walks < WALKS_PER_WINDOW) {
            b->walks++;
            w->sampled = 1;
            w->crow = caller_row(ctx, type);
        }
    }
    w->lock = lock; /* last: the slot is complete */
}

static __always_inline void finish_wait(struct wait *w, u64 now)
{
    u64 ns = now > w->ts ? now - w->ts : 0;
    u32 type = w->type;
    struct hist_row *h = lock_contention_wait_seconds.lookup(&type);
    if (h)
        hist_add(h->w, ns);
    u32 zero = 0;
    struct walk_budget *b = lockstat_budget.lookup(&zero);
    u32 t = type;
    asm volatile("" : "+r"(t)); /* keep the bound check next to the access (see hist_add) */
    if (b && t < NTYPES) {
        if (!w->sampled) {
            b->count[t]++;
            b->ns[t] += ns;
        } else {
            u64 n = 1 + b->count[t];
            u64 total = ns + b->ns[t];
            b->count[t] = 0;
            b->ns[t] = 0;
            u64 *c = w->crow != NO_ROW ? lock_callers_at(w->crow) : 0;
            if (c) {
                c[0] += n;
                c[1] += total;
            } else {
                struct pair *u = lock_caller_unknown.lookup(&type);
                if (u) {
                    u->count += n;
                    u->ns += total;
                }
            }
        }
    }
    if (w->wrow != NO_ROW && workload_lock_wait_seconds_owned(w->wrow, w->wid)) {
        u64 *r = workload_lock_wait_seconds_at(w->wrow);
        if (r && type < NTYPES)
            r[type] += ns;
    }
    w->lock = 0;
}

RAW_TRACEPOINT_PROBE(contention_begin)
{
    /* TP_PROTO(void *lock, unsigned int flags) */
    u64 ts = bpf_ktime_get_ns();
    u64 lock = ctx->args[0];
    u32 flags = (u32)ctx->args[1];
    u32 type = lock_type(flags);
    if ((flags & (LCB_F_SPIN | LCB_F_MUTEX)) == LCB_F_SPIN) {
        u32 zero = 0;
        struct spin_stack *s = lockstat_spin.lookup(&zero);
        if (!s)
            return 0;
        u32 d = s->depth;
        if (d > SPIN_DEPTH)
            d = 0;
        /* Frames are pushed in time order: a stale top (its end skipped by the kernel's recursion
         * guard for BPF programs) means every frame is stale. No spin wait lasts STALE_NS. */
        u32 top = d - 1;
        asm volatile("" : "+r"(top));
        if (d && top < SPIN_DEPTH && ts - s->f[top].ts >= STALE_NS) {
            count_stat(STAT_END_MISSED);
            d = 0;
        }
        if (d >= SPIN_DEPTH) {
            s->depth = d;
            count_stat(STAT_SPIN_NESTING);
            return 0;
        }
        s->depth = d + 1;
        asm volatile("" : "+r"(d)); /* keep the bound check next to the access (see hist_add) */
        if (d < SPIN_DEPTH)
            start_wait(ctx, &s->f[d], lock, ts, type);
        return 0;
    }
    struct wait *w = lockstat_task.task_storage_get((void *)bpf_get_current_task_btf(), 0,
                                                    BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (!w) {
        count_stat(STAT_NO_TASK_SLOT);
        return 0;
    }
    if (w->lock == lock)
        return 0; /* the same wait going on: a mutex's sleep after its optimistic spin */
    if (w->lock)
        count_stat(STAT_END_MISSED);
    start_wait(ctx, w, lock, ts, type);
    return 0;
}

RAW_TRACEPOINT_PROBE(contention_end)
{
    /* TP_PROTO(void *lock, int ret): ret != 0 for an interrupted or timed-out wait, still a wait. */
    u64 now = bpf_ktime_get_ns();
    u64 lock = ctx->args[0];
    u32 zero = 0;
    struct spin_stack *s = lockstat_spin.lookup(&zero);
    if (s) {
        u32 d = s->depth;
        if (d > SPIN_DEPTH)
            d = SPIN_DEPTH;
        /* Nearly always the top frame; deeper only if an end was missed above it. */
        for (u32 i = 1; i <= SPIN_DEPTH; i++) {
            if (i > d)
                break;
            u32 at = d - i;
            asm volatile("" : "+r"(at));
            if (at >= SPIN_DEPTH)
                break;
            struct wait *f = &s->f[at];
            if (f->lock == lock) {
                s->depth = d - i;
                if (i > 1)
                    count_stat(STAT_END_MISSED);
                finish_wait(f, now);
                return 0;
            }
        }
    }
    struct wait *w = lockstat_task.task_storage_get((void *)bpf_get_current_task_btf(), 0, 0);
    if (w && w->lock == lock)
        finish_wait(w, now);
    return 0;
}
