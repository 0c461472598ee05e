/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * ICMPv6 errors about tracked flows: destination unreachable, packet too
 * big (path MTU discovery) and time exceeded, from anywhere on either leg
 * of a connection; as icmp.h does for IPv4 (see there for the idea). The
 * quoted packet becomes what the error's receiver sent, the outer header
 * comes from the LB's side of that leg, and the ICMPv6 checksum (which
 * covers the outer addresses through its pseudo-header) and the quoted TCP
 * or UDP checksum, if quoted, are updated. IPv6 has no header checksums.
 * A quoted packet with extension headers is not matched (passes).
 */
#ifndef LB_ICMP6_H
#define LB_ICMP6_H

#include "consts.h"
#include "csum.h"
#include "maps.h"
#include "pkt.h"

#define ICMPV6_DEST_UNREACH 1
#define ICMPV6_PKT_TOOBIG 2
#define ICMPV6_TIME_EXCEED 3

/*
 * An ICMPv6 packet (p->eth and p->ip6 parsed; its message at `icmp`,
 * inside the datagram that ends at `dgram_end`): translates an error about
 * a tracked flow and returns its verdict, or returns -1 to pass it.
 */
static __always_inline int icmp6_error(struct xdp_md *ctx, struct pkt6 *p,
				       void *icmp, void *dgram_end)
{
	void *data_end = (void *)(long)ctx->data_end;
	struct ipv6hdr *in;
	__u8 type, proto;
	__be16 *ports;
	__sum16 *icheck, *l4check = NULL, old_l4;
	struct flow6_key k = {};
	struct flow6 *f;
	__u64 in_addr, in_ports, out_addr, d;

	if (icmp + 8 > data_end || icmp + 8 > dgram_end)
		return -1;
	type = *(__u8 *)icmp;
	if (type != ICMPV6_DEST_UNREACH && type != ICMPV6_PKT_TOOBIG &&
	    type != ICMPV6_TIME_EXCEED)
		return -1;
	icheck = icmp + 2;
	in = icmp + 8;
	if ((void *)(in + 1) > data_end || (void *)(in + 1) > dgram_end)
		return -1;
	proto = in->nexthdr;
	if (in->version != 6 || (proto != IPPROTO_TCP && proto != IPPROTO_UDP))
		return -1;
	ports = (void *)(in + 1);
	if ((void *)ports + 8 > data_end || (void *)ports + 8 > dgram_end)
		return -1;
	if (proto == IPPROTO_UDP)
		l4check = (void *)ports + 6;
	else if ((void *)ports + 18 <= data_end &&
		 (void *)ports + 18 <= dgram_end)
		l4check = (void *)ports + 16;

	k.saddr = *ip6_daddr(in);
	k.daddr = *ip6_saddr(in);
	k.sport = ports[1];
	k.dport = ports[0];
	k.proto = proto;
	f = ct_live_entry6(&k, lb_now());
	if (!f)
		return -1;

	/* The quoted packet becomes f->daddr:f->dport -> f->saddr:f->sport. */
	in_addr = csum_delta16(ip6_saddr(in), &f->daddr) +
		  csum_delta16(ip6_daddr(in), &f->saddr);
	in_ports =
	    csum_delta2(ports[0], f->dport) + csum_delta2(ports[1], f->sport);
	*ip6_saddr(in) = f->daddr;
	*ip6_daddr(in) = f->saddr;
	ports[0] = f->dport;
	ports[1] = f->sport;
	d = in_addr + in_ports;
	if (l4check && !(proto == IPPROTO_UDP && *l4check == 0)) {
		old_l4 = *l4check;
		l4_csum_rewrite(l4check, in_addr, in_ports, 0,
				proto == IPPROTO_UDP);
		d += csum_delta2(old_l4, *l4check);
	}
	/* The outer header: from the LB's side of that leg (its addresses
	 * are in the ICMPv6 checksum's pseudo-header). */
	out_addr = csum_delta16(ip6_saddr(p->ip6), &f->saddr) +
		   csum_delta16(ip6_daddr(p->ip6), &f->daddr);
	*icheck = csum_update(*icheck, d + out_addr);
	*ip6_saddr(p->ip6) = f->saddr;
	*ip6_daddr(p->ip6) = f->daddr;
	count_backend(ctx, f->backend, 0);
	return nat_xmit6(ctx, p, f);
}

#endif /* LB_ICMP6_H */
