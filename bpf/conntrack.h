/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/* Connection tracking: flow lookup, state, expiry, and new flows. */
#ifndef LB_CONNTRACK_H
#define LB_CONNTRACK_H

#include "consts.h"
#include "maps.h"
#include "nat.h"

/* NAT ports tried for a new flow before giving up (a full range). */
#define NAT_TRIES 16

/* The clock: jiffies (HZ ticks a second). The JIT inlines bpf_jiffies64 to
 * one load, where bpf_ktime_get_coarse_ns costs a call (~20 ns here). */
static __always_inline __u32 lb_now(void)
{
	return (__u32)bpf_jiffies64();
}

/* murmur3 finaliser: cheap, and every input bit reaches every output bit. */
static __always_inline __u32 mix32(__u32 h)
{
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

static __always_inline __u32 flow_hash(const struct flow_key *k)
{
	__u32 ports = ((__u32)k->sport << 16) | k->dport;

	return mix32(k->saddr ^ mix32(k->daddr ^ mix32(ports ^ k->proto)));
}

static __always_inline int flow_expired(const struct flow *f, __u8 proto,
					__u32 now)
{
	__u32 timeout = (f->state & LB_CT_CLOSING) ? fin_timeout
			: proto == IPPROTO_TCP	   ? tcp_timeout
						   : udp_timeout;

	return now - f->seen > timeout;
}

/* The key of the other direction of the connection `f` belongs to. */
static __always_inline void flow_peer_key(const struct flow *f, __u8 proto,
					  struct flow_key *peer)
{
	peer->saddr = f->daddr;
	peer->daddr = f->saddr;
	peer->sport = f->dport;
	peer->dport = f->sport;
	peer->proto = proto;
}

static __always_inline struct flow *flow_peer(const struct flow *f, __u8 proto)
{
	struct flow_key peer = {};

	flow_peer_key(f, proto, &peer);
	return bpf_map_lookup_elem(&conntrack, &peer);
}

/*
 * A packet keeps its connection alive, both directions: a one-way stream
 * must not lose its way back (or its NAT port) while it flows. Written at
 * most once a tick.
 */
static __always_inline void flow_touch(struct flow *f, __u8 proto, __u32 now)
{
	struct flow *pf;

	if (f->seen == now)
		return;
	f->seen = now;
	pf = flow_peer(f, proto);
	if (pf && pf->seen != now)
		pf->seen = now;
}

/*
 * TCP end: a RST closes both directions at once; a FIN half-closes its own
 * direction, and the connection is closing once both sides sent one. A
 * closing connection lingers for fin_timeout.
 */
static __always_inline void flow_tcp_end(struct flow *f, __u8 tcp_flags)
{
	struct flow *pf;

	if (f->state & LB_CT_CLOSING)
		return;
	if (!(tcp_flags & TCP_RST) && (f->state & LB_CT_FIN))
		return; /* a repeated FIN */
	pf = flow_peer(f, IPPROTO_TCP);
	if ((tcp_flags & TCP_RST) || (pf && (pf->state & LB_CT_FIN))) {
		f->state = LB_CT_CLOSING;
		if (pf)
			pf->state = LB_CT_CLOSING;
	} else {
		f->state |= LB_CT_FIN;
	}
}

/* Resolve the next hop towards f->daddr into f; 0 on success, else the
 * counter that says why not. */
static __always_inline int flow_route(struct xdp_md *ctx, struct flow *f,
				      __u32 flags)
{
	struct bpf_fib_lookup fib = {};
	long rc;

	fib.family = AF_INET;
	fib.ifindex = ctx->ingress_ifindex;
	fib.ipv4_src = f->saddr;
	fib.ipv4_dst = f->daddr;
	rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), flags);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return LB_PASS_NO_ROUTE;
	if (flags & BPF_FIB_LOOKUP_SRC)
		f->saddr = fib.ipv4_src;
	f->ifindex = fib.ifindex;
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return LB_PASS_NO_NEIGH;
	__builtin_memcpy(f->smac, fib.smac, ETH_ALEN);
	__builtin_memcpy(f->dmac, fib.dmac, ETH_ALEN);
	f->nh_ok = 1;
	return 0;
}

/*
 * The next hop towards a backend, from the per-backend cache while it is
 * fresh (nh_ttl), else from the FIB (which also gives the LB's source
 * address on the egress interface) and then cached. 0, or the counter that
 * says why not.
 */
static __always_inline int backend_route(struct xdp_md *ctx, struct flow *f,
					 __u32 now)
{
	struct lb_nexthop *nh = bpf_map_lookup_elem(&nexthops, &f->backend);
	int rc;

	if (nh && nh->ok && nh->daddr == f->daddr &&
	    now - nh->checked < nh_ttl) {
		f->saddr = nh->saddr;
		f->ifindex = nh->ifindex;
		__builtin_memcpy(f->smac, nh->smac, ETH_ALEN);
		__builtin_memcpy(f->dmac, nh->dmac, ETH_ALEN);
		f->nh_ok = 1;
		return 0;
	}
	rc = flow_route(ctx, f, BPF_FIB_LOOKUP_SRC);
	if (rc == LB_PASS_NO_ROUTE || !f->saddr)
		return LB_PASS_NO_ROUTE;
	if (nh && rc == 0) {
		nh->daddr = f->daddr;
		nh->saddr = f->saddr;
		nh->ifindex = f->ifindex;
		__builtin_memcpy(nh->smac, f->smac, ETH_ALEN);
		__builtin_memcpy(nh->dmac, f->dmac, ETH_ALEN);
		nh->checked = now;
		nh->ok = 1;
	}
	return rc;
}

/*
 * First packet of a flow to a service: pick a backend (Maglev), route to it,
 * allocate a NAT source port that no live flow to that backend uses, and
 * record both directions. Fills *fwd with the client->backend entry and
 * returns 0 (or LB_PASS_NO_NEIGH: recorded, next hop not resolved yet), or
 * the counter that says why the flow could not be made.
 */
static __always_inline int flow_new(struct xdp_md *ctx, struct pkt *p,
				    __u32 svc_id, __u32 now, struct flow *fwd)
{
	struct flow rev = {};
	struct flow_key rk = {};
	struct backend *be;
	void *table;
	__u32 h, slot, *bid, range, base;
	int rc;

	__builtin_memset(fwd, 0, sizeof(*fwd));
	h = flow_hash(&p->key);
	table = bpf_map_lookup_elem(&maglev, &svc_id);
	if (!table)
		return LB_DROP_NO_BACKEND;
	slot = h % maglev_size;
	bid = bpf_map_lookup_elem(table, &slot);
	if (!bid || *bid == LB_NO_BACKEND)
		return LB_DROP_NO_BACKEND;
	fwd->backend = *bid;
	be = bpf_map_lookup_elem(&backends, &fwd->backend);
	if (!be || !(be->flags & LB_BACKEND_USED))
		return LB_DROP_NO_BACKEND;

	fwd->daddr = be->ip;
	fwd->dport = be->port ? be->port : p->key.dport;
	fwd->svc = svc_id;
	fwd->dir = LB_DIR_TO_BACKEND;
	fwd->created = now;
	fwd->seen = now;
	rc = backend_route(ctx, fwd, now);
	if (rc == LB_PASS_NO_ROUTE)
		return rc;

	/* The way back to the client: where this packet came from. */
	rev.saddr = p->key.daddr;
	rev.daddr = p->key.saddr;
	rev.sport = p->key.dport;
	rev.dport = p->key.sport;
	rev.ifindex = ctx->ingress_ifindex;
	__builtin_memcpy(rev.smac, p->eth->h_dest, ETH_ALEN);
	__builtin_memcpy(rev.dmac, p->eth->h_source, ETH_ALEN);
	rev.nh_ok = 1;
	rev.backend = fwd->backend;
	rev.svc = svc_id;
	rev.dir = LB_DIR_TO_CLIENT;
	rev.created = now;
	rev.seen = now;

	/* A NAT port whose way back is free (or dead): try to claim it
	 * outright, and look only when that fails. */
	rk.saddr = fwd->daddr;
	rk.daddr = fwd->saddr;
	rk.sport = fwd->dport;
	rk.proto = p->key.proto;
	range = nat_port_hi - nat_port_lo + 1;
	base = mix32(h ^ 0x9e3779b9);
	for (int i = 0; i < NAT_TRIES; i++) {
		__u16 port = nat_port_lo + (base + i * 7919) % range;

		rk.dport = bpf_htons(port);
		if (bpf_map_update_elem(&conntrack, &rk, &rev, BPF_NOEXIST)) {
			struct flow *old = bpf_map_lookup_elem(&conntrack, &rk);

			if (old && !flow_expired(old, rk.proto, now))
				continue;
			if (bpf_map_update_elem(&conntrack, &rk, &rev, BPF_ANY))
				continue;
		}
		fwd->sport = rk.dport;
		if (bpf_map_update_elem(&conntrack, &p->key, fwd, BPF_ANY)) {
			bpf_map_delete_elem(&conntrack, &rk);
			return LB_DROP_CT_FULL;
		}
		return rc; /* 0, or LB_PASS_NO_NEIGH */
	}
	return LB_DROP_NAT_FULL;
}

#endif /* LB_CONNTRACK_H */
