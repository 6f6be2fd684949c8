// SPDX-License-Identifier: Apache-2.0
/*
 * Run-queue latency per cgroup: time from a task becoming runnable (wakeup, new task, or being
 * switched out while still runnable, i.e. preempted) to it running again, aggregated in the kernel
 * into log2 histograms keyed by cgroup v2 id. Exported as nodetune_runqueue_latency_seconds.
 *
 * Strategy macros (set by runqlat.py):
 *   STRATEGY_RAW_TP  raw tracepoints; task fields at offsets read from BTF at load time
 *     TASK_PID_OFF       offsetof(struct task_struct, pid)
 *     PREV_STATE_ARG     sched_switch passes prev_state as args[3] (kernel >= 5.18) ...
 *     TASK_STATE_OFF/TASK_STATE_SIZE  ... else read prev->__state / prev->state
 *   STRATEGY_TP      classic tracepoints; fields from the tracepoint format only
 * Sizes:
 *   PID_SLOTS    power of two; pid-indexed slots, direct-mapped (pid & (PID_SLOTS-1))
 *   MAX_CGROUPS  histograms kept (one per cgroup with tasks that waited)
 *
 * Per-event path: no hash insert or delete (except the first event of a new cgroup), no
 * per-event output to user space. Mismatched kernel headers are harmless: no struct layout from
 * headers is used.
 */

#define NSLOTS 24 /* slot 0: < 1 us; slot s: [2^(s-1), 2^s) us; slot 23: >= 2^22 us (4.19 s) */

struct pid_slot {
    u64 ts;   /* ns when the task became runnable; 0 = not waiting */
    u64 cgid; /* cgroup v2 id the task had when it last ran; 0 = not known yet */
    u32 pid;  /* owner tag: pids p and p + PID_SLOTS share a slot */
    u32 pad;
};

struct runq_hist {
    u64 slots[NSLOTS];
    u64 sum_ns;
};

enum runqlat_stat {
    STAT_UNATTRIBUTED = 0, /* task ran before we ever saw it run: cgroup unknown */
    STAT_CGROUP_MAP_FULL,  /* MAX_CGROUPS reached: event dropped */
    STAT_SLOT_EVICTED,     /* a waiting task's slot was taken by a colliding pid */
    NSTATS,
};

BPF_ARRAY(runqlat_pid_slots, struct pid_slot, PID_SLOTS);
BPF_PERCPU_HASH(runqueue_latency_seconds, u64, struct runq_hist, MAX_CGROUPS);
BPF_PERCPU_ARRAY(runqlat_stats, u64, NSTATS);

static __always_inline void count_stat(int stat)
{
    u64 *v = runqlat_stats.lookup(&stat);
    if (v)
        (*v)++;
}

/* The task `pid` was put on a run queue. cgid: its cgroup when known at this point, else 0. */
static __always_inline void mark_runnable(u32 pid, u64 cgid)
{
    u32 idx = pid & (PID_SLOTS - 1);
    struct pid_slot *s = runqlat_pid_slots.lookup(&idx);
    if (!s)
        return;
    if (s->pid != pid) {
        if (s->ts)
            count_stat(STAT_SLOT_EVICTED);
        s->pid = pid;
        s->cgid = cgid;
    } else if (cgid) {
        s->cgid = cgid;
    }
    s->ts = bpf_ktime_get_ns();
}

static __always_inline void on_switch(u32 prev_pid, int prev_runnable, u32 next_pid)
{
    u64 now = bpf_ktime_get_ns();
    u32 idx;
    struct pid_slot *s;

    if (prev_pid) { /* pid 0: the idle task of each CPU, never measured */
        idx = prev_pid & (PID_SLOTS - 1);
        s = runqlat_pid_slots.lookup(&idx);
        if (s) {
            if (s->pid != prev_pid && s->ts)
                count_stat(STAT_SLOT_EVICTED);
            s->pid = prev_pid;
            /* prev is current here: the tracepoint fires before context_switch(). */
            s->cgid = bpf_get_current_cgroup_id();
            s->ts = prev_runnable ? now : 0;
        }
    }
    if (!next_pid)
        return;
    idx = next_pid & (PID_SLOTS - 1);
    s = runqlat_pid_slots.lookup(&idx);
    if (!s || s->pid != next_pid || !s->ts)
        return;
    u64 delta = now - s->ts;
    u64 cgid = s->cgid;
    s->ts = 0;
    if (!cgid) {
        count_stat(STAT_UNATTRIBUTED);
        return;
    }
    struct runq_hist *h = runqueue_latency_seconds.lookup(&cgid);
    if (!h) {
        struct runq_hist zero = {};
        runqueue_latency_seconds.insert(&cgid, &zero);
        h = runqueue_latency_seconds.lookup(&cgid);
        if (!h) {
            count_stat(STAT_CGROUP_MAP_FULL);
            return;
        }
    }
    u32 slot = bpf_log2l(delta / 1000);
    if (slot >= NSLOTS)
        slot = NSLOTS - 1;
    h->slots[slot]++; /* per-CPU value: no atomics needed */
    h->sum_ns += delta;
}

#ifdef STRATEGY_RAW_TP

static __always_inline u32 task_pid(void *task)
{
    u32 pid = 0;
    bpf_probe_read_kernel(&pid, sizeof(pid), task + TASK_PID_OFF);
    return pid;
}

/* TP_PROTO(struct task_struct *p) */
RAW_TRACEPOINT_PROBE(sched_wakeup)
{
    mark_runnable(task_pid((void *)ctx->args[0]), 0);
    return 0;
}

/* The parent is current and the child starts in its cgroup (unless CLONE_INTO_CGROUP). */
RAW_TRACEPOINT_PROBE(sched_wakeup_new)
{
    mark_runnable(task_pid((void *)ctx->args[0]), bpf_get_current_cgroup_id());
    return 0;
}

/* TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next[, unsigned int prev_state]) */
RAW_TRACEPOINT_PROBE(sched_switch)
{
    int preempt = (int)ctx->args[0];
#ifdef PREV_STATE_ARG
    u64 prev_state = (u32)ctx->args[PREV_STATE_ARG];
#else
    u64 prev_state = 0;
    bpf_probe_read_kernel(&prev_state, TASK_STATE_SIZE, (void *)ctx->args[1] + TASK_STATE_OFF);
#endif
    /* A preempted task stays on the run queue whatever its state (kernel/sched/core.c __schedule). */
    on_switch((u32)bpf_get_current_pid_tgid(), preempt || prev_state == 0, task_pid((void *)ctx->args[2]));
    return 0;
}

#endif /* STRATEGY_RAW_TP */

#ifdef STRATEGY_TP

TRACEPOINT_PROBE(sched, sched_wakeup)
{
    mark_runnable(args->pid, 0);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_wakeup_new)
{
    mark_runnable(args->pid, bpf_get_current_cgroup_id());
    return 0;
}

TRACEPOINT_PROBE(sched, sched_switch)
{
    /*
     * prev_state is __trace_sched_switch_state(): TASK_REPORT_MAX (0x100 since 4.14) when
     * preempted, 0 when runnable, a sleep state bit below 0x100 otherwise. Runnable = no bit of
     * the report mask set (include/trace/events/sched.h).
     */
    on_switch(args->prev_pid, (args->prev_state & TASK_REPORT_MASK) == 0, args->next_pid);
    return 0;
}

#endif /* STRATEGY_TP */
