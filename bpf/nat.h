/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/* Rewriting a packet as its flow says, and sending it on. Part of the
 * pipeline (fam.h): the rewrite is written per family, the sending once
 * over both. */
#ifndef LB_NAT_ONCE
#define LB_NAT_ONCE

#include "consts.h"
#include "csum.h"
#include "maps.h"
#include "pkt.h"

/*
 * Whether the packet's L4 checksum is partial (see l4_csum_rewrite). Only in
 * skb mode, where partial packets exist; there a field equal to the
 * pseudo-header sum is partial unless the whole segment checks out as a
 * complete checksum (which it does once in 65536 packets by chance). A
 * fragment's is complete: a sender fragments after checksumming.
 */
static __always_inline int l4_csum_partial(struct xdp_md *ctx, struct pkt *p)
{
	struct iphdr *ip = p->ip;
	__u16 ps;

	if (!skb_mode || p->frag)
		return 0;
	ps = pseudo_sum(ip->saddr, ip->daddr, p->key.proto, p->l4_len);
	if (*p->l4_check != ps)
		return 0;
	return !l4_csum_valid(ctx, (void *)p->ports - (void *)(long)ctx->data,
			      p->l4_len, ps);
}

/* Gives the IPv4 header new addresses, its checksum updated (for packets
 * whose L4 header is not rewritten with them: later fragments, the outer
 * header of an ICMP error). */
static __always_inline void ip_readdress(struct iphdr *ip, __be32 saddr,
					 __be32 daddr)
{
	ip->check = csum_update(ip->check, csum_delta4(ip->saddr, saddr) +
					       csum_delta4(ip->daddr, daddr));
	ip->saddr = saddr;
	ip->daddr = daddr;
}

/* Rewrite addresses, ports and checksums as the flow says. */
static __always_inline void nat_rewrite(struct xdp_md *ctx, struct pkt *p,
					const struct flow *f)
{
	struct iphdr *ip = p->ip;
	__u64 addr_delta =
	    csum_delta4(ip->saddr, f->saddr) + csum_delta4(ip->daddr, f->daddr);
	__u64 ports_delta = csum_delta2(p->ports[0], f->sport) +
			    csum_delta2(p->ports[1], f->dport);
	int partial = l4_csum_partial(ctx, p);

	ip = p->ip; /* the verifier forgets packet pointers over helper calls */
	ip->check = csum_update(ip->check, addr_delta);
	l4_csum_rewrite(p->l4_check, addr_delta, ports_delta, partial,
			p->key.proto == IPPROTO_UDP);
	ip->saddr = f->saddr;
	ip->daddr = f->daddr;
	p->ports[0] = f->sport;
	p->ports[1] = f->dport;
}

/* l4_csum_partial for IPv6. */
static __always_inline int l4_csum_partial6(struct xdp_md *ctx, struct pkt6 *p)
{
	__u16 ps;

	if (!skb_mode || p->frag)
		return 0;
	ps = pseudo_sum6(&p->key.saddr, &p->key.daddr, p->key.proto, p->l4_len);
	if (*p->l4_check != ps)
		return 0;
	return !l4_csum_valid(ctx, (void *)p->ports - (void *)(long)ctx->data,
			      p->l4_len, ps);
}

/* nat_rewrite for IPv6: no IP header checksum; the L4 one covers the
 * addresses through the pseudo-header. */
static __always_inline void nat_rewrite6(struct xdp_md *ctx, struct pkt6 *p,
					 const struct flow6 *f)
{
	__u64 addr_delta = csum_delta16(&p->key.saddr, &f->saddr) +
			   csum_delta16(&p->key.daddr, &f->daddr);
	__u64 ports_delta = csum_delta2(p->ports[0], f->sport) +
			    csum_delta2(p->ports[1], f->dport);
	int partial = l4_csum_partial6(ctx, p);
	struct ipv6hdr *ip6 = p->ip6;

	l4_csum_rewrite(p->l4_check, addr_delta, ports_delta, partial,
			p->key.proto == IPPROTO_UDP);
	*ip6_saddr(ip6) = f->saddr;
	*ip6_daddr(ip6) = f->daddr;
	p->ports[0] = f->sport;
	p->ports[1] = f->dport;
}

/* The verdict that sends the frame out of `ifindex`, another interface
 * than the ingress one: a redirect, through the devmap of lb's interfaces
 * when it is one of them. */
static __always_inline int xmit_ifindex(struct xdp_md *ctx, __u32 ifindex)
{
	long act = bpf_redirect_map(&tx_ports, ifindex, XDP_PASS);

	if (act == XDP_PASS)
		act = bpf_redirect(ifindex, 0);
	return act;
}

#endif /* LB_NAT_ONCE */

/* Send a rewritten packet to the flow's next hop: XDP_TX when it leaves by
 * the ingress interface, else a redirect (xmit_ifindex). */
static __always_inline int FN(nat_xmit)(struct xdp_md *ctx, PKT *p,
					const FLOW *f)
{
	__u32 ifindex = f->ifindex;

	__builtin_memcpy(p->eth->h_source, f->smac, ETH_ALEN);
	__builtin_memcpy(p->eth->h_dest, f->dmac, ETH_ALEN);
	if (ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	return xmit_ifindex(ctx, ifindex);
}
