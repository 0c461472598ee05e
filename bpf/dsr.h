/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * The forwarding modes in which the backend answers the client itself:
 * direct server return (L2: the packet goes to the backend unchanged but
 * for its MACs, so the backend must be on the LB's link) and IP-in-IP (the
 * packet, unchanged, in an outer header to the backend, anywhere it is
 * routed: ipip.h). The backend holds the VIP on its loopback; the return
 * path never touches the LB. The two share everything but the rewrite:
 *
 * Every packet of such a service is forwarded, not only a SYN: a flow this
 * node has not seen (moved here from another lb node by ECMP) gets the
 * backend the Maglev table gives, which every node computes alike.
 * dsr_flows caches each flow's backend so that a Maglev change (weights, a
 * backend added) does not move established flows; a cached backend that no
 * longer belongs to the service is replaced. Part of the pipeline (fam.h):
 * the forwarding once per family.
 */
#ifndef LB_DSR_ONCE
#define LB_DSR_ONCE

#include "consts.h"
#include "maps.h"
#include "pkt.h"

/* Whether any service is DSR or IPIP (the CLI counts both). */
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

#endif /* LB_DSR_ONCE */

/* Forwards a packet of DSR or IPIP service `svc_id` (by svc_flags); its
 * verdict, the counter to count it under in *why, and whether it made a
 * flow in *new_flow. A flow is cached (made) once its packet goes on. The
 * next hop is worked out in `f`, zeroed by the caller; `aw` is client
 * affinity's work space (backend_select). */
static __always_inline int FN(dsr_forward)(struct xdp_md *ctx, PKT *p,
					   __u32 svc_id, __u32 svc_flags,
					   __u64 now, int *why, int *new_flow,
					   FLOW *f,
					   struct FN(affinity_work) * aw)
{
	struct dsr_flow *c = bpf_map_lookup_elem(&DSR_FLOWS, &p->key);
	struct backend *be = NULL;
	int rc, ipip = svc_flags & LB_SVC_IPIP;

	if (c)
		be = dsr_cached(c->backend, svc_id);
	if (be) {
		f->backend = c->backend;
		if (c->seen != now)
			c->seen = now;
	} else {
		be = FN(backend_select)(svc_id, svc_flags, &p->key,
					FN(pick_hash)(&p->key, svc_flags), now,
					&f->backend, aw);
		if (!be) {
			*why = LB_DROP_NO_BACKEND;
			return XDP_DROP;
		}
		*new_flow = 1;
	}
	f->daddr = BE_ADDR(be);
	f->svc = svc_id;
	rc = FN(backend_route)(ctx, f, now);
	if (rc == LB_PASS_NO_ROUTE) {
		*new_flow = 0;
		*why = LB_PASS_NO_ROUTE;
		return XDP_PASS;
	}
	/* DSR, unresolved: the kernel would deliver it to the VIP it holds:
	 * drop, and the backend's neighbour gets resolved (lb resolves it
	 * when a backend is added; a retransmission then goes through). IPIP,
	 * unresolved: wrapped, the packet is addressed to the backend, and
	 * the kernel forwards it (ipip_xmit). */
	if (rc && !ipip) {
		*new_flow = 0;
		*why = LB_DROP_NO_NEIGH;
		return XDP_DROP;
	}
	if (ipip && !FN(ipip_fits)(ctx, p, f->ifindex)) {
		*new_flow = 0;
		*why = LB_DROP_TOO_BIG;
		return XDP_DROP;
	}
	if (*new_flow) {
		struct dsr_flow nc = {.backend = f->backend, .seen = now};

		bpf_map_update_elem(&DSR_FLOWS, &p->key, &nc, BPF_ANY);
	}
	count_backend(ctx, f->backend, *new_flow);
	if (ipip)
		return FN(ipip_xmit)(ctx, p, f, why);
	*why = LB_TO_BACKEND;
	return FN(nat_xmit)(ctx, p, f);
}
