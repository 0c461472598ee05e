/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/* Routing: the next hop (interface, MACs, source address) towards a flow's
 * destination, from the FIB or (IPv4) from the per-backend cache. Written
 * per family (part of the pipeline, fam.h). */
#ifndef LB_ROUTE_ONCE
#define LB_ROUTE_ONCE

#include "consts.h"
#include "maps.h"
#include "pkt.h"

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
					 __u64 now)
{
	struct lb_nexthop *nh = bpf_map_lookup_elem(&nexthops, &f->backend);
	int rc;

	if (nh && nh->ok && nh->daddr == f->daddr &&
	    (__u32)now - nh->checked < nh_ttl) {
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
		__builtin_memset(&nh->daddr6, 0, sizeof(nh->daddr6));
		nh->daddr = f->daddr;
		nh->saddr = f->saddr;
		nh->ifindex = f->ifindex;
		__builtin_memcpy(nh->smac, f->smac, ETH_ALEN);
		__builtin_memcpy(nh->dmac, f->dmac, ETH_ALEN);
		nh->checked = (__u32)now;
		nh->ok = 1;
	}
	return rc;
}

/* flow_route for IPv6. */
static __always_inline int flow_route6(struct xdp_md *ctx, struct flow6 *f,
				       __u32 flags)
{
	struct bpf_fib_lookup fib = {};
	long rc;

	fib.family = AF_INET6;
	fib.ifindex = ctx->ingress_ifindex;
	__builtin_memcpy(fib.ipv6_src, &f->saddr, sizeof(f->saddr));
	__builtin_memcpy(fib.ipv6_dst, &f->daddr, sizeof(f->daddr));
	rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), flags);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return LB_PASS_NO_ROUTE;
	if (flags & BPF_FIB_LOOKUP_SRC)
		__builtin_memcpy(&f->saddr, fib.ipv6_src, sizeof(f->saddr));
	f->ifindex = fib.ifindex;
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return LB_PASS_NO_NEIGH;
	__builtin_memcpy(f->smac, fib.smac, ETH_ALEN);
	__builtin_memcpy(f->dmac, fib.dmac, ETH_ALEN);
	f->nh_ok = 1;
	return 0;
}

/* backend_route for IPv6: the same per-backend cache, its IPv6 fields. */
static __always_inline int backend_route6(struct xdp_md *ctx, struct flow6 *f,
					  __u64 now)
{
	struct lb_nexthop *nh = bpf_map_lookup_elem(&nexthops, &f->backend);
	struct lb_in6 zero = {};
	int rc;

	if (nh && nh->ok && in6_eq(&nh->daddr6, &f->daddr) &&
	    (__u32)now - nh->checked < nh_ttl) {
		f->saddr = nh->saddr6;
		f->ifindex = nh->ifindex;
		__builtin_memcpy(f->smac, nh->smac, ETH_ALEN);
		__builtin_memcpy(f->dmac, nh->dmac, ETH_ALEN);
		f->nh_ok = 1;
		return 0;
	}
	rc = flow_route6(ctx, f, BPF_FIB_LOOKUP_SRC);
	if (rc == LB_PASS_NO_ROUTE || in6_eq(&f->saddr, &zero))
		return LB_PASS_NO_ROUTE;
	if (nh && rc == 0) {
		nh->daddr = 0;
		nh->saddr = 0;
		nh->daddr6 = f->daddr;
		nh->saddr6 = f->saddr;
		nh->ifindex = f->ifindex;
		__builtin_memcpy(nh->smac, f->smac, ETH_ALEN);
		__builtin_memcpy(nh->dmac, f->dmac, ETH_ALEN);
		nh->checked = (__u32)now;
		nh->ok = 1;
	}
	return rc;
}

#endif /* LB_ROUTE_ONCE */
