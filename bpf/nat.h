/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/* Backend choice, address rewrite and next-hop forwarding. */
#ifndef LB_NAT_H
#define LB_NAT_H

#include "consts.h"
#include "csum.h"
#include "maps.h"

/* murmur3 finaliser: cheap, and every input bit reaches every output bit. */
static __always_inline __u32 mix32(__u32 h)
{
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

/* One value per connection: both addresses and both ports. */
static __always_inline __u32 flow_hash(const struct iphdr *ip,
				       const struct tcphdr *tcp)
{
	__u32 ports = ((__u32)tcp->source << 16) | tcp->dest;

	return mix32(ip->saddr ^ mix32(ip->daddr ^ mix32(ports)));
}

/*
 * Rewrite source and destination address. The TCP checksum covers them
 * through the pseudo-header, so it takes the same delta as the IP checksum.
 */
static __always_inline void nat_rewrite(struct iphdr *ip, struct tcphdr *tcp,
					__be32 saddr, __be32 daddr)
{
	__u64 delta =
	    csum_delta4(ip->saddr, saddr) + csum_delta4(ip->daddr, daddr);
	__u16 l4_len = bpf_ntohs(ip->tot_len) - ip->ihl * 4;

	csum_apply(&ip->check, delta);
	l4_csum_apply(&tcp->check, delta, skb_mode, ip->saddr, ip->daddr,
		      IPPROTO_TCP, l4_len);
	ip->saddr = saddr;
	ip->daddr = daddr;
}

/*
 * Send the packet from `saddr` to `daddr` through the kernel's FIB and
 * neighbour tables: the route gives the egress interface, the neighbour the
 * MACs. Nothing is rewritten unless the packet leaves through XDP, or is
 * handed to the kernel already addressed to its next hop (unresolved
 * neighbour: the kernel's forwarding path resolves it).
 */
static __always_inline int nat_forward(struct xdp_md *ctx, struct ethhdr *eth,
				       struct iphdr *ip, struct tcphdr *tcp,
				       __be32 saddr, __be32 daddr,
				       enum lb_stat ok)
{
	struct bpf_fib_lookup fib = {};
	long rc;

	fib.family = AF_INET;
	fib.l4_protocol = ip->protocol;
	fib.tos = ip->tos;
	fib.tot_len = bpf_ntohs(ip->tot_len);
	fib.ifindex = ctx->ingress_ifindex;
	fib.ipv4_src = saddr;
	fib.ipv4_dst = daddr;

	rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		nat_rewrite(ip, tcp, saddr, daddr);
		return count(ctx, LB_PASS_NO_NEIGH, XDP_PASS);
	}
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return count(ctx, LB_PASS_NO_ROUTE, XDP_PASS);

	nat_rewrite(ip, tcp, saddr, daddr);
	__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
	if (fib.ifindex == ctx->ingress_ifindex)
		return count(ctx, ok, XDP_TX);
	return count(ctx, ok, bpf_redirect(fib.ifindex, 0));
}

#endif /* LB_NAT_H */
