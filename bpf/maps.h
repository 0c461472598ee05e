/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * Maps, all pinned by the CLI and shared by every interface of an instance.
 * Names stay within 15 characters (BPF_OBJ_NAME_LEN).
 */
#ifndef LB_MAPS_H
#define LB_MAPS_H

#include "lb.h"

/* Packets and bytes per verdict reason, per CPU: bumped without atomics. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, LB_STAT_MAX);
	__type(key, __u32);
	__type(value, struct lb_counter);
} stats SEC(".maps");

/* Packets, bytes and new flows per backend id, per CPU (both directions). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, LB_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct lb_obj_counter);
} be_stats SEC(".maps");

/* Handshake latency, resets and unanswered SYNs per backend id, per CPU
 * (bumped once a connection at most, never on an established packet). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, LB_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct lb_be_hs);
} be_hs SEC(".maps");

/* VIP:port/proto -> service id. Written by `lb service add/del`. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LB_MAX_SERVICES);
	__type(key, struct svc_key);
	__type(value, struct svc_value);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} services SEC(".maps");

/* The IPv6 services: [VIP]:port/proto -> service id (ids shared with
 * `services`, as are the backends and Maglev tables). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LB_MAX_SERVICES);
	__type(key, struct svc6_key);
	__type(value, struct svc_value);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} services6 SEC(".maps");

/* Backend id -> address, port, service, weight. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LB_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct backend);
} backends SEC(".maps");

/*
 * Service id -> its Maglev lookup table (an array of backend ids, prime
 * size). Userspace builds a new table and swaps it in with one update of
 * this map, so no packet sees a half-written table.
 */
struct maglev_table {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65537);
	__uint(map_flags, BPF_F_INNER_MAP);
	__type(key, __u32);
	__type(value, __u32);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, LB_MAX_SERVICES);
	__type(key, __u32);
	__array(values, struct maglev_table);
} maglev SEC(".maps");

/*
 * The connection table: connections a backend answered and the client
 * confirmed (TCP: the handshake's ACK; UDP: a client packet after a reply),
 * two entries each (see struct flow). LRU, sized by the CLI; only answered
 * connections compete for it, so a flood of new flows cannot evict them.
 * One LRU list shared by all CPUs: with per-CPU lists each CPU could hold
 * only max/ncpus connections, and promotion puts them all on the CPU that
 * receives the client.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 2 * 1024 * 1024);
	__type(key, struct flow_key);
	__type(value, struct flow);
} conntrack SEC(".maps");

/*
 * Half-open connections: not answered (or not confirmed) yet, two entries
 * each like conntrack. Not a BPF hash: a set-associative table of our own
 * (halfopen.h), an array of sets of HO_WAYS entries, an entry's set chosen
 * by a keyed hash of its key (random keys per instance). An insert into a
 * full set replaces the set's oldest entry, so a SYN flood churns this
 * table alone; an insert costs a compare-and-swap and two cache lines, not
 * an LRU list's walk (BPF's LRU pop, 200+ ns a new entry, was most of a
 * new flow's cost). A set is 4 cache lines: its sequence number, insert times
 * and keys in the first (what a miss reads), an entry in each of the others
 * (IPv6: see ho_set6). Mmapable: the kernel aligns the sets to pages, hence to
 * cache lines, and user space takes a set through the mapping
 * (src/halfopen.rs). Sized by the CLI (max_entries: sets).
 */
#define HO_WAYS LB_HO_WAYS

struct ho_val {
	struct flow f;
} __attribute__((aligned(64)));

struct ho_set {
	__u32 seq;	      /* odd while a writer has the set (halfopen.h) */
	__u32 stamp[HO_WAYS]; /* clock ticks at insert: the oldest goes */
	struct flow_key key[HO_WAYS]; /* proto 0: a free way */
	struct ho_val val[HO_WAYS];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 128 * 1024);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct ho_set);
} ct_new SEC(".maps");

/* IPv6 connections: conntrack with IPv6 keys (a map per family
 * keeps IPv4 keys at 16 bytes). Sized by the CLI. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 512 * 1024);
	__type(key, struct flow6_key);
	__type(value, struct flow6);
} conntrack6 SEC(".maps");

/* The IPv6 half-open table: as ct_new, but its 40-byte keys do not fit a
 * set's first line, which holds a tag per way instead (the key's hash, 0:
 * free); a way's key and entry share their own two lines. */
struct ho_way6 {
	struct flow6_key key;
	struct flow6 f;
} __attribute__((aligned(64)));

struct ho_set6 {
	__u32 seq;
	__u32 stamp[HO_WAYS];
	__u32 tag[HO_WAYS];
	struct ho_way6 way[HO_WAYS];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 32 * 1024);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct ho_set6);
} ct_new6 SEC(".maps");

/*
 * Datagrams being forwarded in fragments: the first fragment (it alone
 * carries the ports) was matched to a flow and forwarded; the later ones,
 * which carry no ports, follow it with the flow's entry (as it was then)
 * for a second. Few at a time, so small; LRU.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct frag_key);
	__type(value, struct flow);
} frags SEC(".maps");

/* The same for IPv6 datagrams (frag6.h). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct frag6_key);
	__type(value, struct flow6);
} frags6 SEC(".maps");

/*
 * Direct server return: flow -> backend id, a cache that keeps a flow on
 * its backend while the Maglev table changes (the table alone gives the
 * same answer on every lb node, so a flow that moves to another node
 * keeps its backend too). Sized like conntrack by the CLI.
 */
struct dsr_flow {
	__u32 backend;
	__u32 pad;
	__u64 seen; /* clock ticks */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024 * 1024);
	__type(key, struct flow_key);
	__type(value, struct dsr_flow);
} dsr_flows SEC(".maps");

/* The same for IPv6 services. Sized by the CLI. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 256 * 1024);
	__type(key, struct flow6_key);
	__type(value, struct dsr_flow);
} dsr_flows6 SEC(".maps");

/*
 * Client affinity with a timeout (LB_SVC_AFFINITY_SHIFT): service and
 * client address -> the backend its last new flow took, and when. A cache:
 * an evicted client falls back to the Maglev choice. Sized by the CLI.
 */
struct affinity_key {
	__u32 svc;
	__be32 client;
};

struct affinity6_key {
	__u32 svc;
	struct lb_in6 client;
};

struct affinity {
	__u32 backend;
	__u32 pad;
	__u64 seen; /* clock ticks: the client's last new flow */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 64 * 1024);
	__type(key, struct affinity_key);
	__type(value, struct affinity);
} affinity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16 * 1024);
	__type(key, struct affinity6_key);
	__type(value, struct affinity);
} affinity6 SEC(".maps");

/* How many services are DSR (written by the CLI): only while there are
 * does a TCP segment of no flow have its service looked up. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} dsr_services SEC(".maps");

/* Backend id -> where the next NAT port search starts: ports are handed out
 * in order, so a freed tuple is reused as late as possible. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LB_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, __u32);
} nat_cursor SEC(".maps");

/* Backend id -> next hop towards it, cached for nh_ttl so new flows skip
 * the FIB lookup. Written by the datapath, cleared by `backend add`. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LB_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct lb_nexthop);
} nexthops SEC(".maps");

/* `lb trace`: events (struct lb_trace_event) and whether to make them. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 << 20);
} trace_rb SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct lb_trace_cfg);
} trace_cfg SEC(".maps");

/* Interfaces lb is attached to, for XDP_REDIRECT between them. */
struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP_HASH);
	__uint(max_entries, LB_MAX_IFACES);
	__type(key, __u32);
	__type(value, __u32);
} tx_ports SEC(".maps");

static __always_inline int count(struct xdp_md *ctx, enum lb_stat reason,
				 int verdict)
{
	__u32 key = reason;
	struct lb_counter *c = bpf_map_lookup_elem(&stats, &key);

	if (c) {
		c->packets++;
		c->bytes += ctx->data_end - ctx->data;
	}
	return verdict;
}

/* Counts an event that has no packet of its own (no bytes). */
static __always_inline void count_event(enum lb_stat reason)
{
	__u32 key = reason;
	struct lb_counter *c = bpf_map_lookup_elem(&stats, &key);

	if (c)
		c->packets++;
}

static __always_inline void count_backend(struct xdp_md *ctx, __u32 id,
					  int new_flow)
{
	struct lb_obj_counter *c = bpf_map_lookup_elem(&be_stats, &id);

	if (c) {
		c->packets++;
		c->bytes += ctx->data_end - ctx->data;
		c->new_flows += new_flow;
	}
}

/* The SYN time a flow's owner keeps (struct flow.syn_t): never 0; 0 (no
 * sample) if handshake latency is not measured (the setting, which the
 * verifier sees: the clock is not read then). */
static __always_inline __u32 hs_now(void)
{
	__u32 t;

	if (hs_latency_off)
		return 0;
	t = bpf_ktime_get_ns() >> 10;
	return t ? t : 1;
}

/* The log2 bucket of a handshake of `us` microseconds: the smallest i with
 * us <= 2^i, the last bucket past 2^(LB_HS_BUCKETS - 2). */
static __always_inline __u32 hs_bucket(__u64 us)
{
	__u64 v;
	__u32 i = 0;

	if (us <= 1)
		return 0;
	if (us > (1ULL << (LB_HS_BUCKETS - 2)))
		return LB_HS_BUCKETS - 1;
	v = us - 1; /* below 2^23: its bit length is the bucket */
	if (v >> 16) {
		v >>= 16;
		i += 16;
	}
	if (v >> 8) {
		v >>= 8;
		i += 8;
	}
	if (v >> 4) {
		v >>= 4;
		i += 4;
	}
	if (v >> 2) {
		v >>= 2;
		i += 2;
	}
	if (v >> 1) {
		v >>= 1;
		i += 1;
	}
	return i + 1;
}

/* The first SYN-ACK of backend `id` to a flow whose SYN came at `syn`
 * (hs_now): one handshake latency sample (none if the SYN time is 0:
 * unknown, or if handshake latency is not measured). */
static __always_inline void count_handshake(__u32 id, __u32 syn)
{
	struct lb_be_hs *h;
	__u32 b;
	__u64 ns;

	if (hs_latency_off || !syn)
		return;
	h = bpf_map_lookup_elem(&be_hs, &id);
	if (!h)
		return;
	ns = (__u64)(__u32)(hs_now() - syn) << 10;
	b = hs_bucket(ns / 1000);
	if (b < LB_HS_BUCKETS)
		h->bucket[b]++;
	h->sum_ns += ns;
}

/* A RST from backend `id` resetting a connection. */
static __always_inline void count_reset(__u32 id)
{
	struct lb_be_hs *h = bpf_map_lookup_elem(&be_hs, &id);

	if (h)
		h->resets++;
}

/* A TCP connection to backend `id`, with state `state`, ends or starts
 * over: if the backend never answered its SYN, that is one unanswered SYN.
 */
static __always_inline void count_unanswered(__u32 id, __u32 state)
{
	struct lb_be_hs *h;

	if (state & LB_CT_REPLIED)
		return;
	h = bpf_map_lookup_elem(&be_hs, &id);
	if (h)
		h->unanswered++;
}

#endif /* LB_MAPS_H */
