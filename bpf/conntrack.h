/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * The connection table's life cycle: a new flow (backend, route, NAT tuple,
 * both entries in ct_new), its promotion to conntrack once answered and
 * confirmed, and a SYN reopening a finished flow on its own tuple.
 */
/* Part of the pipeline (fam.h): compiled once per family. */

/* The service of a packet to `k`: VIP:port, else VIP:0 (every port). */
static __always_inline struct svc_value *FN(service_of)(const FKEY *k)
{
#if LB_V6
	struct svc6_key sk = {
	    .vip = k->daddr, .port = k->dport, .proto = k->proto};
	void *map = &services6;
#else
	struct svc_key sk = {
	    .vip = k->daddr, .port = k->dport, .proto = k->proto};
	void *map = &services;
#endif
	struct svc_value *svc = bpf_map_lookup_elem(map, &sk);

	if (svc)
		return svc;
	sk.port = 0; /* a service on every port of the VIP */
	return bpf_map_lookup_elem(map, &sk);
}

/*
 * A SYN's cold lines, loaded ahead and together: the half-open sets of its
 * key and of the NAT tuple a new flow would try first (the client's port
 * towards the backend Maglev picks), and that tuple's conntrack bucket.
 * The sets are spread over tens of MB, so each first touch is a miss to
 * memory: issued one after the other (the client's set by the lookup, the
 * tuple's by the claim, much later) they cost a memory latency each,
 * issued here they overlap with each other and with the client key's
 * conntrack lookup that follows. Nothing is written. Returns Maglev's
 * pick (its backend id + 1; 0 if none, or if the service has affinity,
 * which may choose otherwise), which flow_new takes rather than look it up
 * again; the tuple it claims itself (the one loaded here, unless the
 * client's port is taken or the route changed meanwhile). A global
 * function (see halfopen.h: ho_where), one frame of 32 bytes.
 */
__noinline int FN(flow_prefetch)(const FKEY *k)
{
	struct svc_value *svc;
	struct lb_nexthop *nh;
	struct backend *be;
	__u32 id, h, n, flags;
	FKEY t = {};

	if (!k)
		return 0;
	svc = FN(service_of)(k);
	if (!svc || (svc->flags & (LB_SVC_DSR | LB_SVC_IPIP)))
		return 0;
	flags = svc->flags;
	h = FN(pick_hash)(k, flags);
	be = backend_pick(svc->id, h, &id);
	if (!be)
		return 0;
	n = SNAT_COUNT;
	if (n) { /* as nat_try's first candidate */
		FN(snat_addr_at)(&t.daddr, h % n);
	} else {
		nh = bpf_map_lookup_elem(&nexthops, &id);
		if (!nh || !nh->ok)
			return 0;
		t.daddr = NH_SADDR(nh);
	}
	t.saddr = BE_ADDR(be);
	t.sport = be->port ? be->port : k->dport;
	t.dport = k->sport;
	t.proto = k->proto;
	FN(ho_touch)(&t);
	FN(ho_touch)(k);
	bpf_map_lookup_elem(&CT, &t);
	/* Maglev's pick, for flow_new (affinity may choose otherwise) */
	return (flags >> LB_SVC_AFFINITY_SHIFT) ? 0 : id + 1;
}

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
					__u64 now, struct FN(new_scratch) * sc,
					__u32 hint)
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
	be = NULL;
	if (hint) { /* backend_pick's answer, from the SYN's prefetch */
		fwd->backend = hint - 1;
		be = backend_of(svc_id, &fwd->backend);
	}
	if (!be)
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
	bpf_loop(NAT_TRIES + 2, FN(nat_try), &loop, 0);
	if (sp->force && sp->result == NAT_NEW)
		count(ctx, LB_NAT_TW_REUSE, 0);
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
