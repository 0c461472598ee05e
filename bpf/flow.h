/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * A parsed TCP or UDP packet through the connection table: a packet of a
 * tracked flow is rewritten and sent on; a SYN (or UDP datagram) to a
 * service makes a flow; a SYN on a finished flow's ports reopens it; the
 * rest passes. Part of the pipeline (fam.h): compiled once per family.
 */

static __always_inline int FN(flow_process)(struct xdp_md *ctx,
					    struct verdict_note *n, PKT *p)
{
	FLOW *f, *o;
	FLOW *nf; /* a new flow's entry, set by flow_new (in new_scratch) */
	int slot = -1, verdict; /* the scratch slot taken for a new flow */
	FKEY ok = {};
	__u32 state, hint = 0; /* flow_prefetch's backend */
	__u64 now;
	int why, est = 1, new_flow = 0, routed = 0;

	now = lb_now();
	if (is_syn(p))
		hint = FN(flow_prefetch)(&p->key);
	f = bpf_map_lookup_elem(&CT, &p->key);
	if (!f) {
		est = 0;
		f = FN(ho_lookup)(&p->key);
	}
	if (f && f->dir == LB_DIR_TO_CLIENT) {
		/* From a backend to a NAT tuple: the owner itself. */
		o = f;
		state = o->state;
		if ((state & LB_CT_RECLAIMED) ||
		    FN(ct_expired)(o, state, p->key.proto, est, now) ||
		    ((state & LB_CT_CLOSING) && is_syn(p)))
			return done(ctx, n, LB_PASS_NOT_OURS, XDP_PASS);
		FN(ct_seen)(o, now);
		/* The backend's first answer (an answered flow in conntrack
		 * has the bit, unless a SYN reopened it): if a SYN-ACK, the
		 * handshake's latency. */
		if (!(state & LB_CT_REPLIED) &&
		    !(__sync_fetch_and_or(&o->state, LB_CT_REPLIED) &
		      LB_CT_REPLIED) &&
		    is_synack(p))
			count_handshake(o->backend, o->syn_t);
		if (p->tcp_flags & (TCP_FIN | TCP_RST)) {
			if ((p->tcp_flags & TCP_RST) &&
			    !(state & LB_CT_CLOSING))
				count_reset(o->backend);
			FN(ct_tcp_end)(o, LB_DIR_TO_CLIENT, p->tcp_flags);
		}
		goto xmit;
	}
	if (f) {
		/* A client entry is valid while its owner points back. */
		FN(ct_owner_key)(f, p->key.proto, &ok);
		o = est ? bpf_map_lookup_elem(&CT, &ok) : FN(ho_lookup)(&ok);
		if (!o && !est) {
			/* Promoted by another CPU meanwhile (ct_promote)? */
			FLOW *pf = bpf_map_lookup_elem(&CT, &p->key);

			if (pf) {
				f = pf;
				est = 1;
				FN(ct_owner_key)(f, p->key.proto, &ok);
			}
			/* (or the tuple's owner now: another connection's) */
			o = bpf_map_lookup_elem(&CT, &ok);
		} else if (!o) {
			/* Its tuple given to a new flow since (half-open), or
			 * its owner evicted. */
			o = FN(ho_lookup)(&ok);
		}
		state = o ? o->state : 0;
		if (!o || !FN(ct_owner_of)(o, &p->key) ||
		    (state & LB_CT_RECLAIMED)) {
			/* Its owner gone: evicted from a full table (the
			 * connection is lost); or its tuple given to another
			 * connection (this one had ended). */
			count(ctx, o ? LB_STALE : LB_EVICTED, 0);
			if (est)
				bpf_map_delete_elem(&CT, &p->key);
			else
				FN(ho_delete)(&p->key);
			f = NULL;
		} else if ((is_syn(p) || p->key.proto == IPPROTO_UDP) &&
			   ((state & LB_CT_CLOSING) ||
			    FN(ct_expired)(o, state, p->key.proto, est, now))) {
			/* The client reuses a finished flow's ports: the
			 * backend still knows the tuple (TIME_WAIT), so the
			 * new connection takes the same one, if its backend
			 * still takes flows. (UDP: any packet after
			 * expiry.) */
			if (FN(backend_takes)(f, &p->key)) {
				if (p->key.proto == IPPROTO_TCP) {
					count_unanswered(o->backend, state);
					o->syn_t = hs_now();
				}
				o->state = 0;
				o->seen = now;
				o->created = now;
				count(ctx, LB_REOPEN, 0);
				new_flow = 1;
			} else {
				if (est)
					bpf_map_delete_elem(&CT, &p->key);
				else
					FN(ho_delete)(&p->key);
				f = NULL;
			}
		} else if (FN(ct_expired)(o, state, p->key.proto, est, now)) {
			/* Dead: the kernel answers (RST) and no state is
			 * made. */
			return done(ctx, n, LB_PASS_NOT_OURS, XDP_PASS);
		} else {
			FN(ct_seen)(o, now);
			if (p->tcp_flags & (TCP_FIN | TCP_RST))
				FN(ct_tcp_end)
			(o, LB_DIR_TO_BACKEND, p->tcp_flags);
			if (!est && (state & LB_CT_REPLIED) &&
			    FN(ct_confirms)(p))
				count(ctx, FN(ct_promote)(&p->key, f, &ok, o),
				      0);
		}
	}
	if (!f) {
		struct svc_value *svc;

		/* Only a SYN opens a TCP connection: a stray segment (of a
		 * flow that ended, or a flood of ACKs) goes to the kernel,
		 * which answers with a RST, and costs no table entries;
		 * unless it is for a DSR or IPIP service (any packet there). */
		if (p->key.proto == IPPROTO_TCP && !is_syn(p) && !dsr_any())
			return done(ctx, n, LB_PASS_NOT_OURS, XDP_PASS);
		svc = FN(service_of)(&p->key);
		if (!svc)
			return done(ctx, n, LB_PASS_NOT_OURS, XDP_PASS);
		if (svc->flags & (LB_SVC_DSR | LB_SVC_IPIP)) {
			int dsr_why = 0, dsr_new = 0, act;
#if LB_V6
			/* No stack room for an IPv6 flow beside the rest: the
			 * new-flow scratch. */
			struct FN(new_scratch) *sc = FN(new_scratch_get)(&slot);

			if (!sc)
				return done(ctx, n, LB_DROP_CT_RACE, XDP_DROP);
			__builtin_memset(&sc->fwd, 0, sizeof(sc->fwd));
			act = FN(dsr_forward)(ctx, p, svc->id, svc->flags, now,
					      &dsr_why, &dsr_new, &sc->fwd,
					      &sc->aff);
			FN(new_scratch_put)(slot);
#else
			FLOW df = {};
			struct FN(affinity_work) aw;

			act = FN(dsr_forward)(ctx, p, svc->id, svc->flags, now,
					      &dsr_why, &dsr_new, &df, &aw);
#endif
			if (dsr_new)
				count(ctx, LB_NEW_FLOW, 0);
			n->new_flow = dsr_new;
			return done(ctx, n, dsr_why, act);
		}
		if (p->key.proto == IPPROTO_TCP && !is_syn(p))
			return done(ctx, n, LB_PASS_NOT_OURS, XDP_PASS);
		{
			struct FN(new_scratch) *sc = FN(new_scratch_get)(&slot);

			if (!sc)
				return done(ctx, n, LB_DROP_CT_RACE, XDP_DROP);
			nf = &sc->fwd;
			why = FN(flow_new)(ctx, p, svc->id, svc->flags, now, sc,
					   hint);
		}
		if (why && why != LB_PASS_NO_NEIGH) {
			FN(new_scratch_put)(slot);
			return done(ctx, n, why,
				    why == LB_PASS_NO_ROUTE ? XDP_PASS
							    : XDP_DROP);
		}
		f = nf; /* the entry as written: no need to look it up */
		new_flow = 1;
		routed = 1;
	}
	/* A flow whose next hop was unresolved: try again (a new flow has
	 * just tried). */
	if (!f->nh_ok && !routed &&
	    FN(flow_route)(ctx, f, 0) == LB_PASS_NO_ROUTE)
		return done(ctx, n, LB_PASS_NO_ROUTE, XDP_PASS);

xmit:
	if (p->frag && f->nh_ok)
		FN(frag_first)(p, f, now);
	FN(nat_rewrite)(ctx, p, f);
	count_backend(ctx, f->backend, new_flow);
	if (new_flow)
		count(ctx, LB_NEW_FLOW, 0);
	n->new_flow = new_flow;
	if (!f->nh_ok) /* the kernel forwards it, resolving the neighbour */
		verdict = done(ctx, n, LB_PASS_NO_NEIGH, XDP_PASS);
	else
		verdict = done(ctx, n,
			       f->dir == LB_DIR_TO_BACKEND ? LB_TO_BACKEND
							   : LB_TO_CLIENT,
			       FN(nat_xmit)(ctx, p, f));
	FN(new_scratch_put)(slot);
	return verdict;
}
