/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * IP-in-IP, the rewrite of an IPIP service: the client's packet, unchanged,
 * inside an outer header LB -> backend of its own family (IPv4 in IPv4, RFC
 * 2003; IPv6 in IPv6, RFC 2473), sent to the next hop towards the backend,
 * which may sit on another subnet behind routers. The backend removes the
 * outer header (bpf/decap.bpf.c, or the kernel's ipip / ip6tnl device) and,
 * holding the VIP on its loopback, answers the client itself. Backend
 * selection is DSR's (dsr.h); only this step differs. Part of the pipeline
 * (fam.h): once per family.
 */
#ifndef LB_IPIP_ONCE
#define LB_IPIP_ONCE

#include "consts.h"
#include "csum.h"
#include "maps.h"
#include "pkt.h"

#define IPIP_HLEN 20  /* the outer IPv4 header: no options */
#define IPIP6_HLEN 40 /* the outer IPv6 header: no extension headers */
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
 * Puts outer header `outer` (IPIP_HLEN bytes if `v6` is 0, else IPIP6_HLEN)
 * in front of the packet, under an Ethernet header from `smac` to `dmac`,
 * and sends the frame: to ifindex (XDP_TX when it is the ingress one) if
 * `nh_ok`, else to the kernel, which forwards it and resolves the
 * neighbour. The verdict; the counter to count it under in *why. Every
 * packet pointer is stale afterwards.
 */
static __always_inline int ipip_push(struct xdp_md *ctx, const void *outer,
				     int v6, const __u8 *smac, const __u8 *dmac,
				     int nh_ok, __u32 ifindex, int *why)
{
	int hlen = v6 ? IPIP6_HLEN : IPIP_HLEN;
	__u8 s[ETH_ALEN], d[ETH_ALEN];
	struct ethhdr *eth;
	void *end;

	/* (the MACs may be the packet's own: copied before it moves) */
	__builtin_memcpy(s, smac, ETH_ALEN);
	__builtin_memcpy(d, dmac, ETH_ALEN);
	if (bpf_xdp_adjust_head(ctx, -hlen)) {
		*why = LB_DROP_TOO_BIG; /* no headroom: never on a real NIC */
		return XDP_DROP;
	}
	eth = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	if ((void *)eth + sizeof(*eth) + hlen > end)
		return XDP_ABORTED; /* (the frame just grew: never) */
	__builtin_memcpy(eth->h_dest, d, ETH_ALEN);
	__builtin_memcpy(eth->h_source, s, ETH_ALEN);
	if (v6) {
		eth->h_proto = bpf_htons(ETH_P_IPV6);
		__builtin_memcpy((void *)(eth + 1), outer, IPIP6_HLEN);
	} else {
		eth->h_proto = bpf_htons(ETH_P_IP);
		__builtin_memcpy((void *)(eth + 1), outer, IPIP_HLEN);
	}
	if (!nh_ok) {
		*why = LB_PASS_NO_NEIGH;
		return XDP_PASS;
	}
	*why = LB_TO_BACKEND;
	if (ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	return xmit_ifindex(ctx, ifindex);
}

#endif /* LB_IPIP_ONCE */

#if !LB_V6
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
	const __u8 *smac = f->smac, *dmac = f->dmac;

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
	if (!f->nh_ok) {
		/* To the kernel: still addressed to this host. */
		smac = p->eth->h_source;
		dmac = p->eth->h_dest;
	}
	return ipip_push(ctx, &outer, 0, smac, dmac, f->nh_ok, f->ifindex, why);
}

#else
/* ipip_fits for IPv6: with the 40-byte outer header. */
static __always_inline int ipip_fits6(struct xdp_md *ctx, struct pkt6 *p,
				      __u32 ifindex)
{
	__u32 len = sizeof(struct ipv6hdr) + bpf_ntohs(p->ip6->payload_len);

	return bpf_check_mtu(ctx, ifindex, &len, IPIP6_HLEN, 0) ==
	       BPF_MTU_CHK_RET_SUCCESS;
}

/*
 * ipip_xmit for IPv6: the outer header from f->saddr (the LB's IPv6
 * address towards the backend) to f->daddr, next header 41 (IPv6), hop
 * limit 64, traffic class and flow label copied from the inner header (the
 * flow label keeps ECMP on the way hashing the flow alike).
 */
static __always_inline int ipip_xmit6(struct xdp_md *ctx, struct pkt6 *p,
				      const struct flow6 *f, int *why)
{
	struct ipv6hdr *ip6 = p->ip6, outer = {};
	const __u8 *smac = f->smac, *dmac = f->dmac;

	/* version, traffic class and flow label: the inner's first word */
	*(__be32 *)&outer = *(__be32 *)ip6;
	outer.payload_len =
	    bpf_htons(bpf_ntohs(ip6->payload_len) + sizeof(struct ipv6hdr));
	outer.nexthdr = IPPROTO_IPV6;
	outer.hop_limit = IPIP_TTL;
	__builtin_memcpy(&outer.saddr, &f->saddr, sizeof(f->saddr));
	__builtin_memcpy(&outer.daddr, &f->daddr, sizeof(f->daddr));
	if (!f->nh_ok) {
		smac = p->eth->h_source;
		dmac = p->eth->h_dest;
	}
	return ipip_push(ctx, &outer, 1, smac, dmac, f->nh_ok, f->ifindex, why);
}
#endif
