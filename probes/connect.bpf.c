// SPDX-License-Identifier: Apache-2.0
/*
 * connect() local-port allocation, per workload: how long the kernel spent choosing a local port
 * (the ephemeral port search of __inet_hash_connect(), net/ipv4/inet_hashtables.c) and how many
 * connects found none free. Rows "connect_port_search_seconds" (probes/row_table.py): NSLOTS counts,
 * the sum in ns, then the failures (FAILURES_WORD).
 *
 * STRATEGY_FEXIT (fentry + fexit) and STRATEGY_KPROBE (kprobe + kretprobe): the search itself,
 * __inet_hash_connect(), which inet_hash_connect() (tcp_v4_connect) and inet6_hash_connect()
 * (tcp_v6_connect) call; DCCP's connects too, which the protocol check drops. It runs in the
 * connecting task, which can move to another CPU inside it (cond_resched() between candidate
 * ports), so the start is kept in a slot, not per CPU.
 *   duration  exit - entry: the search alone, nothing before or after it.
 *   failure   it returned -EADDRNOTAVAIL: no port of the range free for this destination, or the
 *             port bound before connect() has its four-tuple taken.
 *   The slot is keyed by the task (connect() is synchronous); the socket (argument HC_SK_ARG)
 *   is read at entry for its protocol.
 *
 * The tracepoint strategies start at the raw tracepoint inet_sock_set_state, TCP_CLOSE ->
 * TCP_SYN_SENT, which tcp_v4_connect() and tcp_v6_connect() set immediately before
 * inet_hash_connect().
 *
 * STRATEGY_TRACEPOINT (one raw tracepoint, nothing else): the search in flight is keyed by the socket
 * and ends when the socket leaves SYN_SENT (ESTABLISHED, or CLOSE on any failure).
 *   success the SYN went out since the start: tcp_connect() refreshed tp->tcp_clock_cache
 *           (tcp_mstamp_refresh(), ktime_get_ns(): the clock of bpf_ktime_get_ns()) and
 *           __tcp_transmit_skb() copied it to tp->tcp_wstamp_ns, which nothing but a transmit
 *           moves. The search ended before that: wstamp - start bounds it from above. A
 *           retransmitted SYN moved wstamp again (total_retrans > 0): no duration then.
 *   failure CLOSE with no SYN sent since the start (wstamp < start): connect's "failure:" path
 *           right after inet_hash_connect() failed. A connection refused or timed out later has
 *           sent its SYN. (Not inet_num == 0: tcp_set_state(TCP_CLOSE) -> inet_put_port() zeroes
 *           it before the tracepoint fires, for every autobound socket.)
 * STRATEGY_TRACEPOINT_SOCKOPS (the tracepoint and a sock_ops program on the cgroup v2 root):
 *   success BPF_SOCK_OPS_TCP_CONNECT_CB, called from tcp_connect() once the port is chosen
 *           (always, no callback flags needed), in the connecting task. connect() is synchronous,
 *           so the search in flight is keyed by the task; sock_ops cannot key by the socket (the
 *           verifier forbids arithmetic on its socket pointer).
 *   failure CLOSE while the task's search on that socket is still in flight (no connect callback).
 *
 * All: a start lost to a slot collision still counts a failure (tracepoint strategies: when the
 * socket never sent anything, wstamp == 0). Slots are a direct-mapped array tagged with the key (no hash-map insert
 * or delete per connect); a search that finds its slot held by another search in flight
 * (younger than IN_FLIGHT_NS) takes it, and the older one's duration is lost (slot_busy).
 */

#ifdef STRATEGY_KPROBE
#include <uapi/linux/ptrace.h> /* struct pt_regs, for PT_REGS_PARM* and PT_REGS_RC */
#endif

#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT 2
#define TCP_CLOSE 7
#define IPPROTO_TCP_ 6
#define IN_FLIGHT_NS 1000000000ULL
#define EADDRNOTAVAIL_ 99 /* include/uapi/asm-generic/errno.h */

struct search {
    u64 key; /* the socket (TRACEPOINT) or the connecting task's task_struct; 0 = free */
    u64 sk;  /* the socket (TRACEPOINT_SOCKOPS: checked at the failure end); FEXIT, KPROBE: is TCP */
    u64 ts;  /* ns when the search began */
    u64 wid; /* workload of the connecting task */
};

BPF_ARRAY(connect_searches, struct search, SEARCH_SLOTS);

static __always_inline struct search *search_slot(u64 key)
{
    u32 i = (u32)((key * 0x9E3779B97F4A7C15ULL) >> 32) & (SEARCH_SLOTS - 1); /* Fibonacci hash */
    return connect_searches.lookup(&i);
}

static __always_inline void search_begin(u64 key, u64 sk)
{
    struct search *s = search_slot(key);
    if (!s)
        return;
    u64 now = bpf_ktime_get_ns();
    if (s->key && s->key != key && now - s->ts < IN_FLIGHT_NS)
        count_stat(STAT_SLOT_BUSY);
    s->ts = now;
    s->sk = sk;
    s->wid = workload_id();
    s->key = key;
}

/* One search of workload wid ended: its duration (when known) and whether it failed. */
static __always_inline void search_done(u64 wid, u64 ns, int timed, int failed)
{
    int row = connect_port_search_seconds_row_cached(wid);
    u64 *w = row < 0 ? 0 : connect_port_search_seconds_at(row);
    if (!w)
        return;
    if (timed)
        hist_add(w, ns);
    if (failed)
        w[FAILURES_WORD]++;
}

static __always_inline u64 read_u64(u64 sk, u32 off)
{
    u64 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (void *)sk + off);
    return v;
}

/* A socket that left SYN_SENT for CLOSE with no search of ours in flight: a failed search iff it
 * never sent a segment (the start was lost to a slot collision, or predates the probe). */
static __always_inline void unmatched_close(u64 sk)
{
    if (read_u64(sk, TCP_WSTAMP_OFF) == 0)
        search_done(workload_id(), 0, 0, 1);
}

static __always_inline int is_tcp(u64 sk)
{
    u16 protocol = 0;
    bpf_probe_read_kernel(&protocol, sizeof(protocol), (void *)sk + SK_PROTOCOL_OFF);
    return protocol == IPPROTO_TCP_; /* not MPTCP's own socket, SCTP, DCCP */
}

#if defined(STRATEGY_FEXIT) || defined(STRATEGY_KPROBE)
/* Entry: the search in flight is keyed by the task (the verifier forbids arithmetic on fexit's
 * typed socket pointer, and the kretprobe has no arguments); sk = 1 marks a TCP search. */
static __always_inline void hooked_entry(u64 sk)
{
    search_begin(bpf_get_current_task(), is_tcp(sk));
}

/* Return: ret is __inet_hash_connect()'s; sk its socket, or 0 where unknown (kretprobe). A failed
 * search whose start was lost (slot_busy) is counted if TCP; its protocol is read only then. */
static __always_inline void hooked_return(int ret, u64 sk)
{
    u64 task = bpf_get_current_task();
    struct search *s = search_slot(task);
    int failed = ret == -EADDRNOTAVAIL_;
    if (s && s->key == task) {
        s->key = 0;
        if (s->sk)
            search_done(s->wid, bpf_ktime_get_ns() - s->ts, 1, failed);
    } else if (failed && (!sk || is_tcp(sk))) {
        search_done(workload_id(), 0, 0, 1);
    }
}
#endif

#ifdef STRATEGY_FEXIT
KFUNC_PROBE(__inet_hash_connect)
{
    hooked_entry(ctx[HC_SK_ARG]);
    return 0;
}

KRETFUNC_PROBE(__inet_hash_connect)
{
    /* The return value follows the arguments in fexit's context. */
    hooked_return((int)ctx[HC_NARGS], ctx[HC_SK_ARG]);
    return 0;
}
#endif /* STRATEGY_FEXIT */

#ifdef STRATEGY_KPROBE
int kprobe____inet_hash_connect(struct pt_regs *ctx)
{
    hooked_entry(HC_SK_PARM(ctx));
    return 0;
}

int kretprobe____inet_hash_connect(struct pt_regs *ctx)
{
    /* No arguments here: a lost start cannot tell TCP from DCCP, and its failure is counted
     * (DCCP is rare, and gone from the kernel since 6.16). */
    hooked_return((int)PT_REGS_RC(ctx), 0);
    return 0;
}
#endif /* STRATEGY_KPROBE */

#if defined(STRATEGY_TRACEPOINT) || defined(STRATEGY_TRACEPOINT_SOCKOPS)
RAW_TRACEPOINT_PROBE(inet_sock_set_state)
{
    /* TP_PROTO(const struct sock *sk, const int oldstate, const int newstate) */
    int oldstate = (int)ctx->args[1];
    int newstate = (int)ctx->args[2];
    int begin = oldstate == TCP_CLOSE && newstate == TCP_SYN_SENT;
#ifdef STRATEGY_TRACEPOINT
    if (!begin && oldstate != TCP_SYN_SENT)
#else
    if (!begin && !(oldstate == TCP_SYN_SENT && newstate == TCP_CLOSE))
#endif
        return 0; /* every other TCP state change on the node: two compares */
    u64 sk = ctx->args[0];
    if (!is_tcp(sk))
        return 0;
#ifdef STRATEGY_TRACEPOINT
    if (begin) {
        search_begin(sk, sk);
        return 0;
    }
    struct search *s = search_slot(sk);
    if (!s || s->key != sk) {
        if (newstate == TCP_CLOSE)
            unmatched_close(sk);
        return 0;
    }
    s->key = 0;
    u64 wstamp = read_u64(sk, TCP_WSTAMP_OFF);
    if (wstamp < s->ts) { /* no SYN since the search began */
        if (newstate == TCP_CLOSE)
            search_done(s->wid, bpf_ktime_get_ns() - s->ts, 1, 1);
        return 0; /* ESTABLISHED without a SYN: TCP_REPAIR */
    }
    u32 retrans = 0;
    bpf_probe_read_kernel(&retrans, sizeof(retrans), (void *)sk + TOTAL_RETRANS_OFF);
    if (retrans)
        count_stat(STAT_SYN_RETRANSMITTED);
    search_done(s->wid, wstamp - s->ts, retrans == 0, 0);
#else
    u64 task = bpf_get_current_task();
    if (begin) {
        search_begin(task, sk);
        return 0;
    }
    struct search *s = search_slot(task);
    if (s && s->key == task && s->sk == sk) {
        s->key = 0;
        search_done(s->wid, bpf_ktime_get_ns() - s->ts, 1, 1);
        return 0;
    }
    unmatched_close(sk); /* closed after its search had ended, or from softirq */
#endif
    return 0;
}
#endif /* tracepoint strategies */

#ifdef STRATEGY_TRACEPOINT_SOCKOPS
int connect_sockops(struct bpf_sock_ops *skops)
{
    if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB)
        return 1;
    u64 task = bpf_get_current_task();
    struct search *s = search_slot(task);
    if (s && s->key == task) {
        s->key = 0;
        search_done(s->wid, bpf_ktime_get_ns() - s->ts, 1, 0);
    }
    return 1; /* never changes the connection: reply untouched */
}
#endif /* STRATEGY_TRACEPOINT_SOCKOPS */
