// SPDX-License-Identifier: Apache-2.0
/*
 * connect() local-port allocation, per workload: how long the kernel spent choosing a local port
 * (the ephemeral port search of __inet_hash_connect(), net/ipv4/inet_hashtables.c) and how many
 * connects found none free. Rows "connect_port_search_seconds" (probes/rows.py): NSLOTS counts,
 * the sum in ns, then the failures (FAILURES_WORD).
 *
 * STRATEGY_STATE_SOCKOPS needs neither kprobes nor fentry/fexit:
 *   start   raw tracepoint inet_sock_set_state, TCP_CLOSE -> TCP_SYN_SENT: tcp_v4_connect() and
 *           tcp_v6_connect() set SYN_SENT immediately before inet_hash_connect() / inet6_hash_connect()
 *   success sock_ops program, BPF_SOCK_OPS_TCP_CONNECT_CB: called from tcp_connect() once the port
 *           is chosen (always, no callback flags needed), in the connecting task
 *   failure raw tracepoint inet_sock_set_state, TCP_SYN_SENT -> TCP_CLOSE with no local port
 *           (inet_num == 0): the connect's "failure:" path right after inet_hash_connect() failed;
 *           a socket that had a port (bound, or a later failure) keeps inet_num.
 * The interval also holds what tcp_v4_connect() does between the two (ip_route_newports, the
 * initial sequence number: well under a microsecond), so it bounds the search from above.
 *
 * All three run in the connecting task (connect() is synchronous: one search per task at a time),
 * so a search in flight is keyed by the task: a direct-mapped array indexed by a hash of the
 * task_struct address and tagged with it (no hash-map insert or delete per connect). The sock_ops
 * program cannot key by the socket: the verifier forbids arithmetic on its socket pointer. A
 * connect that finds its slot held by another task's search in flight loses its duration (counted
 * as slot_busy), never its failure. The connecting task's workload is the one charged.
 */

#define TCP_SYN_SENT 2
#define TCP_CLOSE 7
#define IPPROTO_TCP_ 6
#define IN_FLIGHT_NS 1000000000ULL

struct search {
    u64 task; /* task_struct address of the connecting task; 0 = free */
    u64 ts;  /* ns when the search began */
    u64 wid; /* workload of the connecting task */
};

BPF_ARRAY(connect_searches, struct search, SEARCH_SLOTS);

static __always_inline struct search *search_slot(u64 task)
{
    u32 i = (u32)((task >> 6) ^ (task >> 20)) & (SEARCH_SLOTS - 1); /* task_struct: 64-byte aligned */
    return connect_searches.lookup(&i);
}

static __always_inline u64 *workload_row(u64 wid)
{
    int row = connect_port_search_seconds_row_cached(wid);
    return row < 0 ? 0 : connect_port_search_seconds_at(row);
}

static __always_inline void search_begin(void)
{
    u64 task = bpf_get_current_task();
    struct search *s = search_slot(task);
    if (!s)
        return;
    u64 now = bpf_ktime_get_ns();
    if (s->task && s->task != task && now - s->ts < IN_FLIGHT_NS)
        count_stat(STAT_SLOT_BUSY);
    s->ts = now;
    s->wid = workload_id();
    s->task = task;
}

/* The current task's search ended (failed: no port). A failure counts whether or not its start
 * was seen. */
static __always_inline void search_end(int failed)
{
    u64 task = bpf_get_current_task();
    struct search *s = search_slot(task);
    u64 now = bpf_ktime_get_ns();
    if (s && s->task == task) {
        s->task = 0;
        u64 *w = workload_row(s->wid);
        if (w) {
            hist_add(w, now - s->ts);
            if (failed)
                w[FAILURES_WORD]++;
        }
        return;
    }
    if (failed) {
        u64 *w = workload_row(workload_id());
        if (w)
            w[FAILURES_WORD]++;
    }
}

#ifdef STRATEGY_STATE_SOCKOPS

RAW_TRACEPOINT_PROBE(inet_sock_set_state)
{
    /* TP_PROTO(const struct sock *sk, const int oldstate, const int newstate) */
    int oldstate = (int)ctx->args[1];
    int newstate = (int)ctx->args[2];
    int begin = oldstate == TCP_CLOSE && newstate == TCP_SYN_SENT;
    if (!begin && !(oldstate == TCP_SYN_SENT && newstate == TCP_CLOSE))
        return 0; /* every other TCP state change on the node: two compares */
    u64 sk = ctx->args[0];
    u16 protocol = 0;
    bpf_probe_read_kernel(&protocol, sizeof(protocol), (void *)sk + SK_PROTOCOL_OFF);
    if (protocol != IPPROTO_TCP_)
        return 0; /* MPTCP's own socket, SCTP */
    if (begin) {
        search_begin();
        return 0;
    }
    u16 num = 0;
    bpf_probe_read_kernel(&num, sizeof(num), (void *)sk + SKC_NUM_OFF);
    if (num == 0)
        search_end(1);
    return 0; /* closed with a port: the search had ended at TCP_CONNECT_CB */
}

int connect_sockops(struct bpf_sock_ops *skops)
{
    if (skops->op == BPF_SOCK_OPS_TCP_CONNECT_CB)
        search_end(0);
    return 1; /* never changes the connection: reply untouched */
}

#endif /* STRATEGY_STATE_SOCKOPS */
