/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/* A parsed TCP or UDP packet of either family, and what goes with it. */
#ifndef LB_PKT_H
#define LB_PKT_H

#include "consts.h"
#include "lb.h"

/* An IPv4 TCP or UDP packet. */
struct pkt {
	struct ethhdr *eth;
	struct iphdr *ip;
	__be16 *ports;	   /* source, destination */
	__sum16 *l4_check; /* TCP or UDP checksum field */
	struct flow_key key;
	__u16 l4_len;
	__u8 tcp_flags; /* TCP: FIN/SYN/RST/... byte, 0 for UDP */
	__u8 frag;	/* LB_FRAG_*: a fragment of a datagram */
};

/* An IPv6 TCP or UDP packet (its extension headers skipped). */
struct pkt6 {
	struct ethhdr *eth;
	struct ipv6hdr *ip6;
	__be16 *ports;
	__sum16 *l4_check;
	struct flow6_key key;
	__u16 l4_len; /* of the TCP or UDP segment (of this fragment) */
	__u8 tcp_flags;
	__u8 frag;	/* LB_FRAG_* */
	__be32 frag_id; /* a fragment's: its datagram's identification */
};

#define LB_FRAG_NONE 0
#define LB_FRAG_FIRST 1 /* offset 0, more to come: carries the ports */
#define LB_FRAG_LATER 2 /* offset > 0: no ports */

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

static __always_inline int in6_eq(const struct lb_in6 *a,
				  const struct lb_in6 *b)
{
	return ((a->w[0] ^ b->w[0]) | (a->w[1] ^ b->w[1]) |
		(a->w[2] ^ b->w[2]) | (a->w[3] ^ b->w[3])) == 0;
}

/* The IPv6 header's addresses, as lb_in6 (same layout). */
static __always_inline struct lb_in6 *ip6_saddr(struct ipv6hdr *ip6)
{
	return (struct lb_in6 *)&ip6->saddr;
}

static __always_inline struct lb_in6 *ip6_daddr(struct ipv6hdr *ip6)
{
	return (struct lb_in6 *)&ip6->daddr;
}

/* A TCP segment with SYN and without ACK: only it opens a connection. */
#define is_syn(p)                                                              \
	((p)->key.proto == IPPROTO_TCP &&                                      \
	 ((p)->tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN)

/* A TCP segment with SYN and ACK: a backend's answer to a SYN. */
#define is_synack(p)                                                           \
	(((p)->tcp_flags & (TCP_SYN | TCP_ACK)) == (TCP_SYN | TCP_ACK))

#endif /* LB_PKT_H */
