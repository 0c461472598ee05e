// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * IP-in-IP decapsulation, for the backends of an IPIP service (`lb decap
 * IFACE`): an IPv4 packet of protocol 4 (IPv4 inside), or an IPv6 packet
 * whose next header is 41 (IPv6 inside, no extension headers before it),
 * loses its outer header and goes to the kernel as the client's packet to
 * the VIP, which the backend holds on its loopback. Everything else passes
 * untouched.
 *
 * Any outer destination is taken, not only this host's addresses: the
 * frame was already addressed to this host's MAC, and a list of "local"
 * addresses would have to follow every address the host adds or removes
 * (VIPs on lo among them). The kernel decides about the inner packet as
 * about any other it receives: delivered if its destination is local, else
 * forwarded or dropped. Outer sources are not filtered either (as the
 * kernel's `ipip external` device): the LB's link must be trusted (README).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "consts.h"
#include "csum.h"
#include "decap.h"
#include "lb.h" /* struct lb_counter */

/* The shared enum's BTF anchor (see decap.h). */
const volatile struct decap_shared decap_shared = {};

/* Packets and bytes per enum decap_stat, per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, LB_DECAP_STAT_MAX);
	__type(key, __u32);
	__type(value, struct lb_counter);
} decap_stats SEC(".maps");

/* Most 16-bit words of an IPv4 header (IHL 15). */
#define IP_MAX_WORDS 30

static __always_inline int counted(struct xdp_md *ctx, enum decap_stat s,
				   __u32 bytes)
{
	__u32 key = s;
	struct lb_counter *c = bpf_map_lookup_elem(&decap_stats, &key);

	if (c) {
		c->packets++;
		c->bytes += bytes;
	}
	return XDP_PASS;
}

/* Whether the IPv4 header at offset `off` (`hlen` bytes, inside the
 * frame) sums to all ones, as a header with a correct checksum does. It is
 * copied into zeros first: summed whole, the zeros past it add nothing. */
static __always_inline int ipv4_csum_ok(struct xdp_md *ctx, __u32 off,
					__u32 hlen)
{
	__u16 w[IP_MAX_WORDS] = {};
	__u64 sum = 0;

	if (hlen > sizeof(w) || bpf_xdp_load_bytes(ctx, off, w, hlen))
		return 0;
	for (int i = 0; i < IP_MAX_WORDS; i++)
		sum += w[i];
	return csum_fold(sum) == 0xffff;
}

/* Moves the Ethernet header `hlen` bytes on, over the outer header, and
 * marks the frame `proto`. */
static __always_inline int strip_outer(struct xdp_md *ctx, __u32 hlen,
				       __be16 proto, __u32 len)
{
	struct ethhdr *eth = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u8 smac[ETH_ALEN], dmac[ETH_ALEN];

	if ((void *)(eth + 1) > end)
		return XDP_ABORTED;
	__builtin_memcpy(dmac, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(smac, eth->h_source, ETH_ALEN);
	if (bpf_xdp_adjust_head(ctx, hlen))
		return counted(ctx, LB_DECAP_PASS_MALFORMED, len);
	/* The packet pointers are stale: the Ethernet header goes where the
	 * outer IP header ended. */
	eth = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	if ((void *)(eth + 1) > end)
		return XDP_ABORTED; /* (an inner header follows: never) */
	__builtin_memcpy(eth->h_dest, dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, smac, ETH_ALEN);
	eth->h_proto = proto;
	return counted(ctx, LB_DECAP_DONE, len);
}

/* IPv6 in IPv6 (RFC 2473): an outer header with next header 41 right
 * after it (a tunnel encapsulation limit option, or any other extension
 * header, is not taken: passed as not ours) and a whole IPv6 header
 * inside. IPv6 headers have no checksum. */
static __always_inline int decap6(struct xdp_md *ctx, struct ipv6hdr *outer,
				  void *end, __u32 len)
{
	struct ipv6hdr *inner = (void *)(outer + 1);

	if ((void *)(outer + 1) > end)
		return counted(ctx, LB_DECAP_PASS_MALFORMED, len);
	if (outer->nexthdr == IPV6_FRAGMENT)
		return counted(ctx, LB_DECAP_PASS_FRAGMENT, len);
	if (outer->nexthdr != IPPROTO_IPV6)
		return counted(ctx, LB_DECAP_PASS_NOT_IPIP, len);
	if (outer->version != 6 ||
	    (void *)(outer + 1) + bpf_ntohs(outer->payload_len) > end ||
	    bpf_ntohs(outer->payload_len) < sizeof(*inner) ||
	    (void *)(inner + 1) > end || inner->version != 6 ||
	    sizeof(*inner) + bpf_ntohs(inner->payload_len) >
		bpf_ntohs(outer->payload_len))
		return counted(ctx, LB_DECAP_PASS_MALFORMED, len);
	return strip_outer(ctx, sizeof(*outer), bpf_htons(ETH_P_IPV6), len);
}

SEC("xdp")
int lb_decap(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u32 len = end - data, hlen;
	struct ethhdr *eth = data;
	struct iphdr *outer, *inner;

	if ((void *)(eth + 1) > end)
		return counted(ctx, LB_DECAP_PASS_NOT_IPIP, len);
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return decap6(ctx, (void *)(eth + 1), end, len);
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return counted(ctx, LB_DECAP_PASS_NOT_IPIP, len);
	outer = (void *)(eth + 1);
	if ((void *)(outer + 1) > end)
		return counted(ctx, LB_DECAP_PASS_MALFORMED, len);
	if (outer->protocol != IPPROTO_IPIP)
		return counted(ctx, LB_DECAP_PASS_NOT_IPIP, len);
	hlen = outer->ihl * 4;
	if (outer->version != 4 || hlen < sizeof(*outer) ||
	    (void *)outer + hlen > end ||
	    bpf_ntohs(outer->tot_len) < hlen + sizeof(*inner) ||
	    (void *)outer + bpf_ntohs(outer->tot_len) > end ||
	    !ipv4_csum_ok(ctx, sizeof(*eth), hlen))
		return counted(ctx, LB_DECAP_PASS_MALFORMED, len);
	if (outer->frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return counted(ctx, LB_DECAP_PASS_FRAGMENT, len);
	inner = (void *)outer + hlen;
	if ((void *)(inner + 1) > end || inner->version != 4)
		return counted(ctx, LB_DECAP_PASS_MALFORMED, len);
	return strip_outer(ctx, hlen, bpf_htons(ETH_P_IP), len);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
