/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/* Types shared by the XDP program and the Rust CLI (through the skeleton). */
#ifndef LB_H
#define LB_H

/*
 * The enums below are the constants shared with the Rust side: they reach
 * it through BTF (struct lb_shared, anchored in lb.bpf.c), as the
 * skeleton's generated types. Add a shared constant here, not a #define.
 */
enum lb_limits {
	/* Capacities of the fixed-size maps. */
	LB_MAX_SERVICES = 1024,
	LB_MAX_BACKENDS = 8192,
	LB_MAX_IFACES = 64,
	/* Most SNAT source addresses and NAT port ranges an instance has. */
	LB_MAX_SNAT = 16,
	LB_MAX_PORT_RANGES = 2,
	/* Entries a set of the half-open table holds (maps.h, halfopen.h). */
	LB_HO_WAYS = 3,
	/* Random 64-bit keys of the half-open tables' hash (halfopen.h):
	 * one, and one per 32-bit word of the longest key (IPv6: 10). */
	LB_HO_KEYS = 11,
	/* Buckets of a backend's handshake latency histogram (struct
	 * lb_be_hs): bucket i < LB_HS_BUCKETS - 1 counts handshakes of at
	 * most 2^i microseconds (1 us .. 8.4 s), the last the longer ones. */
	LB_HS_BUCKETS = 25,
};

/* Entry of a Maglev table meaning: no backend takes new flows. */
#define LB_NO_BACKEND 0xffffffff

/*
 * Why a packet got its verdict. Index of the per-CPU `stats` map; the Rust
 * side names each counter after its variant, without LB_ and in lower case
 * (LB_DROP_NAT_FULL: drop_nat_full). Values from 0 in order, LB_STAT_MAX
 * last; a renamed variant renames a counter users see.
 */
enum lb_stat {
	LB_TO_BACKEND = 0, /* client -> VIP, rewritten to a backend */
	LB_TO_CLIENT,	   /* backend -> LB, rewritten to the client */
	LB_NEW_FLOW,	   /* of LB_TO_BACKEND: first packet of a flow */
	LB_PASS_NOT_IP,	   /* ARP, VLAN, ...: neither IPv4 nor IPv6 */
	LB_PASS_NOT_L4,	   /* ICMP, NDP, SCTP, IPv6 extension headers lb does
			      not skip, ...: not TCP or UDP */
	LB_PASS_NOT_OURS,  /* no flow, no service: the host's own traffic */
	LB_PASS_MALFORMED, /* truncated header, IHL < 5, bad lengths */
	LB_PASS_FRAGMENT,  /* IP fragment: no ports to look up */
	LB_PASS_NO_ROUTE,  /* FIB has no usable route to the backend */
	LB_PASS_NO_NEIGH,  /* next hop unresolved: rewritten, kernel forwards */
	LB_DROP_NO_BACKEND, /* service without a backend taking new flows */
	LB_DROP_NAT_FULL,   /* no free NAT port towards the backend */
	LB_REOPEN,	    /* of LB_TO_BACKEND: a SYN reopened a closed flow */
	LB_ESTABLISHED,	    /* of LB_TO_BACKEND: answered, moved to conntrack */
	LB_EST_FULL, /* conntrack refused an answered flow: kept half-open */
	LB_STALE,    /* client entry whose NAT tuple another connection has */
	LB_DROP_CT_RACE, /* a SYN lost a race with its own copy on another CPU
			  */
	LB_ICMP_ERROR,	 /* an ICMP error about a tracked flow, translated and
			    sent to the flow's other end */
	LB_FRAGMENT,	 /* of LB_TO_BACKEND/LB_TO_CLIENT: a later fragment of a
			    datagram whose first fragment was forwarded */
	LB_EVICTED,	 /* client entry whose owner a full table evicted: a
			    connection lost (--max-flows, --max-half-open) */
	LB_DROP_NO_NEIGH,     /* DSR: the backend's MAC is not resolved yet (the
				 kernel cannot forward for a VIP it holds) */
	LB_DROP_TOO_BIG,      /* IPIP: with the outer header the packet would
				 exceed the egress interface's MTU */
	LB_HALF_OPEN_EVICTED, /* a half-open entry replaced by a newer one in
				 its full set of ct_new (a SYN flood, or
				 --max-half-open too small) */
	LB_NAT_TW_REUSE, /* of LB_NEW_FLOW: every NAT tuple tried was held, and
			    the flow took a finished connection's within the
			    backend's TIME_WAIT (ct_tw_held) */
	LB_STAT_MAX,
};

/* `lb trace`: the headers of a packet as it came and as lb sent it on, and
 * what lb did, for each packet traced (bpf/trace.h). */
#define LB_TRACE_HDR 96 /* bytes of each frame kept (headers) */

struct lb_trace_event {
	__u64 ns;      /* bpf_ktime_get_ns */
	__u32 ifindex; /* where it came in */
	__u32 len;     /* its length */
	__u16 verdict; /* XDP_* */
	__u16 reason;  /* enum lb_stat: the counter it was counted under */
	__u8 new_flow; /* it made (or reopened) a flow */
	__u8 in_len;   /* bytes kept of the frame as it came */
	__u8 pad[2];
	__u8 in[LB_TRACE_HDR];
	__u8 out[LB_TRACE_HDR]; /* the same bytes as lb left them */
};

/* Whether and how to trace, per CPU: written by `lb trace` (the same for
 * every CPU), with the CPU's packet being traced kept until it is sent. */
struct lb_trace_cfg {
	__u32 on;     /* a tracer is reading the ring buffer */
	__u32 sample; /* trace 1 packet in `sample` (0, 1: all) */
	__u64 until;  /* jiffies: stop unless the tracer renews it */
	__u64 lost;   /* events the full ring buffer refused (this CPU's) */
	/* The packet in hand (the program's, not the tracer's): */
	__u32 pending; /* its `in` part is filled */
	__u32 pad;
	struct lb_trace_event ev;
};

/* One per-CPU counter slot. */
struct lb_counter {
	__u64 packets;
	__u64 bytes;
};

/* Per-CPU counters of a backend (a service's are the sum of its backends'). */
struct lb_obj_counter {
	__u64 packets;
	__u64 bytes;
	__u64 new_flows;
};

/*
 * Per-CPU handshake numbers of a backend (map be_hs): the time from a new
 * TCP flow's first SYN to the backend's first SYN-ACK, as a histogram of
 * log2 buckets (see LB_HS_BUCKETS) and a sum; the RSTs it sent that reset
 * a connection; and the flows whose SYN it never answered.
 */
struct lb_be_hs {
	__u64 bucket[LB_HS_BUCKETS];
	__u64 sum_ns; /* of the handshakes counted in `bucket` */
	__u64 resets; /* RSTs towards a client, of a connection not closing */
	__u64 unanswered; /* SYNs never answered (when the tuple is reused) */
};

/* An IPv6 address: four network-order words. */
struct lb_in6 {
	__be32 w[4];
};

/* A service: VIP:port/proto (port 0: every port of the VIP). IPv4 services
 * are in `services`, IPv6 ones in `services6`; both give a svc_value. */
struct svc_key {
	__be32 vip;
	__be16 port;
	__u8 proto;
	__u8 pad;
};

struct svc6_key {
	struct lb_in6 vip;
	__be16 port;
	__u8 proto;
	__u8 pad;
};

struct svc_value {
	__u32 id;    /* index of the service's Maglev table */
	__u32 flags; /* enum svc_flags */
};

enum svc_flags {
	/* Direct server return (L2): only the destination MAC changes, the
	 * backend answers the client itself (bpf/dsr.h). */
	LB_SVC_DSR = 1,
	/* Client affinity: a new flow's backend from the hash of the client
	 * address alone, so all of a client's connections go to one. */
	LB_SVC_CLIENT_IP = 2,
	/* IP-in-IP: the packet, unchanged, in an outer IPv4 header LB ->
	 * backend; the backend decapsulates it and answers the client itself
	 * (bpf/ipip.h). Never with LB_SVC_DSR. */
	LB_SVC_IPIP = 4,
	/* The scheduler (the datapath does not read these: lb run adjusts
	 * the Maglev weights of such a service). */
	LB_SVC_LEAST_CONN = 0x100,
	LB_SVC_LATENCY = 0x200,
	/* Client affinity with a timeout: the flags' bits from this one are
	 * the timeout in seconds (0: none). A client's new flow within it of
	 * its last one goes to the backend it had, if that backend still
	 * takes flows (the affinity maps, select.h). */
	LB_SVC_AFFINITY_SHIFT = 16,
};

/* A backend, indexed by its id; of its service's family. */
struct backend {
	__be32 ip;   /* IPv4 */
	__be16 port; /* 0: the port the client used */
	__u16 flags; /* LB_BACKEND_* */
	__u32 svc;   /* id of its service */
	__u32 weight;
	struct lb_in6 ip6; /* IPv6 */
};

/* Bits of backend.flags. */
enum backend_flags {
	LB_BACKEND_USED = 1,
};

/* Cached next hop towards a backend. */
struct lb_nexthop {
	__be32 daddr; /* the backend it was resolved for */
	__be32 saddr; /* the LB's address on the egress interface */
	__u32 ifindex;
	__u8 smac[6];
	__u8 dmac[6];
	__u32 checked; /* clock ticks of the FIB lookup */
	__u32 ok;
	/* An IPv6 backend's: daddr and saddr are 0 then. */
	struct lb_in6 daddr6;
	struct lb_in6 saddr6;
};

/* A datagram's fragments: what they share (RFC 791). */
struct frag_key {
	__be32 saddr;
	__be32 daddr;
	__be16 id;
	__u8 proto;
	__u8 pad;
};

/* An IPv6 datagram's fragments: what they share (RFC 8200 4.5). */
struct frag6_key {
	struct lb_in6 saddr;
	struct lb_in6 daddr;
	__be32 id;
	__u8 proto;
	__u8 pad[3];
};

/* Connection table key: a packet's addresses, ports and protocol. */
struct flow_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

enum flow_dir {
	LB_DIR_TO_BACKEND = 0,
	LB_DIR_TO_CLIENT = 1,
};

/* Bits of flow.state, kept in the connection's owner entry only. */
enum flow_state {
	LB_CT_OPEN = 0,
	LB_CT_CLOSING = 1, /* RST, or FIN both ways: lingers for fin_timeout */
	LB_CT_FIN_FWD = 2, /* the client sent FIN */
	LB_CT_FIN_REV = 4, /* the backend sent FIN */
	LB_CT_REPLIED = 8, /* the backend answered */
	LB_CT_RECLAIMED = 16, /* its NAT tuple is being given to a new flow */
};

/*
 * Connection table value: how to rewrite a packet of this flow and where to
 * send it. Two entries per connection, in the same table:
 *   - the client's, keyed client -> VIP (dir LB_DIR_TO_BACKEND);
 *   - the owner, keyed by the NAT tuple backend -> SNAT:port
 *     (dir LB_DIR_TO_CLIENT). The owner alone holds the connection's state
 *     and clock, and owns its NAT tuple: the client's entry is valid only
 *     while its owner exists and points back at it, so a connection lives
 *     or dies as a whole and a NAT tuple is never shared.
 * Half-open connections live in ct_new; answered ones in conntrack.
 */
struct flow {
	__be32 saddr;  /* new source address */
	__be32 daddr;  /* new destination address */
	__be16 sport;  /* new source port */
	__be16 dport;  /* new destination port */
	__u32 ifindex; /* egress interface */
	__u8 smac[6];
	__u8 dmac[6];
	__u32 backend; /* backend id */
	__u32 svc;     /* service id */
	__u32 state;   /* owner: enum flow_state bits, changed atomically */
	__u8 dir;      /* enum flow_dir */
	__u8 nh_ok;    /* smac/dmac/ifindex resolved */
	__u16 pad;
	/* Owner, TCP: bpf_ktime_get_ns() >> 10 (units of 1.024 us, wrapping
	 * every 73 minutes) at the flow's first SYN, 0 if unknown; for the
	 * handshake latency. (In what was padding: no memory cost.) */
	__u32 syn_t;
	__u64 created; /* clock ticks (jiffies, see lb_now) */
	__u64 seen;    /* owner: clock ticks of the last packet either way */
};

/* The IPv6 connection table's key and value (conntrack6, ct_new6): as
 * flow_key and flow, with IPv6 addresses. */
struct flow6_key {
	struct lb_in6 saddr;
	struct lb_in6 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct flow6 {
	struct lb_in6 saddr;
	struct lb_in6 daddr;
	__be16 sport;
	__be16 dport;
	__u32 ifindex;
	__u8 smac[6];
	__u8 dmac[6];
	__u32 backend;
	__u32 svc;
	__u32 state;
	__u8 dir;
	__u8 nh_ok;
	__u16 pad;
	__u32 syn_t;
	__u64 created;
	__u64 seen;
};

/*
 * Never read by the datapath: a global of this type (lb.bpf.c) puts the
 * enums above into BTF, which clang leaves out for enums only used in
 * code, so the skeleton generates them for the Rust side.
 */
struct lb_shared {
	enum lb_limits limits;
	enum lb_stat stat;
	enum flow_dir dir;
	enum flow_state state;
	enum backend_flags backend_flags;
	enum svc_flags svc_flags;
};

#endif /* LB_H */
