// SPDX-License-Identifier: Apache-2.0
/*
 * Prepended to every probe's program by probes/base.py (BCC rewrites map calls only in the main
 * text, so this is text, not an #include). Macros set from Python, never edited here:
 *
 *   NSLOTS            histogram slots (metrics/histogram.py): slot 0 = le 1 us ... slot NSLOTS-2 =
 *                     le 2^(NSLOTS-2) us, slot NSLOTS-1 = +Inf
 *   NSTATS, STAT_*    the probe's event-loss reasons (Probe.stat_reasons), counted per CPU
 *   TASK_CGROUPS_OFF  offsetof(task_struct, cgroups), wherever BTF has it
 *   CSS_SET_DFL_OFF   offsetof(css_set, dfl_cgrp); with TASK_BTF the v2 id is read with plain loads
 *   CGROUP_KN_OFF     offsetof(cgroup, kn)
 *   KN_ID_OFF         offsetof(kernfs_node, id)  (u64, == inode number since 5.5 on 64-bit)
 *   WORKLOAD_V1_CPU   charge the task's cgroup in the v1 "cpu" hierarchy instead of the v2 one:
 *     CSS_SET_CPU_OFF     offsetof(css_set, subsys) + cpu_cgrp_id * sizeof(void *)
 *     CSS_CGROUP_OFF      offsetof(cgroup_subsys_state, cgroup)
 *   TASK_BTF          bpf_get_current_task_btf() exists (>= 5.11): plain loads through BTF-typed
 *                     pointers instead of bpf_probe_read_kernel()
 * All offsets come from the running kernel's BTF (probes/btf.py), never from headers.
 */

#if NSLOTS > 24
#error "latency_slot() divides by 1000 with a 32-bit magic number: 1000 * 2^(NSLOTS-2) + 999 must stay below 2^32"
#endif

BPF_PERCPU_ARRAY(probe_stats, u64, NSTATS);

static __always_inline void count_stat(u32 stat)
{
    u64 *v = probe_stats.lookup(&stat);
    if (v)
        (*v)++; /* per-CPU value: no atomics needed */
}

/* Number of significant bits of v: 0 -> 0, 1 -> 1, 2..3 -> 2, 4..7 -> 3 ... (no loops). */
static __always_inline u32 bit_length(u64 v)
{
    u32 n = 0;
    if (v >> 32) { v >>= 32; n += 32; }
    if (v >> 16) { v >>= 16; n += 16; }
    if (v >> 8) { v >>= 8; n += 8; }
    if (v >> 4) { v >>= 4; n += 4; }
    if (v >> 2) { v >>= 2; n += 2; }
    if (v >> 1) { v >>= 1; n += 1; }
    return n + (u32)v;
}

/*
 * The histogram slot of a duration, matching Prometheus' inclusive `le`: the smallest s with
 * ns <= 1000 * 2^s, i.e. 0 for ns <= 1 us, s for (2^(s-1) us, 2^s us], NSLOTS-1 (+Inf) above
 * 2^(NSLOTS-2) us. With u = ceil(ns / 1000): ns <= 1000 * 2^s <=> u <= 2^s, so s = bit_length(u - 1).
 * (BCC's bpf_log2l() returns 1 for both 0 and 1 and floor-rounds: it cannot give this mapping.)
 */
static __always_inline u32 latency_slot(u64 ns)
{
    if (ns > 1000ULL << (NSLOTS - 2)) /* +Inf; also keeps ns + 999 below 2^32 */
        return NSLOTS - 1;
    /* (ns + 999) / 1000 without a 64-bit div (tens of cycles on x86): for n < 2^32,
     * n / 1000 == (n * 274877907) >> 38 exactly (Granlund-Montgomery; 274877907 = ceil(2^38 / 1000)). */
    u64 us = ((ns + 999) * 274877907ULL) >> 38;
    if (us <= 1)
        return 0;
    u32 s = bit_length(us - 1);
    return s < NSLOTS - 1 ? s : NSLOTS - 1;
}

/*
 * Add a duration `n` times to a histogram row laid out as NSLOTS counts then the sum in ns: n > 1
 * for a sampled observation that stands for n events (lockstat's timing budget).
 */
static __always_inline void hist_add_n(u64 *w, u64 ns, u64 n)
{
    u64 s = latency_slot(ns);
    /* clang proves s < NSLOTS and drops the check; the verifier cannot follow it through the
     * 32-bit arithmetic. Hiding s's range keeps the check next to the access. */
    asm volatile("" : "+r"(s));
    if (s < NSLOTS)
        w[s] += n;
    w[NSLOTS] += ns * n;
}

/* Add one duration to a histogram row. */
static __always_inline void hist_add(u64 *w, u64 ns)
{
    hist_add_n(w, ns, 1);
}

#ifdef TASK_BTF
/* The workload (cgroup) id of `t`, a BTF-typed task pointer (from bpf_get_current_task_btf()). */
static __always_inline u64 workload_id_of(void *t)
{
#ifdef WORKLOAD_V1_CPU
    void *cset = *(void **)(t + TASK_CGROUPS_OFF);
    void *css = *(void **)(cset + CSS_SET_CPU_OFF);
    void *cgrp = *(void **)(css + CSS_CGROUP_OFF);
    void *kn = *(void **)(cgrp + CGROUP_KN_OFF);
    return *(u64 *)(kn + KN_ID_OFF);
#elif defined(CSS_SET_DFL_OFF)
    /*
     * What bpf_get_current_cgroup_id() does (task_dfl_cgroup(current)->kn->id), as four plain
     * loads: the helper call costs ~60 ns per event on the development kernel (README, Overhead).
     */
    void *cset = *(void **)(t + TASK_CGROUPS_OFF);
    void *cgrp = *(void **)(cset + CSS_SET_DFL_OFF);
    void *kn = *(void **)(cgrp + CGROUP_KN_OFF);
    return *(u64 *)(kn + KN_ID_OFF);
#else
    return bpf_get_current_cgroup_id();
#endif
}
#endif

/* The id of the workload (cgroup) the current task is charged to. */
static __always_inline u64 workload_id(void)
{
#ifdef TASK_BTF
    return workload_id_of((void *)bpf_get_current_task_btf());
#elif defined(WORKLOAD_V1_CPU)
    void *p = (void *)bpf_get_current_task();
    u64 id = 0;
    bpf_probe_read_kernel(&p, sizeof(p), p + TASK_CGROUPS_OFF);
    bpf_probe_read_kernel(&p, sizeof(p), p + CSS_SET_CPU_OFF);
    bpf_probe_read_kernel(&p, sizeof(p), p + CSS_CGROUP_OFF);
    bpf_probe_read_kernel(&p, sizeof(p), p + CGROUP_KN_OFF);
    bpf_probe_read_kernel(&id, sizeof(id), p + KN_ID_OFF);
    return id;
#else
    return bpf_get_current_cgroup_id();
#endif
}
