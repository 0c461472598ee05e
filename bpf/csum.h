/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * Incremental Internet checksum update (RFC 1624, eqn. 3):
 *   HC' = ~(~HC + ~m + m')
 * One's-complement sums are byte-order independent, so the 16-bit halves of
 * network-order words are added as they lie in memory.
 */
#ifndef LB_CSUM_H
#define LB_CSUM_H

static __always_inline __u16 csum_fold(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

/* Sum of the one's complement of `from` and of `to`, as 16-bit words. */
static __always_inline __u64 csum_delta4(__be32 from, __be32 to)
{
	__u32 nf = ~from;

	return (__u64)(nf & 0xffff) + (nf >> 16) + (to & 0xffff) + (to >> 16);
}

/* Apply a delta (from csum_delta4, summed) to a stored checksum field. */
static __always_inline void csum_apply(__sum16 *field, __u64 delta)
{
	__u64 sum = (__u16) ~*field;

	*field = ~csum_fold(sum + delta);
}

/*
 * The folded pseudo-header sum (RFC 793/768): what a CHECKSUM_PARTIAL packet
 * carries in its L4 checksum field, before the device (or the kernel's
 * skb_checksum_help) adds the payload and complements it.
 */
static __always_inline __u16 pseudo_sum(__be32 saddr, __be32 daddr, __u8 proto,
					__u16 l4_len)
{
	__u64 sum = (saddr & 0xffff) + (saddr >> 16) + (daddr & 0xffff) +
		    (daddr >> 16) + bpf_htons(proto) + bpf_htons(l4_len);

	return csum_fold(sum);
}

/*
 * Update an L4 checksum field by `delta`. A complete checksum takes RFC 1624;
 * a partial one (skb mode, `maybe_partial`) is a plain sum and takes the
 * delta as it is. XDP cannot see the skb's checksum state, so a partial
 * field is recognised by its value: the pseudo-header sum of the packet
 * before the rewrite. A complete checksum equals it 1 time in 65536; that
 * is why the guess is only made in skb mode, where partial packets exist.
 */
static __always_inline void l4_csum_apply(__sum16 *field, __u64 delta,
					  int maybe_partial, __be32 saddr,
					  __be32 daddr, __u8 proto,
					  __u16 l4_len)
{
	if (maybe_partial &&
	    *field == pseudo_sum(saddr, daddr, proto, l4_len)) {
		*field = csum_fold(*field + delta);
		return;
	}
	csum_apply(field, delta);
}

#endif /* LB_CSUM_H */
