/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * The connection table's life cycle: a new flow (backend, route, NAT tuple,
 * both entries in ct_new), its promotion to conntrack once answered and
 * confirmed, and a SYN reopening a finished flow on its own tuple.
 */
/* Part of the pipeline (fam.h): compiled once per family. */

/* A client packet that confirms an answered half-open flow: TCP, the
 * handshake's ACK (or any later segment); UDP, any packet after a reply. */
static __always_inline int FN(ct_confirms)(const PKT *p)
{
	return p->key.proto == IPPROTO_UDP ||
	       (p->tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST)) == TCP_ACK;
}

/*
 * Moves an answered, confirmed connection from ct_new to conntrack, where
 * half-open flows cannot evict it: the owner first (BPF_NOEXIST, so one CPU
 * does it), then the client entry. Returns the counter to bump.
 */
static __always_inline int FN(ct_promote)(const FKEY *ck, FLOW *f,
					  const FKEY *ok, FLOW *o)
{
	if (bpf_map_update_elem(&CT, ok, o, BPF_NOEXIST))
		return LB_EST_FULL; /* another CPU's, or no room */
	if (bpf_map_update_elem(&CT, ck, f, BPF_ANY)) {
		bpf_map_delete_elem(&CT, ok);
		return LB_EST_FULL;
	}
	FN(ho_delete)(ck);
	FN(ho_delete)(ok);
	return LB_ESTABLISHED;
}

/*
 * First packet of a flow to a service: pick a backend (Maglev), route to it,
 * claim a NAT tuple (see natport.h) and record both directions in ct_new.
 * Works in scratch slot `sc`; fills sc->fwd with the client->backend entry and
 * returns 0 (or LB_PASS_NO_NEIGH: recorded, next hop not resolved yet), or the
 * counter that says why the flow could not be made.
 */
static __always_inline int FN(flow_new)(struct xdp_md *ctx, PKT *p,
					__u32 svc_id, __u32 svc_flags,
					__u64 now, struct FN(new_scratch) * sc)
{
	FLOW *fwd = &sc->fwd;
	struct FN(nat_search) *sp = &sc->s;
	struct FN(nat_loop) loop = {sp};
	struct backend *be;
	__u32 *cursor;
	int rc;

	__builtin_memset(sp, 0, sizeof(*sp));
	__builtin_memset(fwd, 0, sizeof(*fwd));
	sp->h = FN(pick_hash)(&p->key, svc_flags);
	be = FN(backend_select)(svc_id, svc_flags, &p->key, sp->h, now,
				&fwd->backend, &sc->aff);
	if (!be)
		return LB_DROP_NO_BACKEND;
	fwd->daddr = BE_ADDR(be);
	fwd->dport = be->port ? be->port : p->key.dport;
	fwd->svc = svc_id;
	fwd->dir = LB_DIR_TO_BACKEND;
	fwd->created = now;
	fwd->seen = now;
	rc = FN(backend_route)(ctx, fwd, now);
	if (rc == LB_PASS_NO_ROUTE)
		return rc;

	/* The owner: the way back to the client, where this packet came
	 * from. */
	sp->rev.saddr = p->key.daddr;
	sp->rev.daddr = p->key.saddr;
	sp->rev.sport = p->key.dport;
	sp->rev.dport = p->key.sport;
	sp->rev.ifindex = ctx->ingress_ifindex;
	__builtin_memcpy(sp->rev.smac, p->eth->h_dest, ETH_ALEN);
	__builtin_memcpy(sp->rev.dmac, p->eth->h_source, ETH_ALEN);
	sp->rev.nh_ok = 1;
	sp->rev.backend = fwd->backend;
	sp->rev.svc = svc_id;
	sp->rev.dir = LB_DIR_TO_CLIENT;
	sp->rev.created = now;
	sp->rev.seen = now;
	if (p->key.proto == IPPROTO_TCP)
		sp->rev.syn_t = hs_now(); /* the handshake's start, or 0 */

	sp->ck = p->key;
	sp->t.saddr = fwd->daddr;
	sp->t.sport = fwd->dport;
	sp->t.proto = p->key.proto;
	sp->fib_saddr = fwd->saddr;
	sp->now = now;
	cursor = bpf_map_lookup_elem(&nat_cursor, &fwd->backend);
	if (!cursor)
		return LB_DROP_NAT_FULL;
	sp->cursor = *cursor;
	bpf_loop(NAT_TRIES + 1, FN(nat_try), &loop, 0);
	/* The next search starts past the tuple taken, or past the ones
	 * tried in order if none was free. */
	if (sp->result == NAT_TAKEN) {
		__sync_fetch_and_add(cursor, NAT_LINEAR);
		return LB_DROP_NAT_FULL;
	}
	if (sp->tries)
		__sync_fetch_and_add(cursor, nat_step(sp->tries) + 1);
	fwd->saddr = sp->t.daddr;
	fwd->sport = sp->t.dport;

	if (sp->result == NAT_OURS_EST)
		bpf_map_update_elem(&CT, &p->key, fwd, BPF_ANY);
	else if (sp->result == NAT_OURS_NEW)
		FN(ho_insert)(&p->key, fwd);
	else if (FN(ho_add)(&p->key, fwd)) {
		FLOW *other = FN(ho_lookup)(&p->key);

		/* The same SYN on another CPU: fine if it found our tuple;
		 * if it made the flow with another, give ours back. */
		if (other && ADDR_EQ(other->saddr, sp->t.daddr) &&
		    other->sport == sp->t.dport &&
		    ADDR_EQ(other->daddr, sp->t.saddr))
			return rc;
		FN(ho_delete)(&sp->t);
		return LB_DROP_CT_RACE;
	}
	return rc; /* 0, or LB_PASS_NO_NEIGH */
}

/* The entry that rewrites packets keyed `k` (in conntrack or ct_new), if it
 * belongs to a live connection (a client entry's owner must point back):
 * what an ICMP error quoting such a packet is matched by. */
static __always_inline FLOW *FN(ct_live_entry)(const FKEY *k, __u64 now)
{
	FKEY ok = {};
	FLOW *f, *o;
	int est = 1;

	f = bpf_map_lookup_elem(&CT, k);
	if (!f) {
		est = 0;
		f = FN(ho_lookup)(k);
		if (!f)
			return NULL;
	}
	o = f;
	if (f->dir == LB_DIR_TO_BACKEND) {
		FN(ct_owner_key)(f, k->proto, &ok);
		o = est ? bpf_map_lookup_elem(&CT, &ok) : FN(ho_lookup)(&ok);
		if (!o || !FN(ct_owner_of)(o, k))
			return NULL;
	}
	if ((o->state & LB_CT_RECLAIMED) ||
	    FN(ct_expired)(o, o->state, k->proto, est, now) || !f->nh_ok)
		return NULL;
	return f;
}
