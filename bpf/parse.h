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

/* TCP with options allowed; the header must lie inside the IP datagram. */
static __always_inline struct tcphdr *parse_tcp(struct hdr_cursor *c,
						struct iphdr *ip)
{
	struct tcphdr *tcp = c->pos;
	__u32 hlen;

	if ((void *)(tcp + 1) > c->end)
		return NULL;
	hlen = tcp->doff * 4;
	if (hlen < sizeof(*tcp))
		return NULL;
	if ((void *)tcp + hlen > (void *)ip + bpf_ntohs(ip->tot_len))
		return NULL;
	c->pos += hlen;
	return tcp;
}

/* UDP; the header must lie inside the IP datagram. */
static __always_inline struct udphdr *parse_udp(struct hdr_cursor *c,
						struct iphdr *ip)
{
	struct udphdr *udp = c->pos;

	if ((void *)(udp + 1) > c->end)
		return NULL;
	if ((void *)(udp + 1) > (void *)ip + bpf_ntohs(ip->tot_len))
		return NULL;
	c->pos = udp + 1;
	return udp;
}

static __always_inline int ipv4_is_fragment(const struct iphdr *ip)
{
	return ip->frag_off & bpf_htons(IP_MF | IP_OFFSET);
}

#endif /* LB_PARSE_H */
