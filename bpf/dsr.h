/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * Direct server return (L2), a service's other forwarding mode: the packet
 * goes to the backend unchanged but for its MACs (the backend holds the VIP
 * on its loopback and answers the client itself; the return path never
 * touches the LB). Every packet of a DSR service is forwarded, not only a
 * SYN: a flow this node has not seen (moved here from another lb node by
 * ECMP) gets the backend the Maglev table gives, which every node computes
 * alike. dsr_flows caches each flow's backend so that a Maglev change
 * (weights, a backend added) does not move established flows; a cached
 * backend that no longer belongs to the service is replaced.
 */
#ifndef LB_DSR_H
#define LB_DSR_H

#include "consts.h"
#include "maps.h"
#include "pkt.h"

/* Whether any service is DSR. */
static __always_inline int dsr_any(void)
{
	__u32 zero = 0, *n = bpf_map_lookup_elem(&dsr_services, &zero);

	return n && *n;
}

/* Whether cached backend `id` still serves service `svc_id` (drained ones
 * do: their flows go on). */
static __always_inline struct backend *dsr_cached(__u32 id, __u32 svc_id)
{
	struct backend *be = bpf_map_lookup_elem(&backends, &id);

	if (!be || !(be->flags & LB_BACKEND_USED) || be->svc != svc_id)
		return NULL;
	return be;
}

/* Forwards a packet of DSR service `svc_id`; its verdict, the counter to
 * count it under in *why, and whether it made a flow in *new_flow. */
static __always_inline int dsr_forward(struct xdp_md *ctx, struct pkt *p,
				       __u32 svc_id, __u32 svc_flags, __u64 now,
				       int *why, int *new_flow)
{
	struct dsr_flow *c = bpf_map_lookup_elem(&dsr_flows, &p->key);
	struct flow f = {};
	struct backend *be = NULL;
	int rc;

	if (c)
		be = dsr_cached(c->backend, svc_id);
	if (be) {
		f.backend = c->backend;
		if (c->seen != now)
			c->seen = now;
	} else {
		struct dsr_flow nc = {.seen = now};

		be = backend_pick(svc_id, pick_hash(&p->key, svc_flags),
				  &f.backend);
		if (!be) {
			*why = LB_DROP_NO_BACKEND;
			return XDP_DROP;
		}
		nc.backend = f.backend;
		bpf_map_update_elem(&dsr_flows, &p->key, &nc, BPF_ANY);
		*new_flow = 1;
	}
	f.daddr = be->ip;
	f.svc = svc_id;
	rc = backend_route(ctx, &f, now);
	if (rc == LB_PASS_NO_ROUTE) {
		*why = LB_PASS_NO_ROUTE;
		return XDP_PASS;
	}
	if (rc) {
		/* The kernel would deliver it to the VIP it holds: drop, and
		 * the backend's neighbour gets resolved (lb resolves it when a
		 * backend is added; a retransmission then goes through). */
		*why = LB_DROP_NO_NEIGH;
		return XDP_DROP;
	}
	count_backend(ctx, f.backend, *new_flow);
	*why = LB_TO_BACKEND;
	return nat_xmit(ctx, p, &f);
}

#endif /* LB_DSR_H */
