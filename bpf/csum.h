/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * Incremental Internet checksum update (RFC 1624, eqn. 3):
 *   HC' = ~(~HC + ~m + m')
 * One's-complement sums are byte-order independent, so the 16-bit halves of
 * network-order words are added as they lie in memory.
 */
#ifndef LB_CSUM_H
#define LB_CSUM_H

#include "lb.h"

static __always_inline __u16 csum_fold(__u64 sum)
{
	sum = (sum & 0xffffffff) + (sum >> 32);
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

/* ~m + m' for an IPv6 address. */
static __always_inline __u64 csum_delta16(const struct lb_in6 *from,
					  const struct lb_in6 *to)
{
	return csum_delta4(from->w[0], to->w[0]) +
	       csum_delta4(from->w[1], to->w[1]) +
	       csum_delta4(from->w[2], to->w[2]) +
	       csum_delta4(from->w[3], to->w[3]);
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

/* The same for IPv6 (RFC 8200 8.1: addresses, upper-layer length, next
 * header). */
static __always_inline __u16 pseudo_sum6(const struct lb_in6 *saddr,
					 const struct lb_in6 *daddr, __u8 proto,
					 __u16 l4_len)
{
	__u64 sum = bpf_htons(proto) + bpf_htons(l4_len);

	for (int i = 0; i < 4; i++)
		sum += (saddr->w[i] & 0xffff) + (saddr->w[i] >> 16) +
		       (daddr->w[i] & 0xffff) + (daddr->w[i] >> 16);
	return csum_fold(sum);
}

/* Bytes summed per helper call, and the most chunks: a 64 KiB segment (an
 * skb in generic mode may be a GRO super-packet). */
#define CSUM_CHUNK 64
#define CSUM_MAX_CHUNKS 1024

/* A pass over a segment, the state of its bpf_loop (one chunk a round: the
 * verifier checks the round once, not once per chunk). The chunk is read
 * into a per-CPU buffer, not the stack, which the callback's frame would
 * add to the deepest call chain's. */
struct csum_buf {
	__u32 w[CSUM_CHUNK / 4];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct csum_buf);
} csum_buf SEC(".maps");

struct csum_walk {
	struct xdp_md *ctx;
	__u64 sum;
	__u32 off;
	__u32 left;
	__u32 failed;
};

static long csum_chunk(__u32 i, void *arg)
{
	struct csum_walk *w = arg;
	__u32 zero = 0, n = w->left;
	struct csum_buf *b = bpf_map_lookup_elem(&csum_buf, &zero);

	if (n == 0)
		return 1;
	if (!b) {
		w->failed = 1;
		return 1;
	}
	__builtin_memset(b, 0, sizeof(*b));
	if (n > CSUM_CHUNK)
		n = CSUM_CHUNK;
	/* Opaque to clang, so that the bounds stay tests the verifier sees */
	asm volatile("" : "+r"(n));
	if (n < 1 || n > CSUM_CHUNK ||
	    bpf_xdp_load_bytes(w->ctx, w->off, b->w, n)) {
		w->failed = 1;
		return 1;
	}
	/* zeros after an odd last byte pad it to a 16-bit word */
	for (int j = 0; j < CSUM_CHUNK / 4; j++)
		w->sum += b->w[j];
	w->off += n;
	w->left -= n;
	return 0;
}

/*
 * Whether the L4 segment at `off` (`len` bytes) carries a complete, valid
 * checksum: the one's-complement sum of pseudo-header and segment is all
 * ones. Costs a pass over the payload; asked only when the field is
 * ambiguous (see l4_csum_rewrite).
 */
static __always_inline int l4_csum_valid(struct xdp_md *ctx, __u32 off,
					 __u32 len, __u16 pseudo)
{
	struct csum_walk w = {
	    .ctx = ctx, .sum = pseudo, .off = off, .left = len};

	bpf_loop(CSUM_MAX_CHUNKS + 1, csum_chunk, &w, 0);
	if (w.failed || w.left)
		return 0;
	return csum_fold(w.sum) == 0xffff;
}

/*
 * Update an L4 checksum field for new addresses (`pseudo_delta`, the
 * pseudo-header part) and new ports (`ports_delta`).
 *
 * A partial checksum (CHECKSUM_PARTIAL: skb mode, from a local or virtual
 * sender with TX offload) holds only the folded pseudo-header sum: it takes
 * the address delta, as a plain sum, and not the ports, which the device
 * adds later. XDP cannot see the skb's checksum state, so `partial` is
 * decided by the caller (skb mode, field equal to the pseudo-header sum, and
 * not a valid complete checksum). UDP: 0 means "no checksum" and stays 0; a
 * computed 0 is sent as 0xffff (RFC 768).
 */
static __always_inline void l4_csum_rewrite(__sum16 *field, __u64 pseudo_delta,
					    __u64 ports_delta, int partial,
					    int udp)
{
	__sum16 sum;

	if (udp && *field == 0)
		return;
	if (partial) {
		*field = csum_fold(*field + pseudo_delta);
		return;
	}
	sum = csum_update(*field, pseudo_delta + ports_delta);
	if (udp && sum == 0)
		sum = 0xffff;
	*field = sum;
}

#endif /* LB_CSUM_H */
