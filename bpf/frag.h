/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * IPv4 fragments of tracked flows. Only a datagram's first fragment carries
 * the TCP or UDP header, so only it can be matched to a flow (or make one);
 * once it is forwarded, the datagram's later fragments (same source,
 * destination, protocol and IP id) follow it with the same rewrite of
 * addresses and MACs, for a second. Their L4 checksum needs nothing: it sits
 * in the first fragment and covers the whole datagram, and the first
 * fragment's rewrite updated it for the new addresses and ports. A later
 * fragment that arrives before its first (reordered) or after the entry
 * went passes to the kernel (pass_fragment).
 */
#ifndef LB_FRAG_H
#define LB_FRAG_H

#include "consts.h"
#include "csum.h"
#include "maps.h"
#include "pkt.h"

static __always_inline void frag_key_of(const struct iphdr *ip,
					struct frag_key *k)
{
	k->saddr = ip->saddr;
	k->daddr = ip->daddr;
	k->id = ip->id;
	k->proto = ip->protocol;
	k->pad = 0;
}

/* The first fragment of a datagram is forwarded with entry `f`: its later
 * fragments will be too (called before the rewrite: the key is as received).
 */
static __always_inline void frag_first(const struct pkt *p,
				       const struct flow *f, __u64 now)
{
	struct frag_key k;
	struct flow v = *f;

	frag_key_of(p->ip, &k);
	v.seen = now;
	bpf_map_update_elem(&frags, &k, &v, BPF_ANY);
}

/* A later fragment: forwarded as its first was (the verdict), or -1 to
 * pass it. */
static __always_inline int frag_later(struct xdp_md *ctx, struct pkt *p,
				      __u64 now)
{
	struct iphdr *ip = p->ip;
	struct frag_key k;
	struct flow *f;

	frag_key_of(ip, &k);
	f = bpf_map_lookup_elem(&frags, &k);
	if (!f || now - f->seen > hz || !f->nh_ok)
		return -1;
	ip_readdress(ip, f->saddr, f->daddr);
	count_backend(ctx, f->backend, 0);
	count(ctx, f->dir == LB_DIR_TO_BACKEND ? LB_TO_BACKEND : LB_TO_CLIENT,
	      0);
	return nat_xmit(ctx, p, f);
}

#endif /* LB_FRAG_H */
