// SPDX-License-Identifier: Apache-2.0
/*
 * Run-queue latency per cgroup: time from a task becoming runnable (wakeup, new task, or being
 * preempted) to it running, aggregated in the kernel into log2 histograms keyed by cgroup v2 id.
 * Exported as nodetune_runqueue_latency_seconds.
 *
 * STRATEGY_SCHEDINFO (raw tracepoint sched_switch only): the kernel itself accounts every wait in
 * task->sched_info (CONFIG_SCHED_INFO; kernel/sched/stats.h sched_info_arrive(): run_delay += the
 * wait, pcount++ at each switch-in). When a task is switched out, the wait that preceded the run
 * now ending is run_delay minus what we saw at its previous switch-out. No clock read, no wakeup
 * hook, and the sum equals /proc/<pid>/schedstat's run_delay by construction. Offsets come from
 * BTF at load time:
 *   SCHED_INFO_OFF   offsetof(struct task_struct, sched_info) + offsetof(struct sched_info, pcount)
 *   RUN_DELAY_GAP    offsetof(sched_info, run_delay) - offsetof(sched_info, pcount)
 *   TASK_BTF         read them with plain loads through bpf_get_current_task_btf() (>= 5.11),
 *                    else with bpf_probe_read_kernel() (~9 ns more per event here)
 *
 * STRATEGY_TP (classic tracepoints, no BTF needed): timestamps at sched_wakeup, sched_wakeup_new
 * and preempting sched_switch; the delta at switch-in. Fields from the tracefs format only.
 *
 * Sizes:
 *   PID_SLOTS    power of two; pid-indexed slots, direct-mapped (pid & (PID_SLOTS-1)) with a tag
 *   MAX_CGROUPS  histogram rows (one per cgroup whose tasks waited)
 *
 * Histograms live in rows of a per-CPU array. A cgroup gets a row from the free-row queue the
 * first time one of its tasks waits (cgroup id -> row in runqlat_cgroup_rows, row -> cgroup id in
 * runqlat_row_owner); user space zeroes the rows of vanished cgroups and pushes them back. The
 * pid slot caches (cgroup id, row), so the per-event path is array accesses only: no hash lookup,
 * insert or delete except when a task shows up in a cgroup for the first time. Nothing is sent to
 * user space.
 */

#define NSLOTS 24 /* slot 0: < 1 us; slot s: [2^(s-1), 2^s) us; slot 23: >= 2^22 us (4.19 s) */

struct runq_hist {
    u64 slots[NSLOTS];
    u64 sum_ns;
};

enum runqlat_stat {
    STAT_UNATTRIBUTED = 0, /* STRATEGY_TP: task ran before we saw it run, cgroup unknown */
    STAT_CGROUP_MAP_FULL,  /* MAX_CGROUPS reached: event dropped */
    STAT_SLOT_EVICTED,     /* a tracked task's slot was taken by a colliding pid */
    NSTATS,
};

BPF_PERCPU_ARRAY(runqueue_latency_seconds, struct runq_hist, MAX_CGROUPS);
BPF_HASH(runqlat_cgroup_rows, u64, u32, MAX_CGROUPS);
BPF_ARRAY(runqlat_row_owner, u64, MAX_CGROUPS); /* 0 = free */
BPF_QUEUE(runqlat_free_rows, u32, MAX_CGROUPS); /* filled with every row by user space at load */
BPF_PERCPU_ARRAY(runqlat_stats, u64, NSTATS);

static __always_inline void count_stat(int stat)
{
    u64 *v = runqlat_stats.lookup(&stat);
    if (v)
        (*v)++;
}

/* Whether `row` still belongs to `cgid` (a row is reclaimed only after its cgroup vanished). */
static __always_inline int row_owned(u32 row, u64 cgid)
{
    u64 *owner = runqlat_row_owner.lookup(&row);
    return owner && *owner == cgid;
}

/* The histogram row of `cgid`, taking a free one on first use; -1 when none is left. */
static __always_inline int row_of(u64 cgid)
{
    u32 *known = runqlat_cgroup_rows.lookup(&cgid);
    if (known)
        return *known;
    u32 row;
    if (runqlat_free_rows.pop(&row)) {
        count_stat(STAT_CGROUP_MAP_FULL);
        return -1;
    }
    if (runqlat_cgroup_rows.insert(&cgid, &row)) { /* another CPU won the race */
        runqlat_free_rows.push(&row, 0);
        known = runqlat_cgroup_rows.lookup(&cgid);
        return known ? *known : -1;
    }
    u64 *owner = runqlat_row_owner.lookup(&row);
    if (owner)
        *owner = cgid;
    return row;
}

static __always_inline void record(u32 row, u64 delta_ns)
{
    struct runq_hist *h = runqueue_latency_seconds.lookup(&row);
    if (!h)
        return;
    u32 slot = bpf_log2l(delta_ns / 1000);
    if (slot >= NSLOTS)
        slot = NSLOTS - 1;
    h->slots[slot]++; /* per-CPU value: no atomics needed */
    h->sum_ns += delta_ns;
}

#ifdef STRATEGY_SCHEDINFO

struct delay_slot {
    u64 task;      /* owner tag: task_struct address (pids p and p + PID_SLOTS share a slot) */
    u64 pcount;    /* sched_info.pcount at the owner's last switch-out */
    u64 run_delay; /* sched_info.run_delay (ns) at the owner's last switch-out */
    u64 cgid;      /* cache: the cgroup the owner last waited in ... */
    u32 row;       /* ... and that cgroup's histogram row */
    u32 pad;
};

BPF_ARRAY(runqlat_pid_slots, struct delay_slot, PID_SLOTS);

RAW_TRACEPOINT_PROBE(sched_switch)
{
    /* prev is current: the tracepoint fires in __schedule() before context_switch(). */
    u32 pid = (u32)bpf_get_current_pid_tgid();
    if (!pid) /* the idle task of each CPU */
        return 0;
#ifdef TASK_BTF
    /* BTF-typed pointer (>= 5.11): the verifier turns these into plain loads with fault fixup. */
    void *t = (void *)bpf_get_current_task_btf();
    u64 task = (u64)t;
    u64 pcount = *(u64 *)(t + SCHED_INFO_OFF);
    u64 run_delay = *(u64 *)(t + SCHED_INFO_OFF + RUN_DELAY_GAP);
#else
    u64 task = bpf_get_current_task();
    u64 si[1 + RUN_DELAY_GAP / 8] = {};
    bpf_probe_read_kernel(si, sizeof(si), (void *)task + SCHED_INFO_OFF);
    u64 pcount = si[0], run_delay = si[RUN_DELAY_GAP / 8];
#endif

    u32 idx = pid & (PID_SLOTS - 1);
    struct delay_slot *s = runqlat_pid_slots.lookup(&idx);
    if (!s)
        return 0;
    u64 delta = 0;
    int have = 0;
    if (s->task == task && pcount > s->pcount && run_delay >= s->run_delay) {
        delta = run_delay - s->run_delay; /* the wait(s) before the run now ending */
        have = 1;
    } else if (s->task != task && pcount == 1) {
        delta = run_delay; /* a new task's first run: all its run_delay is that first wait */
        have = 1;
    } else if (s->task != task && s->task && pcount > 1) {
        count_stat(STAT_SLOT_EVICTED); /* or first sight of an older task: baseline only */
    }
    s->task = task;
    s->pcount = pcount;
    s->run_delay = run_delay;
    if (!have)
        return 0;
    u64 cgid = bpf_get_current_cgroup_id();
    if (s->cgid != cgid || !row_owned(s->row, cgid)) {
        int row = row_of(cgid);
        if (row < 0)
            return 0;
        s->cgid = cgid;
        s->row = row;
    }
    record(s->row, delta);
    return 0;
}

#endif /* STRATEGY_SCHEDINFO */

#ifdef STRATEGY_TP

struct pid_slot {
    u64 ts;   /* ns when the task became runnable; 0 = not waiting */
    u64 cgid; /* cgroup v2 id the task had when it last ran; 0 = not known yet */
    u32 pid;  /* owner tag: pids p and p + PID_SLOTS share a slot */
    u32 pad;
};

BPF_ARRAY(runqlat_pid_slots, struct pid_slot, PID_SLOTS);

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

TRACEPOINT_PROBE(sched, sched_wakeup)
{
    mark_runnable(args->pid, 0);
    return 0;
}

/* The parent is current and the child starts in its cgroup (unless CLONE_INTO_CGROUP). */
TRACEPOINT_PROBE(sched, sched_wakeup_new)
{
    mark_runnable(args->pid, bpf_get_current_cgroup_id());
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
                count_stat(STAT_SLOT_EVICTED);
            s->pid = prev_pid;
            /* prev is current: its cgroup now is the one to charge its next wait to. */
            s->cgid = bpf_get_current_cgroup_id();
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
    if (!s->cgid) {
        count_stat(STAT_UNATTRIBUTED);
        return 0;
    }
    int row = row_of(s->cgid);
    if (row >= 0)
        record(row, delta);
    return 0;
}

#endif /* STRATEGY_TP */
