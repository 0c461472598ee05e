/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/* Protocol constants: vmlinux.h carries types but no #defines. */
#ifndef LB_CONSTS_H
#define LB_CONSTS_H

#define ETH_ALEN 6
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86dd
#define IPPROTO_ICMP 1
#define IPPROTO_IPIP 4 /* IPv4 in IPv4 (RFC 2003) */
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define IPPROTO_IPV6 41 /* IPv6 in IPv6 (RFC 2473) */
#define IPPROTO_ICMPV6 58
#define AF_INET 2
#define AF_INET6 10

/* IPv6 extension headers lb skips (RFC 8200 4.1), and the fragment header */
#define IPV6_HOPOPTS 0
#define IPV6_ROUTING 43
#define IPV6_FRAGMENT 44
#define IPV6_DSTOPTS 60

/* frag_off bits (host order) */
#define IP_DF 0x4000
#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

#endif /* LB_CONSTS_H */
