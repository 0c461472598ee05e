/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/* Protocol constants: vmlinux.h carries types but no #defines. */
#ifndef LB_CONSTS_H
#define LB_CONSTS_H

#define ETH_ALEN 6
#define ETH_P_IP 0x0800
#define IPPROTO_ICMP 1
#define IPPROTO_IPIP 4 /* IPv4 in IPv4 (RFC 2003) */
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define AF_INET 2

/* frag_off bits (host order) */
#define IP_DF 0x4000
#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

#endif /* LB_CONSTS_H */
