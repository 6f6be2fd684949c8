// SPDX-License-Identifier: Apache-2.0
/*
 * Run-queue latency per workload: time from a task becoming runnable (wakeup, new task, or being
 * preempted) to it running, aggregated in the kernel into log2 histograms, one row per cgroup
 * (probes/rows.py: rows "runqueue_latency_seconds", NSLOTS counts + sum in ns). Exported as
 * nodetune_runqueue_latency_seconds. Shared prelude: common.bpf.h (slots, workload_id, stats).
 *
 * STRATEGY_SCHEDINFO (raw tracepoint sched_switch only): the kernel itself accounts every wait in
 * task->sched_info (CONFIG_SCHED_INFO; kernel/sched/stats.h sched_info_arrive(): run_delay += the
 * wait, pcount++ at each switch-in). When a task is switched out, the wait that preceded the run
 * now ending is run_delay minus what we saw at its previous switch-out. No clock read, no wakeup
 * hook. Offsets come from BTF at load time:
 *   SCHED_INFO_OFF   offsetof(struct task_struct, sched_info) + offsetof(struct sched_info, pcount)
 *   RUN_DELAY_GAP    offsetof(sched_info, run_delay) - offsetof(sched_info, pcount)
 * The per-task baseline lives in
 *   TASK_BTF (>= 5.11)  BPF task storage: one slot per task, no collisions, freed when the task exits
 *   otherwise           a pid-indexed array of PID_SLOTS (power of two), direct-mapped with a tag:
 *                       two tasks whose pids differ by a multiple of PID_SLOTS evict each other
 *                       (counted as pid_slot_evicted)
 *
 * STRATEGY_TP (classic tracepoints, no BTF needed): timestamps at sched_wakeup, sched_wakeup_new
 * and preempting sched_switch; the delta at switch-in, in the pid-indexed array. Fields from the
 * tracefs format only.
 *
 * Nothing is sent to user space: user space reads the rows when Prometheus scrapes.
 */

#ifdef STRATEGY_SCHEDINFO

struct baseline {
    u64 pcount;    /* sched_info.pcount at the task's last switch-out; 0 = never seen */
    u64 run_delay; /* sched_info.run_delay (ns) at the task's last switch-out */
    u64 key;       /* cache: workload_key() (css_set) when wid was read; 0 = re-read wid */
    u64 wid;       /* cache: the workload the task last waited in ... */
    u32 row;       /* ... and that workload's histogram row */
    u32 pad;
};

#ifdef TASK_BTF
BPF_TASK_STORAGE(runqlat_tasks, struct baseline);
#else
struct pid_slot {
    struct baseline b;
    u64 task; /* owner tag: task_struct address (pids p and p + PID_SLOTS share a slot) */
};
BPF_ARRAY(runqlat_pid_slots, struct pid_slot, PID_SLOTS);
#endif

/* key: workload_key() of the task, or 0 where there is none (then the id is read every time). */
static __always_inline void charge(struct baseline *b, u64 key, u64 delta)
{
    if (!key || b->key != key) {
        b->wid = workload_id();
        b->key = key;
        b->row = (u32)-1;
    }
    if (!runqueue_latency_seconds_owned(b->row, b->wid)) { /* first use, or the row was reclaimed */
        int row = runqueue_latency_seconds_row_of(b->wid);
        if (row < 0)
            return;
        b->row = row;
    }
    u64 *w = runqueue_latency_seconds_at(b->row);
    if (w)
        hist_add(w, delta);
}

RAW_TRACEPOINT_PROBE(sched_switch)
{
    /* prev is current: the tracepoint fires in __schedule() before context_switch(). */
    u64 delta = 0, key = 0;
    int have = 0;
#ifdef TASK_BTF
    /*
     * The idle task needs no check: sched_info_switch() never accounts rq->idle, so its pcount
     * stays 0 and it is never charged (kernel/sched/stats.h).
     */
    /* BTF-typed pointer: the verifier turns these into plain loads with fault fixup. */
    void *t = (void *)bpf_get_current_task_btf();
    u64 pcount = *(u64 *)(t + SCHED_INFO_OFF);
    u64 run_delay = *(u64 *)(t + SCHED_INFO_OFF + RUN_DELAY_GAP);
#ifdef HAVE_WORKLOAD_KEY
    key = workload_key(t);
#endif
    struct baseline *b = runqlat_tasks.task_storage_get(t, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (!b) { /* allocation failed, or the storage lock was busy (recursion on this CPU) */
        count_stat(STAT_TASK_STORAGE_BUSY);
        return 0;
    }
    if (b->pcount && pcount > b->pcount && run_delay >= b->run_delay) {
        delta = run_delay - b->run_delay; /* the wait(s) before the run now ending */
        have = 1;
    } else if (!b->pcount && pcount == 1) {
        delta = run_delay; /* a new task's first run: all its run_delay is that first wait */
        have = 1;
    } /* else: first sight of a task older than the probe: baseline only */
#else
    u32 pid = (u32)bpf_get_current_pid_tgid();
    if (!pid) /* the idle task of each CPU */
        return 0;
    u64 task = bpf_get_current_task();
    u64 si[1 + RUN_DELAY_GAP / 8] = {};
    bpf_probe_read_kernel(si, sizeof(si), (void *)task + SCHED_INFO_OFF);
    u64 pcount = si[0], run_delay = si[RUN_DELAY_GAP / 8];
    u32 idx = pid & (PID_SLOTS - 1);
    struct pid_slot *s = runqlat_pid_slots.lookup(&idx);
    if (!s)
        return 0;
    struct baseline *b = &s->b;
    if (s->task == task && pcount > b->pcount && run_delay >= b->run_delay) {
        delta = run_delay - b->run_delay;
        have = 1;
    } else if (s->task != task && pcount == 1) {
        delta = run_delay;
        have = 1;
    } else if (s->task != task && s->task && pcount > 1) {
        count_stat(STAT_PID_SLOT_EVICTED); /* or first sight of an older task: baseline only */
    }
    if (s->task != task) {
        s->task = task;
        b->key = 0; /* the cached workload belonged to the previous owner */
    }
#endif
    b->pcount = pcount;
    b->run_delay = run_delay;
    if (have)
        charge(b, key, delta);
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
    int row = runqueue_latency_seconds_row_of(s->wid);
    if (row < 0)
        return 0;
    u64 *w = runqueue_latency_seconds_at(row);
    if (w)
        hist_add(w, delta);
    return 0;
}

#endif /* STRATEGY_TP */
