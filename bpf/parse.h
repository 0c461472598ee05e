/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * Header parsing. Every parse_*() takes a cursor, bounds-checks the whole
 * header against data_end, advances the cursor past it and returns the
 * header (or NULL when the packet is too short or malformed).
 */
#ifndef LB_PARSE_H
#define LB_PARSE_H

#include "consts.h"

struct hdr_cursor {
	void *pos;
	void *end;
};

static __always_inline struct ethhdr *parse_eth(struct hdr_cursor *c)
{
	struct ethhdr *eth = c->pos;

	if ((void *)(eth + 1) > c->end)
		return NULL;
	c->pos = eth + 1;
	return eth;
}

/* IPv4 with options allowed (IHL 5..15); IHL < 5 or a total length beyond the
 * frame is malformed. */
static __always_inline struct iphdr *parse_ipv4(struct hdr_cursor *c)
{
	struct iphdr *ip = c->pos;
	__u32 hlen;

	if ((void *)(ip + 1) > c->end)
		return NULL;
	if (ip->version != 4 || ip->ihl < 5)
		return NULL;
	hlen = ip->ihl * 4;
	if (c->pos + hlen > c->end)
		return NULL;
	if ((void *)ip + bpf_ntohs(ip->tot_len) > c->end ||
	    bpf_ntohs(ip->tot_len) < hlen)
		return NULL;
	c->pos += hlen;
	return ip;
}

/* TCP with options allowed; the header must lie inside the IP datagram,
 * which ends at `dgram_end`. */
static __always_inline struct tcphdr *parse_tcp(struct hdr_cursor *c,
						void *dgram_end)
{
	struct tcphdr *tcp = c->pos;
	__u32 hlen;

	if ((void *)(tcp + 1) > c->end)
		return NULL;
	hlen = tcp->doff * 4;
	if (hlen < sizeof(*tcp))
		return NULL;
	if ((void *)tcp + hlen > dgram_end)
		return NULL;
	c->pos += hlen;
	return tcp;
}

/* UDP; the header must lie inside the IP datagram (see parse_tcp). */
static __always_inline struct udphdr *parse_udp(struct hdr_cursor *c,
						void *dgram_end)
{
	struct udphdr *udp = c->pos;

	if ((void *)(udp + 1) > c->end)
		return NULL;
	if ((void *)(udp + 1) > dgram_end)
		return NULL;
	c->pos = udp + 1;
	return udp;
}

/* IPv6: the fixed header, with a payload length inside the frame (a
 * jumbogram's 0 with a hop-by-hop jumbo option is not taken: malformed). */
static __always_inline struct ipv6hdr *parse_ipv6(struct hdr_cursor *c)
{
	struct ipv6hdr *ip6 = c->pos;

	if ((void *)(ip6 + 1) > c->end)
		return NULL;
	if (ip6->version != 6)
		return NULL;
	if ((void *)(ip6 + 1) + bpf_ntohs(ip6->payload_len) > c->end)
		return NULL;
	c->pos = ip6 + 1;
	return ip6;
}

/* Most IPv6 extension headers skipped before giving up on a packet. */
#define IPV6_EXT_MAX 4

enum ipv6_ext_result {
	IPV6_EXT_OK = 0,       /* *nexthdr is the upper layer's, cursor there */
	IPV6_EXT_BAD = 1,      /* a header runs past the datagram */
	IPV6_EXT_FRAGMENT = 2, /* a fragment header */
	IPV6_EXT_NOT_OURS = 3, /* too many, or a routing header with segments
				  left (the final destination is not the
				  header's), or one lb does not know */
};

/*
 * Skips the extension headers lb can step over without changing the
 * packet's meaning: hop-by-hop options (first only, RFC 8200 4.1),
 * destination options, and routing headers whose segments are all done;
 * at most IPV6_EXT_MAX of them.
 */
static __always_inline int ipv6_skip_ext(struct hdr_cursor *c, __u8 *nexthdr,
					 void *dgram_end)
{
	for (int i = 0; i < IPV6_EXT_MAX; i++) {
		__u8 *h = c->pos, nh = *nexthdr;
		__u32 len;

		if (nh == IPV6_FRAGMENT)
			return IPV6_EXT_FRAGMENT;
		if (nh != IPV6_HOPOPTS && nh != IPV6_DSTOPTS &&
		    nh != IPV6_ROUTING)
			return IPV6_EXT_OK;
		if (nh == IPV6_HOPOPTS && i)
			return IPV6_EXT_BAD;
		if ((void *)(h + 8) > c->end || (void *)(h + 8) > dgram_end)
			return IPV6_EXT_BAD;
		if (nh == IPV6_ROUTING && h[3])
			return IPV6_EXT_NOT_OURS;
		len = ((__u32)h[1] + 1) * 8;
		if ((void *)h + len > dgram_end)
			return IPV6_EXT_BAD;
		*nexthdr = h[0];
		c->pos = (void *)h + len;
	}
	if (*nexthdr == IPV6_FRAGMENT)
		return IPV6_EXT_FRAGMENT;
	if (*nexthdr == IPV6_HOPOPTS || *nexthdr == IPV6_DSTOPTS ||
	    *nexthdr == IPV6_ROUTING)
		return IPV6_EXT_NOT_OURS;
	return IPV6_EXT_OK;
}

static __always_inline int ipv4_is_fragment(const struct iphdr *ip)
{
	return ip->frag_off & bpf_htons(IP_MF | IP_OFFSET);
}

#endif /* LB_PARSE_H */
