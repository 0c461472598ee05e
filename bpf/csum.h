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

/* ~m + m' for a 32-bit word, as 16-bit words. */
static __always_inline __u64 csum_delta4(__be32 from, __be32 to)
{
	__u32 nf = ~from;

	return (__u64)(nf & 0xffff) + (nf >> 16) + (to & 0xffff) + (to >> 16);
}

/* ~m + m' for a 16-bit word. */
static __always_inline __u64 csum_delta2(__be16 from, __be16 to)
{
	return (__u64)(__u16)~from + to;
}

/* Apply a delta to a complete checksum field. */
static __always_inline __sum16 csum_update(__sum16 field, __u64 delta)
{
	return ~csum_fold((__u64)(__u16)~field + delta);
}

/*
 * The folded pseudo-header sum (RFC 793/768): what a CHECKSUM_PARTIAL packet
 * carries in its L4 checksum field, before the device (or the kernel's
 * skb_checksum_help) adds the segment and complements it.
 */
static __always_inline __u16 pseudo_sum(__be32 saddr, __be32 daddr, __u8 proto,
					__u16 l4_len)
{
	__u64 sum = (saddr & 0xffff) + (saddr >> 16) + (daddr & 0xffff) +
		    (daddr >> 16) + bpf_htons(proto) + bpf_htons(l4_len);

	return csum_fold(sum);
}

/*
 * Update an L4 checksum field for new addresses (`pseudo_delta`, the
 * pseudo-header part) and new ports (`ports_delta`).
 *
 * A partial checksum (skb mode, `maybe_partial`) holds only the pseudo-header
 * sum: it takes the address delta, as a plain sum, and not the ports, which
 * the device adds later. XDP cannot see the skb's checksum state, so a
 * partial field is recognised by value: the pseudo-header sum of the packet
 * as received (`pseudo_old`). A complete checksum equals it 1 time in 65536;
 * that is why the guess is made only in skb mode, where partial packets
 * exist. UDP: 0 means "no checksum" and stays 0; a computed 0 is sent as
 * 0xffff (RFC 768).
 */
static __always_inline void l4_csum_rewrite(__sum16 *field, __u64 pseudo_delta,
					    __u64 ports_delta,
					    int maybe_partial, __u16 pseudo_old,
					    int udp)
{
	__sum16 sum;

	if (udp && *field == 0)
		return;
	if (maybe_partial && *field == pseudo_old) {
		*field = csum_fold(*field + pseudo_delta);
		return;
	}
	sum = csum_update(*field, pseudo_delta + ports_delta);
	if (udp && sum == 0)
		sum = 0xffff;
	*field = sum;
}

#endif /* LB_CSUM_H */
