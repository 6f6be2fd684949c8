// SPDX-License-Identifier: Apache-2.0
/*
 * Run-queue latency per workload: time from a task becoming runnable (wakeup, new task, or being
 * preempted) to it running, aggregated in the kernel into log2 histograms, one row per cgroup
 * (probes/row_table.py: rows "runqueue_latency_seconds", NSLOTS counts + sum in ns). Exported as
 * nodetune_runqueue_latency_seconds. Shared prelude: common.bpf.h (slots, workload_id, stats).
 *
 * STRATEGY_SCHEDINFO (raw tracepoint sched_switch only): the kernel itself accounts every wait in
 * task->sched_info (CONFIG_SCHED_INFO; kernel/sched/stats.h sched_info_arrive(): run_delay += the
 * wait at each switch-in). The run_delay of the task switched in is noted per CPU; at its
 * switch-out on the same CPU the difference is the wait before that run. No clock read, no
 * wakeup hook, no per-task state. Offsets come from BTF at load time:
 *   RUN_DELAY_OFF    offsetof(struct task_struct, sched_info) + offsetof(struct sched_info, run_delay)
 *   TASK_PID_OFF     offsetof(struct task_struct, pid)
 *   TASK_BTF         plain loads through bpf_get_current_task_btf() (>= 5.11), else probe reads
 *
 * STRATEGY_TP (classic tracepoints, no BTF needed): timestamps at sched_wakeup, sched_wakeup_new
 * and preempting sched_switch; the delta at switch-in, in a pid-indexed array of PID_SLOTS (a
 * power of two), direct-mapped with a tag: tasks whose pids differ by a multiple of PID_SLOTS
 * evict each other (counted as pid_slot_evicted). Fields from the tracefs format only.
 *
 * Nothing is sent to user space: user space reads the rows when Prometheus scrapes.
 */

/* Per-CPU cached row lookup (probes/row_table.py): the hash lookup once per cgroup per CPU. */
static __always_inline void charge(u64 wid, u64 delta)
{
    int row = runqueue_latency_seconds_row_cached(wid);
    if (row < 0)
        return;
    u64 *w = runqueue_latency_seconds_at(row);
    if (w)
        hist_add(w, delta);
}

#ifdef STRATEGY_SCHEDINFO

/*
 * The task switched in last on this CPU and its run_delay at that moment. trace_sched_switch()
 * fires in __schedule() before context_switch() -> sched_info_switch() -> sched_info_arrive(next)
 * adds next's wait to its run_delay; a running task never leaves its CPU, so at its next
 * switch-out (here, as prev) its run_delay minus this value is exactly the wait that preceded the
 * run now ending. No per-task state: nothing to collide, nothing to allocate, on any kernel.
 */
struct pending {
    u64 task;   /* task_struct address of the task switched in on this CPU */
    u64 before; /* its sched_info.run_delay (ns) just before this switch-in's accounting */
};
BPF_PERCPU_ARRAY(runqlat_pending, struct pending, 1);

RAW_TRACEPOINT_PROBE(sched_switch)
{
    /* TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next, ...): prev is current. */
    u32 zero = 0;
    struct pending *p = runqlat_pending.lookup(&zero);
    if (!p)
        return 0;
#ifdef TASK_BTF
    /* BTF-typed pointer: the verifier turns these into plain loads with fault fixup. */
    void *t = (void *)bpf_get_current_task_btf();
    u64 prev = (u64)t;
    u64 run_delay = *(u64 *)(t + RUN_DELAY_OFF);
    u32 pid = *(u32 *)(t + TASK_PID_OFF);
#define CURRENT_WORKLOAD workload_id_of(t)
#else
    u64 prev = bpf_get_current_task();
    u64 run_delay = 0;
    bpf_probe_read_kernel(&run_delay, sizeof(run_delay), (void *)prev + RUN_DELAY_OFF);
    u32 pid = (u32)bpf_get_current_pid_tgid();
#define CURRENT_WORKLOAD workload_id()
#endif
    /* pid 0, the idle task: sched_info never accounts it (its run_delay stays 0). */
    if (p->task == prev && pid && run_delay >= p->before)
        charge(CURRENT_WORKLOAD, run_delay - p->before);
    u64 next = ctx->args[2];
    p->task = next;
#if defined(TASK_BTF) && defined(RQ_CURR_CHAIN)
    /*
     * next as a BTF-typed pointer, so its run_delay is a plain load rather than a probe read
     * (~55 ns here): __schedule() sets rq->curr = next before trace_sched_switch(), and
     * current->se.cfs_rq->rq is this CPU's runqueue (CONFIG_FAIR_GROUP_SCHED; set for tasks of
     * every class by set_task_rq()). Used only when it is the very pointer the tracepoint passed.
     */
    void *cfs_rq = *(void **)(t + TASK_SE_CFS_RQ_OFF);
    void *rq = *(void **)(cfs_rq + CFS_RQ_RQ_OFF);
    void *curr = *(void **)(rq + RQ_CURR_OFF);
    if ((u64)curr == next) {
        p->before = *(u64 *)(curr + RUN_DELAY_OFF);
        return 0;
    }
    count_stat(STAT_NEXT_PROBE_READ);
#endif
    p->before = 0;
    bpf_probe_read_kernel(&p->before, sizeof(p->before), (void *)next + RUN_DELAY_OFF);
    return 0;
}

#endif /* STRATEGY_SCHEDINFO */

#ifdef STRATEGY_TP

struct pid_slot {
    u64 ts;  /* ns when the task became runnable; 0 = not waiting */
    u64 wid; /* workload the task had when it last ran; 0 = not known yet */
    u32 pid; /* owner tag: pids p and p + PID_SLOTS share a slot */
    u32 pad;
};

BPF_ARRAY(runqlat_pid_slots, struct pid_slot, PID_SLOTS);

/* The task `pid` was put on a run queue. wid: its workload when known at this point, else 0. */
static __always_inline void mark_runnable(u32 pid, u64 wid)
{
    u32 idx = pid & (PID_SLOTS - 1);
    struct pid_slot *s = runqlat_pid_slots.lookup(&idx);
    if (!s)
        return;
    if (s->pid != pid) {
        if (s->ts)
            count_stat(STAT_PID_SLOT_EVICTED);
        s->pid = pid;
        s->wid = wid;
    } else if (wid) {
        s->wid = wid;
    }
    s->ts = bpf_ktime_get_ns();
}

TRACEPOINT_PROBE(sched, sched_wakeup)
{
    mark_runnable(args->pid, 0);
    return 0;
}

/* The parent is current and the child starts in its cgroup (unless CLONE_INTO_CGROUP). */
TRACEPOINT_PROBE(sched, sched_wakeup_new)
{
    mark_runnable(args->pid, workload_id());
    return 0;
}

TRACEPOINT_PROBE(sched, sched_switch)
{
    u64 now = bpf_ktime_get_ns();
    u32 prev_pid = args->prev_pid, next_pid = args->next_pid, idx;
    struct pid_slot *s;

    if (prev_pid) { /* pid 0: the idle task of each CPU, never measured */
        idx = prev_pid & (PID_SLOTS - 1);
        s = runqlat_pid_slots.lookup(&idx);
        if (s) {
            if (s->pid != prev_pid && s->ts)
                count_stat(STAT_PID_SLOT_EVICTED);
            s->pid = prev_pid;
            /* prev is current: its workload now is the one to charge its next wait to. */
            s->wid = workload_id();
            /*
             * prev_state is __trace_sched_switch_state(): TASK_REPORT_MAX (0x100 since 4.14) when
             * preempted, 0 when runnable, a sleep state bit below 0x100 otherwise; runnable = no
             * bit of the report mask set (include/trace/events/sched.h).
             */
            s->ts = (args->prev_state & TASK_REPORT_MASK) == 0 ? now : 0;
        }
    }
    if (!next_pid)
        return 0;
    idx = next_pid & (PID_SLOTS - 1);
    s = runqlat_pid_slots.lookup(&idx);
    if (!s || s->pid != next_pid || !s->ts)
        return 0;
    u64 delta = now - s->ts;
    s->ts = 0;
    if (!s->wid) {
        count_stat(STAT_UNATTRIBUTED);
        return 0;
    }
    charge(s->wid, delta);
    return 0;
}

#endif /* STRATEGY_TP */
