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
 *     these contexts, kernel/locking/qspinlock.c): a per-CPU stack of SPIN_DEPTH frames, each
 *     with the stretch of the CPU it began in (cpu_epoch), so that frames whose end the kernel's
 *     recursion guard skipped are dropped, not matched seconds later (contention_end);
 *   - a sleeping lock's waiter (mutex, rwsem, rtmutex, percpu-rwsem, semaphore) can be preempted
 *     and woken on another CPU: a slot of its own in a shared array (struct sleeper). A mutex
 *     announces its optimistic spin (LCB_F_MUTEX|LCB_F_SPIN) and then, without an end in
 *     between, its sleep (LCB_F_MUTEX); woken first in line, it spins and sleeps again the same
 *     way (kernel/locking/mutex.c __mutex_lock_common): the wait runs from the first begin. The
 *     spin can end in schedule() and move the task to another CPU (mutex_optimistic_spin), so
 *     the mutex's spin is kept in its slot too, not in the per-CPU stack.
 *
 * The caller is the first kernel frame outside the locking code, as perf lock contention reports
 * it: frames are read with bpf_get_stack() at begin (while the task waits anyway, not while it
 * holds the lock), and the first one outside [LOCK_TEXT_START, LOCK_TEXT_END) after at least one
 * inside is taken. That range spans .sched.text (mutex, rwsem and semaphore slow paths, schedule)
 * and .spinlock.text (_raw_spin_lock*, queued_spin_lock_slowpath), adjacent in vmlinux
 * (include/asm-generic/vmlinux.lds.h SCHED_TEXT, LOCK_TEXT); user space passes the bounds from
 * /proc/kallsyms. contention_end does only array lookups and additions: it runs with the lock
 * held.
 *
 * Spinning waits are timed within a budget per CPU (see struct budget): below it every wait is
 * timed, above it 1 in 2^k is, and counts for 2^k. Waits that sleep or last across a tick are
 * always timed, and contentions are always counted exactly.
 */

#define LCB_F_SPIN (1U << 0)
#define LCB_F_READ (1U << 1)
#define LCB_F_WRITE (1U << 2)
#define LCB_F_RT (1U << 3)
#define LCB_F_PERCPU (1U << 4)
#define LCB_F_MUTEX (1U << 5)

/* A spin frame older than this many ticks (1 s at HZ=1000, 10 s at HZ=100) lost its end: no spin
 * wait lasts that long (the soft-lockup watchdog fires at 20 s). Ticks, because an untimed frame
 * has no clock reading. */
#define STALE_TICKS 1000
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
    u64 ts;    /* ns at contention_begin, if timed */
    u64 tick;  /* jiffies at contention_begin */
    u32 crow;  /* caller row, or NO_ROW */
    u32 type;    /* LT_* */
    u32 sampled; /* its stack was walked (see struct budget) */
    u32 weight;  /* timed: the contentions it stands for (2^shift); 0: not timed */
    u64 spun;    /* ns of wait it adds for the spins of mutex sleepers not drawn (goes_to_sleep) */
};

/* A spinning wait, and the stretch of this CPU it began in (see cpu_epoch). */
struct spin_frame {
    struct wait w;
    u64 task;
    u64 switches;
};

struct spin_stack {
    struct spin_frame f[SPIN_DEPTH];
    u32 depth;
    u32 pad;
};

/*
 * The stretch of this CPU a spinning wait lives in: the current task (an interrupt runs on the
 * task it interrupts) and how many times that task has been switched out (nvcsw + nivcsw, counted
 * by __schedule() for the task it switches from). Neither changes between a spinning waiter's
 * begin and end: it runs with preemption off, and an interrupt returns to where it came from. A
 * frame from another stretch was left by a context that is gone, without its end.
 */
static __always_inline void cpu_epoch(u64 *task, u64 *switches)
{
#ifdef TASK_BTF
    void *t = (void *)bpf_get_current_task_btf();
    *task = (u64)t;
    *switches = *(u64 *)(t + TASK_NVCSW_OFF) + *(u64 *)(t + TASK_NIVCSW_OFF);
#else
    void *t = (void *)bpf_get_current_task();
    u64 nv = 0, niv = 0;
    bpf_probe_read_kernel(&nv, sizeof(nv), t + TASK_NVCSW_OFF);
    bpf_probe_read_kernel(&niv, sizeof(niv), t + TASK_NIVCSW_OFF);
    *task = (u64)t;
    *switches = nv + niv;
#endif
}

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
 * The probe's two expensive steps are budgeted per CPU and per 10 ms window.
 *
 * Stack walks (bpf_get_stack ~2.5 us here: the unwinder walks the BPF and tracing frames too):
 * about WALKS_PER_WINDOW. Each contention is walked with the same probability, 2^-wshift, drawn
 * at random: wshift is the smallest that would have kept the previous window's contentions to
 * WALKS_PER_WINDOW walks, and stays so through the window (raising it mid-window, as the timing
 * shift below does, made the callers early in a busier window count more; so did a cap reached
 * after a quiet window, hence the average), and a window walks 8 x WALKS_PER_WINDOW at most
 * whatever happens (a burst after quiet windows: only then are its first ones favoured). (Walking the first WALKS_PER_WINDOW of each window instead gave the
 * callers that run just after a window starts far more than their share.) A contention not walked is still counted exactly by type and
 * workload; for callers its count and wait wait in this CPU's pool of its lock type until the
 * next contention of that type is walked on this CPU, which takes them to its caller. Totals
 * per type are conserved, the split between callers follows random samples, and below the
 * budget (wshift 0) every caller count is exact.
 *
 * Clock reads (bpf_ktime_get_ns ~48 ns inside a BPF program here: a retpolined clocksource call
 * and an ordered rdtsc), two per timed wait, the second with the lock held, so that every other
 * waiter waits for it too: at 1 to 3 million contentions per second on 2 CPUs they cost a lock
 * storm 17 to 20 % of its throughput (README, Overhead). Each CPU times 1 in 2^shift spinning
 * waits: shift is the smallest that would have kept the previous window's to TIMED_PER_WINDOW
 * timed ones, and it rises by one each time the window outgrows it (each rise times about half
 * the budget more, so a burst after a quiet window times a few budgets, a steady rate about
 * one). A timed wait counts 2^shift times in the histogram and the wait totals: below the budget
 * (shift 0) every wait is timed and every number exact; above it the counts stay exact and the
 * waits are estimates from a random sample. Waits that sleep are timed regardless (a context
 * switch dwarfs the clock reads). TIMED_PER_WINDOW 0: no budget.
 *
 * Waits that last across a tick are all timed too, whatever the sample said: at contention_end
 * the jiffies (a plain load) tell whether one passed, and only then is the clock read. These are
 * the long waits (every wait of a tick or more, and a wait of d < 1 tick with probability
 * d/tick), few (about HZ per second per CPU at most, times the share of time spent waiting), and
 * the ones whose sampling made the wait totals swing: a few spins of 4 to 8 ms across a
 * preempted vCPU held a fifth of the wait, and timed at 1 in 32 they were counted 0 or 32 times
 * (README, Timing budget). An untimed wait has no begin time of its own: it takes the CPU's last
 * clock reading before its begin (struct budget's clock), at most a tick old (the window check
 * reads the clock at the first contention of every tick), and over the budget refreshed by the
 * timed waits. Its wait is overestimated by that age: 130 to 170 us on average on the pipe
 * workload, a few per cent of the wait totals (README, Timing budget; bench/lockstat_accuracy.py
 * compares them with the truth on the same waits).
 * Otherwise the estimate stays stratified and unbiased: a wait that crosses a tick counts once,
 * timed; one that does not counts 2^shift times if sampled, else not at all.
 *
 * The window is followed without a clock read per event: bpf_jiffies64() (a plain load, ~2.5 ns)
 * says when a tick passed, and only then is the clock read. (bpf_ktime_get_coarse_ns() would do
 * it in one step, but tracing programs may not call it: it is not NMI-safe; the kernel's
 * selftests check the refusal, verifier_helper_restricted.c.)
 */
#define WINDOW_NS 10000000ULL
#define MAX_SHIFT 24 /* 1 in 16 million: beyond any contention rate */
struct budget {
    u64 tick;   /* jiffies when the window was last checked */
    u64 window; /* ns / WINDOW_NS of the current window */
    u64 walks;  /* stacks walked in it */
    u64 wseen;  /* contentions in it that could be walked */
    u64 wshift; /* it walks 1 in 2^wshift of them */
    u64 wavg;   /* 8 x the average of wseen over the last windows (see next_window) */
    u64 seen;   /* contentions begun in it */
    u64 shift;  /* it times 1 in 2^shift contentions */
    u64 rng;    /* xorshift64 state (next_random) */
    u64 untimed; /* contentions not timed, over the probe's life (read by user space) */
    u64 clock;   /* the last clock reading on this CPU: no later than any wait begun after it */
    u64 count[NTYPES]; /* per lock type: unsampled contentions not yet given to a caller */
    u64 ns[NTYPES];    /* and their wait */
};
BPF_PERCPU_ARRAY(lockstat_budget, struct budget, 1);

/* The clock, kept as this CPU's last reading (struct budget's clock) for the untimed waits. */
static __always_inline u64 read_clock(struct budget *b)
{
    u64 now = bpf_ktime_get_ns();
    if (b)
        b->clock = now;
    return now;
}

/*
 * Sleeping waiters' slots: one array shared by all CPUs, SLEEPER_SLOTS (a power of two) of them.
 * A task's slot is found by hashing its address and probing SLEEPER_PROBES consecutive slots; an
 * empty one (owner 0) is claimed by compare-and-swap, and given back at contention_end. Only
 * tasks waiting at the same instant compete for slots; one that finds all its probes taken is
 * not timed nor counted (lost: sleeper_slots_full).
 *
 * Not task-local storage: bpf_task_storage_get() is a helper call that takes a per-CPU busy
 * counter and searches the task's storage list, twice per contention; on a lock storm at 3
 * million contentions per second it cost 4 % of the throughput (README, Overhead), where an
 * array lookup is a few inlined instructions.
 *
 * A slot whose end never came (the kernel's recursion guard skipped it) stays with its owner,
 * who takes it again at its next contention; if the owner is gone, a waiter whose probes are
 * all taken reclaims it once it is STALE_SLEEPER_TICKS old (past the hung-task timeout, 120 s,
 * at any HZ; a genuine wait that long loses its end and is counted in end_missed).
 */
#define SLEEPER_PROBES 4
#define STALE_SLEEPER_TICKS 120000ULL
struct sleeper {
    u64 owner; /* the waiting task (bpf_get_current_task()); 0 = free */
    struct wait w;
    u64 pad; /* 64 B: a slot per cache line, written by one CPU at a time */
};
BPF_ARRAY(lockstat_sleepers, struct sleeper, SLEEPER_SLOTS);

static __always_inline u32 sleeper_home(u64 owner)
{
    /* Fibonacci hashing: the product's top bits depend on every bit of the task's address. */
    return (u32)((owner * 0x9E3779B97F4A7C15ULL) >> 40);
}

/* This task's slot, or NULL. */
static __always_inline struct sleeper *my_sleeper(u64 me)
{
    u32 home = sleeper_home(me);
    for (u32 k = 0; k < SLEEPER_PROBES; k++) {
        u32 i = (home + k) & (SLEEPER_SLOTS - 1);
        struct sleeper *s = lockstat_sleepers.lookup(&i);
        if (s && s->owner == me)
            return s;
    }
    return 0;
}

/* Claim a free slot for this task (one stale past STALE_SLEEPER_TICKS if none is free), or NULL. */
static __always_inline struct sleeper *claim_sleeper(u64 me, u64 tick)
{
    u32 home = sleeper_home(me);
    for (u32 k = 0; k < SLEEPER_PROBES; k++) {
        u32 i = (home + k) & (SLEEPER_SLOTS - 1);
        struct sleeper *s = lockstat_sleepers.lookup(&i);
        if (s && !s->owner && __sync_val_compare_and_swap(&s->owner, 0, me) == 0)
            return s;
    }
    for (u32 k = 0; k < SLEEPER_PROBES; k++) {
        u32 i = (home + k) & (SLEEPER_SLOTS - 1);
        struct sleeper *s = lockstat_sleepers.lookup(&i);
        if (!s)
            continue;
        u64 owner = s->owner;
        /* w.lock is written last by start_wait and cleared before the slot is given back: a
         * slot just claimed but not yet filled (lock 0) is never taken for stale. */
        if (owner && s->w.lock && tick - s->w.tick >= STALE_SLEEPER_TICKS &&
            __sync_val_compare_and_swap(&s->owner, owner, me) == owner) {
            s->w.lock = 0; /* now being filled: not stale for another waiter */
            count_stat(STAT_END_MISSED);
            return s;
        }
    }
    return 0;
}
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

/* The smallest shift that keeps n >> shift within per_window (rises only by doubling: no division). */
static __always_inline u32 shift_for(u64 n, u64 per_window)
{
    u32 shift = 0;
    for (int i = 0; i < MAX_SHIFT; i++) {
        if ((n >> shift) <= per_window)
            break;
        shift++;
    }
    return shift;
}

/* Add n contentions and their wait to a caller row, or to the type's no-caller pair. The caller
 * passes its unchecked type, not its bounds-checked copy: the lookup takes the key's address,
 * which would send that copy to the stack and lose its bound for the verifier. */
static __always_inline void credit_caller(u32 crow, u32 type, u64 n, u64 ns)
{
    u64 *c = crow != NO_ROW ? lock_callers_at(crow) : 0;
    if (c) {
        c[0] += n;
        c[1] += ns;
    } else {
        struct pair *u = lock_caller_unknown.lookup(&type);
        if (u) {
            u->count += n;
            u->ns += ns;
        }
    }
}

/* A new window: its shifts from the last one's contentions. */
static __always_inline void next_window(struct budget *b, u64 window)
{
#if TIMED_PER_WINDOW
    b->shift = shift_for(b->seen, TIMED_PER_WINDOW);
#else
    b->shift = 0;
#endif
    /* The walk shift follows the larger of the last window and the recent average (wavg: 8 x an
     * exponential average over about 8 windows), so one quiet window does not make the next walk
     * everything up to its cap. */
    b->wavg = b->wavg - (b->wavg >> 3) + b->wseen;
    b->wshift = shift_for(b->wseen > (b->wavg >> 3) ? b->wseen : (b->wavg >> 3), WALKS_PER_WINDOW);
    b->window = window;
    b->walks = 0;
    b->wseen = 0;
    b->seen = 0;
}

/* A uniform 64-bit draw from this CPU's xorshift64 state (Marsaglia 2003), seeded once from the
 * kernel's generator: inline, where bpf_get_prandom_u32() is a helper call on every contention. */
static __always_inline u64 next_random(struct budget *b)
{
    u64 x = b->rng;
    if (!x)
        x = bpf_get_prandom_u32() | 1ULL << 32;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    b->rng = x;
    return x;
}

/*
 * Fill a slot at contention_begin: its lock type, whether it is timed (and from when) and the
 * caller (if walked). A timed wait costs the probe here nothing but the clock read; its workload
 * is looked up at the end, after the clock.
 */
static __always_inline void start_wait(void *ctx, struct wait *w, u64 lock, u64 tick, u32 type,
                                       int budgeted)
{
    u32 weight = 1;
    u64 ts = 0;
    u32 zero = 0;
    int walk = 0;
    struct budget *b = lockstat_budget.lookup(&zero);
    if (!b)
        return; /* never: a one-entry array */
    if (b->tick != tick) { /* a tick passed: maybe a new window */
        b->tick = tick;
        ts = read_clock(b);
        u64 window = ts / WINDOW_NS;
        if (b->window != window)
            next_window(b, window);
    }
    u64 shift = 0;
    if (budgeted) {
        u64 n = b->seen++;
        shift = b->shift;
#if TIMED_PER_WINDOW
        if (n >= (TIMED_PER_WINDOW << shift) && shift < MAX_SHIFT)
            b->shift = ++shift; /* this window outgrew its shift */
#endif
        if (shift > MAX_SHIFT)
            shift = MAX_SHIFT;
        /* Chosen at random, not every 2^shift-th: contentions come in patterns (a mutex's
         * wait_lock spin right after its begin), and a fixed stride would sample one of a pair
         * only, the other never. Each is timed with probability 2^-shift. */
        if (shift)
            weight = (next_random(b) >> 32) & ((1U << shift) - 1) ? 0 : 1U << shift;
    }
    /*
     * The clock is read as soon as the wait is known to be timed, before anything else: what the
     * probe spends on a timed wait and not on an untimed one delays that waiter, and a delayed
     * waiter more often finds the lock free. Read after the probe's work, sub-microsecond waits
     * came out 25 to 40 % shorter when timed than when not (a bias on every estimate).
     */
    if (weight && !ts)
        ts = read_clock(b);
    w->crow = NO_ROW;
    w->sampled = 0;
    /* Stack walks (2.5 us) go to untimed waits while there are any, so as not to delay timed ones:
     * over the timing budget the candidates are the untimed waits, themselves a random draw. */
    if (!weight || !shift) {
        b->wseen++;
        u64 wshift = b->wshift; /* constant through the window: no rise (it favoured early callers) */
        if (wshift > MAX_SHIFT)
            wshift = MAX_SHIFT;
        walk = b->walks < 8 * WALKS_PER_WINDOW &&
               (!wshift || !((next_random(b) >> 32) & ((1U << wshift) - 1)));
    }
    if (walk) {
        b->walks++;
        w->sampled = 1;
        w->crow = caller_row(ctx, type);
        /* The pool goes to this caller now, at the walk: at the wait's end, a long (sleeping)
         * wait took every contention that ended meanwhile, and callers that wait long got more
         * than their share. */
        u64 t = type;
        asm volatile("" : "+r"(t)); /* keep the bound check next to the access (see hist_add) */
        if (t < NTYPES && b->count[t]) {
            credit_caller(w->crow, type, b->count[t], b->ns[t]);
            b->count[t] = 0;
            b->ns[t] = 0;
        }
        if (weight)
            ts = read_clock(b); /* the wait is the lock's, not the walk's */
    }
    w->type = type;
    w->tick = tick;
    w->weight = weight;
    w->spun = 0;
    w->ts = weight ? ts : b->clock; /* untimed: a bound, for a wait that crosses a tick */
    w->lock = lock; /* last: the slot is complete */
}

/* Whether the wait has lasted across a tick, which has it timed whatever the sample said (see
 * struct budget); one the sample had not drawn is counted in tick_timed. */
static __always_inline int crossed_tick(struct wait *w)
{
    if (bpf_jiffies64() == w->tick)
        return 0;
    if (!w->weight)
        count_stat(STAT_TICK_TIMED);
    return 1;
}

/*
 * A mutex waiter that failed its optimistic spin goes to sleep: from here its wait is timed
 * whatever the budget said at its begin (weight 1: every sleeper is timed; a sleep costs two
 * context switches, against which the clock reads are a few per cent). Its spin is accounted as
 * any spinning wait would be:
 * - one that lasted across a tick counts once, timed (from the CPU's last clock reading before
 *   its begin if it was not drawn: see struct budget);
 * - otherwise, not drawn, it is not timed (the sleeper is timed from here), and drawn (weight
 *   2^shift > 1) it stands for its own and for those of the 2^shift - 1 not drawn: they are
 *   added to its wait (spun), not to its duration in the histogram.
 * Few waiters sleep (13 of 1.1 million mutex waits in a run of bench/lock_storm.c), but their
 * spins can last milliseconds: an owner whose vCPU is preempted still looks on CPU, and its
 * waiters keep spinning. Timed from the sleep when not drawn, those were lost: the storm's wait
 * totals read 0.89 to 0.99 of the truth; drawn like shorter spins, they swung the totals up to
 * 1.42 (bench/lockstat_accuracy.py).
 */
static __always_inline void goes_to_sleep(struct wait *w)
{
    if (!crossed_tick(w)) {
        u32 zero = 0;
        struct budget *b = lockstat_budget.lookup(&zero);
        if (!w->weight) {
            w->ts = read_clock(b);
        } else if (w->weight > 1) {
            u64 now = read_clock(b);
            w->spun = (now > w->ts ? now - w->ts : 0) * (w->weight - 1);
        }
    }
    w->weight = 1;
}

/* Account a wait at contention_end: the clock is read only for a timed one, or one that lasted
 * across a tick (see struct budget). */
static __always_inline void finish_wait(struct wait *w)
{
    u64 ns = 0;
    u64 weight = w->weight;
    u32 type = w->type;
    u32 zero = 0;
    struct budget *b = lockstat_budget.lookup(&zero);
    if (crossed_tick(w))
        weight = 1;
    if (weight) {
        u64 now = read_clock(b);
        ns = now > w->ts ? now - w->ts : 0;
        struct hist_row *h = lock_contention_wait_seconds.lookup(&type);
        if (h) {
            hist_add_n(h->w, ns, weight);
            h->w[NSLOTS] += w->spun;
        }
        ns = ns * weight + w->spun; /* from here on: the wait this contention stands for */
    }
    if (b && !weight)
        b->untimed++;
    u64 t = type; /* 64-bit: no zero-extension that would check one register and index with another */
    asm volatile("" : "+r"(t)); /* keep the bound check next to the access (see hist_add) */
    if (b && t < NTYPES) {
        if (!w->sampled) {
            b->count[t]++;
            b->ns[t] += ns;
        } else { /* its pool went to its caller at the walk (start_wait) */
            u64 *c = w->crow != NO_ROW ? lock_callers_at(w->crow) : 0;
            if (c) {
                c[0] += 1;
                c[1] += ns;
            } else {
                struct pair *u = lock_caller_unknown.lookup(&type);
                if (u) {
                    u->count += 1;
                    u->ns += ns;
                }
            }
        }
    }
    if (ns) { /* the waiting task is the current one: charge its workload */
        u64 wid = workload_id();
        int row = workload_lock_wait_seconds_row_cached(wid);
        u64 *r = row < 0 ? 0 : workload_lock_wait_seconds_at((u32)row);
        if (r && type < NTYPES)
            r[type] += ns;
    }
    w->lock = 0;
}

RAW_TRACEPOINT_PROBE(contention_begin)
{
    /* TP_PROTO(void *lock, unsigned int flags) */
    u64 tick = bpf_jiffies64();
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
        u64 task, switches;
        cpu_epoch(&task, &switches);
        /* Frames are pushed in time order: a top from another stretch of this CPU, or a stale
         * one (its end skipped by the kernel's recursion guard for BPF programs, see
         * contention_end), means every frame is left over. */
        u32 top = d - 1;
        asm volatile("" : "+r"(top));
        if (d && top < SPIN_DEPTH &&
            (s->f[top].task != task || s->f[top].switches != switches ||
             tick - s->f[top].w.tick >= STALE_TICKS)) {
            count_stat(STAT_END_MISSED);
            d = 0;
        }
        if (d >= SPIN_DEPTH) {
            s->depth = d;
            count_stat(STAT_SPIN_NESTING);
            return 0;
        }
        asm volatile("" : "+r"(d)); /* keep the bound check next to the access (see hist_add) */
        if (d >= SPIN_DEPTH)
            return 0;
        /*
         * An interrupt or NMI can contend while this program runs. The kernel then skips the
         * nested begin (this program is running: bpf_prog->active, kernel/trace/bpf_trace.c) but
         * runs its end, which searches this stack. So the frame is emptied before it is pushed
         * (what an earlier wait left in it, popped without being emptied, must not match that
         * end: it would be accounted from that wait's begin, a second ago), and filled once
         * pushed (a begin nested in contention_end, whose own end is skipped, goes above it).
         */
        struct spin_frame *f = &s->f[d];
        f->w.lock = 0;
        asm volatile("" ::: "memory");
        s->depth = d + 1;
        asm volatile("" ::: "memory");
        f->task = task;
        f->switches = switches;
        start_wait(ctx, &f->w, lock, tick, type, 1);
        return 0;
    }
    u64 me = bpf_get_current_task();
    struct sleeper *sl = my_sleeper(me);
    if (sl) {
        if (sl->w.lock == lock) { /* the same wait going on */
            if (!(flags & LCB_F_SPIN))
                goes_to_sleep(&sl->w); /* a mutex's sleep after its optimistic spin */
            return 0;
        }
        count_stat(STAT_END_MISSED); /* the end of the slot's last wait never came */
    } else {
        sl = claim_sleeper(me, tick);
        if (!sl) {
            count_stat(STAT_SLEEPER_SLOTS_FULL);
            return 0;
        }
    }
    /* Budgeted: a mutex's optimistic spin; an rtmutex (PREEMPT_RT's spinlock_t, as frequent as
     * spinlocks elsewhere). Always timed: waits that sleep from their begin (rwsem, semaphore,
     * percpu-rwsem), which cost a context switch each. */
    start_wait(ctx, &sl->w, lock, tick, type, flags & (LCB_F_SPIN | LCB_F_RT));
    return 0;
}

RAW_TRACEPOINT_PROBE(contention_end)
{
    /* TP_PROTO(void *lock, int ret): ret != 0 for an interrupted or timed-out wait, still a wait. */
    u64 lock = ctx->args[0];
    u32 zero = 0;
    struct spin_stack *s = lockstat_spin.lookup(&zero);
    if (!s)
        return 0; /* never: a one-entry array */
    /*
     * An interrupt or NMI that contends while this program runs has its begin seen (pushed on
     * this CPU's stack) and its end skipped (this program is running: bpf_prog->active,
     * kernel/trace/bpf_trace.c). Left there, such a frame would be taken by a later end of the
     * same lock whose own begin was skipped the same way, and accounted from its begin, seconds
     * before (seen here: spinlock waits of 0.9 and 1.6 s). So the stack is put back, at the
     * end, to the depth this program found, less the frame it popped: whatever was pushed
     * meanwhile lost its end.
     */
    u32 d = s->depth;
    if (d > SPIN_DEPTH)
        d = SPIN_DEPTH;
    u32 depth = d;
    int found = 0;
    /* Nearly always the top frame; deeper only if an end was missed above it. */
    for (u32 i = 1; i <= SPIN_DEPTH; i++) {
        if (i > d)
            break;
        u32 at = d - i;
        asm volatile("" : "+r"(at));
        if (at >= SPIN_DEPTH)
            break;
        struct spin_frame *f = &s->f[at];
        if (f->w.lock == lock) {
            u64 task, switches;
            cpu_epoch(&task, &switches);
            if (f->task != task || f->switches != switches) {
                /* Left by a context that is gone: so is everything pushed after it. This end's
                 * begin was skipped (nested in contention_begin). */
                count_stat(STAT_END_MISSED);
                depth = 0;
                break;
            }
            if (i > 1)
                count_stat(STAT_END_MISSED);
            finish_wait(&f->w); /* before it is popped: a nested begin meanwhile goes above it */
            depth = at;
            found = 1;
            break;
        }
    }
    if (!found) {
        u64 me = bpf_get_current_task();
        struct sleeper *sl = my_sleeper(me);
        if (sl && sl->w.lock == lock) {
            finish_wait(&sl->w);
            sl->owner = 0; /* after the wait is accounted: the slot is free */
        }
    }
    asm volatile("" ::: "memory");
    if (s->depth > d)
        count_stat(STAT_END_MISSED);
    s->depth = depth;
    return 0;
}
