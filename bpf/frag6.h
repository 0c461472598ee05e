/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * IPv6 fragments of tracked flows, as frag.h does for IPv4: the first
 * fragment (offset 0, after the fragment header) carries the ports and is
 * matched to a flow; the datagram's later fragments (same source,
 * destination and identification) follow it with the same rewrite of
 * addresses and MACs for a second. IPv6 has no header checksum, and the L4
 * checksum sits in the first fragment. A later fragment that comes before
 * its first, or after the entry went, passes (pass_fragment).
 */
#ifndef LB_FRAG6_H
#define LB_FRAG6_H

#include "consts.h"
#include "maps.h"
#include "pkt.h"

static __always_inline void frag6_key_of(const struct pkt6 *p,
					 struct frag6_key *k)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->saddr = *ip6_saddr(p->ip6);
	k->daddr = *ip6_daddr(p->ip6);
	k->id = p->frag_id;
	k->proto = p->key.proto;
}

/* The first fragment of a datagram is forwarded with entry `f` (called
 * before the rewrite: the key is as received). */
static __always_inline void frag_first6(const struct pkt6 *p,
					const struct flow6 *f, __u64 now)
{
	struct frag6_key k;
	struct flow6 *v;

	/* Written as it is and then stamped: a copy of the entry would not
	 * fit on the stack beside the rest. */
	frag6_key_of(p, &k);
	if (bpf_map_update_elem(&frags6, &k, f, BPF_ANY))
		return;
	v = bpf_map_lookup_elem(&frags6, &k);
	if (v)
		v->seen = now;
}

/* A later fragment: forwarded as its first was (the verdict), or -1 to
 * pass it. */
static __always_inline int frag_later6(struct xdp_md *ctx, struct pkt6 *p,
				       __u64 now)
{
	struct frag6_key k;
	struct flow6 *f;

	frag6_key_of(p, &k);
	f = bpf_map_lookup_elem(&frags6, &k);
	if (!f || now - f->seen > hz || !f->nh_ok)
		return -1;
	*ip6_saddr(p->ip6) = f->saddr;
	*ip6_daddr(p->ip6) = f->daddr;
	count_backend(ctx, f->backend, 0);
	count(ctx, f->dir == LB_DIR_TO_BACKEND ? LB_TO_BACKEND : LB_TO_CLIENT,
	      0);
	return nat_xmit6(ctx, p, f);
}

#endif /* LB_FRAG6_H */
