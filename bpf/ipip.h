/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * IP-in-IP (RFC 2003), the rewrite of an IPIP service: the client's packet,
 * unchanged, inside an outer IPv4 header LB -> backend, sent to the next
 * hop towards the backend, which may sit on another subnet behind routers.
 * The backend removes the outer header (bpf/decap.bpf.c, or the kernel's
 * ipip device) and, holding the VIP on its loopback, answers the client
 * itself. Backend selection is DSR's (dsr.h); only this step differs.
 */
#ifndef LB_IPIP_H
#define LB_IPIP_H

#include "consts.h"
#include "csum.h"
#include "maps.h"
#include "pkt.h"

#define IPIP_HLEN 20 /* the outer header: no options */
#define IPIP_TTL 64

/* The header checksum of a 20-byte IPv4 header (its field 0). */
static __always_inline __sum16 ipv4_hdr_csum(const struct iphdr *ip)
{
	const __u16 *w = (const __u16 *)ip;
	__u64 sum = 0;

	for (int i = 0; i < IPIP_HLEN / 2; i++)
		sum += w[i];
	return ~csum_fold(sum);
}

/*
 * Whether packet `p` still fits the MTU of interface `ifindex` once wrapped:
 * one that does not is dropped (drop_too_big), not fragmented, and the
 * client learns nothing (no ICMP); backends keep the client's segments
 * small enough by advertising a smaller MSS (README, "IP-in-IP"). The
 * interface's MTU, not a route's.
 */
static __always_inline int ipip_fits(struct xdp_md *ctx, struct pkt *p,
				     __u32 ifindex)
{
	__u32 len = bpf_ntohs(p->ip->tot_len);

	return bpf_check_mtu(ctx, ifindex, &len, IPIP_HLEN, 0) ==
	       BPF_MTU_CHK_RET_SUCCESS;
}

/*
 * Wraps the parsed packet `p` in an outer header from f->saddr (the LB's
 * address towards the backend, from the FIB) to f->daddr, and sends it to
 * the next hop in f. Unresolved next hop (!f->nh_ok): the wrapped packet
 * goes to the kernel, which forwards it and resolves the neighbour. The
 * verdict; the counter to count it under in *why.
 *
 * The outer header: TOS and DF copied from the inner header, TTL 64, id 0
 * when DF is set (RFC 6864: an atomic datagram needs none), else the
 * inner's, which its sender made unique.
 */
static __always_inline int ipip_xmit(struct xdp_md *ctx, struct pkt *p,
				     const struct flow *f, int *why)
{
	struct iphdr *ip = p->ip, outer = {};
	struct ethhdr *eth;
	__u8 smac[ETH_ALEN], dmac[ETH_ALEN];
	void *data, *end;

	outer.version = 4;
	outer.ihl = 5;
	outer.tos = ip->tos;
	outer.tot_len = bpf_htons(bpf_ntohs(ip->tot_len) + IPIP_HLEN);
	outer.frag_off = ip->frag_off & bpf_htons(IP_DF);
	outer.id = outer.frag_off ? 0 : ip->id;
	outer.ttl = IPIP_TTL;
	outer.protocol = IPPROTO_IPIP;
	outer.saddr = f->saddr;
	outer.daddr = f->daddr;
	outer.check = ipv4_hdr_csum(&outer);
	if (f->nh_ok) {
		__builtin_memcpy(smac, f->smac, ETH_ALEN);
		__builtin_memcpy(dmac, f->dmac, ETH_ALEN);
	} else {
		/* To the kernel: still addressed to this host. */
		__builtin_memcpy(smac, p->eth->h_source, ETH_ALEN);
		__builtin_memcpy(dmac, p->eth->h_dest, ETH_ALEN);
	}
	if (bpf_xdp_adjust_head(ctx, -IPIP_HLEN)) {
		*why = LB_DROP_TOO_BIG; /* no headroom: never on a real NIC */
		return XDP_DROP;
	}
	/* Every packet pointer is stale now. */
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	eth = data;
	if ((void *)eth + sizeof(*eth) + IPIP_HLEN > end)
		return XDP_ABORTED; /* (the frame just grew: never) */
	__builtin_memcpy(eth->h_dest, dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, smac, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IP);
	__builtin_memcpy((void *)(eth + 1), &outer, IPIP_HLEN);
	if (!f->nh_ok) {
		*why = LB_PASS_NO_NEIGH;
		return XDP_PASS;
	}
	*why = LB_TO_BACKEND;
	if (f->ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	return xmit_ifindex(ctx, f->ifindex);
}

#endif /* LB_IPIP_H */
