/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * The connection table's life cycle: a new flow (backend, route, NAT tuple,
 * both entries in ct_new), its promotion to conntrack once answered and
 * confirmed, and a SYN reopening a finished flow on its own tuple.
 */
#ifndef LB_CONNTRACK_H
#define LB_CONNTRACK_H

#include "consts.h"
#include "ctstate.h"
#include "maps.h"
#include "nat.h"
#include "natport.h"
#include "route.h"
#include "select.h"

/* A client packet that confirms an answered half-open flow: TCP, the
 * handshake's ACK (or any later segment); UDP, any packet after a reply. */
static __always_inline int ct_confirms(const struct pkt *p)
{
	return p->key.proto == IPPROTO_UDP ||
	       (p->tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST)) == TCP_ACK;
}

/*
 * Moves an answered, confirmed connection from ct_new to conntrack, where
 * half-open flows cannot evict it: the owner first (BPF_NOEXIST, so one CPU
 * does it), then the client entry. Returns the counter to bump.
 */
static __always_inline int ct_promote(const struct flow_key *ck, struct flow *f,
				      const struct flow_key *ok, struct flow *o)
{
	if (bpf_map_update_elem(&conntrack, ok, o, BPF_NOEXIST))
		return LB_EST_FULL; /* another CPU's, or no room */
	if (bpf_map_update_elem(&conntrack, ck, f, BPF_ANY)) {
		bpf_map_delete_elem(&conntrack, ok);
		return LB_EST_FULL;
	}
	bpf_map_delete_elem(&ct_new, ck);
	bpf_map_delete_elem(&ct_new, ok);
	return LB_ESTABLISHED;
}

/*
 * First packet of a flow to a service: pick a backend (Maglev), route to it,
 * claim a NAT tuple (see natport.h) and record both directions in ct_new.
 * Fills *fwd with the client->backend entry and returns 0 (or
 * LB_PASS_NO_NEIGH: recorded, next hop not resolved yet), or the counter
 * that says why the flow could not be made.
 */
static __always_inline int flow_new(struct xdp_md *ctx, struct pkt *p,
				    __u32 svc_id, __u32 svc_flags, __u64 now,
				    struct flow *fwd)
{
	struct nat_search s = {};
	struct backend *be;
	__u32 *cursor;
	int rc;

	__builtin_memset(fwd, 0, sizeof(*fwd));
	s.h = pick_hash(&p->key, svc_flags);
	be = backend_pick(svc_id, s.h, &fwd->backend);
	if (!be)
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

	/* The owner: the way back to the client, where this packet came
	 * from. */
	s.rev.saddr = p->key.daddr;
	s.rev.daddr = p->key.saddr;
	s.rev.sport = p->key.dport;
	s.rev.dport = p->key.sport;
	s.rev.ifindex = ctx->ingress_ifindex;
	__builtin_memcpy(s.rev.smac, p->eth->h_dest, ETH_ALEN);
	__builtin_memcpy(s.rev.dmac, p->eth->h_source, ETH_ALEN);
	s.rev.nh_ok = 1;
	s.rev.backend = fwd->backend;
	s.rev.svc = svc_id;
	s.rev.dir = LB_DIR_TO_CLIENT;
	s.rev.created = now;
	s.rev.seen = now;
	if (p->key.proto == IPPROTO_TCP)
		s.rev.syn_t = hs_now(); /* the handshake's start */

	s.ck = p->key;
	s.t.saddr = fwd->daddr;
	s.t.sport = fwd->dport;
	s.t.proto = p->key.proto;
	s.fib_saddr = fwd->saddr;
	s.now = now;
	cursor = bpf_map_lookup_elem(&nat_cursor, &fwd->backend);
	if (!cursor)
		return LB_DROP_NAT_FULL;
	s.cursor = *cursor;
	bpf_loop(NAT_TRIES + 1, nat_try, &s, 0);
	/* The next search starts past the tuple taken, or past the ones
	 * tried in order if none was free. */
	if (s.result == NAT_TAKEN) {
		__sync_fetch_and_add(cursor, NAT_LINEAR);
		return LB_DROP_NAT_FULL;
	}
	if (s.tries)
		__sync_fetch_and_add(cursor, nat_step(s.tries) + 1);
	fwd->saddr = s.t.daddr;
	fwd->sport = s.t.dport;

	if (s.result == NAT_OURS_EST)
		bpf_map_update_elem(&conntrack, &p->key, fwd, BPF_ANY);
	else if (s.result == NAT_OURS_NEW)
		bpf_map_update_elem(&ct_new, &p->key, fwd, BPF_ANY);
	else if (bpf_map_update_elem(&ct_new, &p->key, fwd, BPF_NOEXIST)) {
		struct flow *other = bpf_map_lookup_elem(&ct_new, &p->key);

		/* The same SYN on another CPU: fine if it found our tuple;
		 * if it made the flow with another, give ours back. */
		if (other && other->saddr == s.t.daddr &&
		    other->sport == s.t.dport && other->daddr == s.t.saddr)
			return rc;
		bpf_map_delete_elem(&ct_new, &s.t);
		return LB_DROP_CT_RACE;
	}
	return rc; /* 0, or LB_PASS_NO_NEIGH */
}

#endif /* LB_CONNTRACK_H */
