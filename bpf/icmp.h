/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * ICMP errors about tracked flows (IPv4): destination unreachable (among
 * them fragmentation needed, the path MTU discovery message) and time
 * exceeded, from anywhere on either leg of a connection.
 *
 * An error quotes the packet it is about. lb sent that packet itself,
 * rewritten: towards a backend as SNAT:natport -> B:bport, towards a client
 * as VIP:vport -> C:cport. The quoted tuple reversed is the key of the
 * connection-table entry that rewrites the other direction (the owner, or
 * the client's entry), and that entry says where the error must go and
 * what that end sent: the quoted header becomes the packet the end itself
 * sent (C -> VIP, or B -> SNAT), the outer header comes from the LB's side
 * of that leg (VIP -> C, or SNAT -> B), and every checksum the rewrite
 * touches is updated: outer IP, the quoted IP header's, the quoted TCP or
 * UDP checksum if it is quoted, and the ICMP checksum over all of it.
 * Errors that match no live flow pass to the kernel untouched.
 */
#ifndef LB_ICMP_H
#define LB_ICMP_H

#include "consts.h"
#include "csum.h"
#include "maps.h"
#include "pkt.h"

#define ICMP_DEST_UNREACH 3
#define ICMP_TIME_EXCEEDED 11

/*
 * An ICMP packet (p->eth and p->ip parsed, ip the outer header, whose
 * payload starts at `icmp`): translates an error about a tracked flow and
 * returns its verdict, or returns -1 to pass it (with the reason counted by
 * the caller).
 */
static __always_inline int icmp_error(struct xdp_md *ctx, struct pkt *p,
				      void *icmp, void *data_end)
{
	struct iphdr *ip = p->ip, *in;
	__u8 type, proto;
	__be16 *ports;
	__sum16 *icheck, *l4check = NULL;
	struct flow_key k = {};
	struct flow *f;
	__u32 ihl;
	__u64 in_addr, in_ports, d;
	__sum16 old_ip_check, old_l4 = 0;
	void *quoted_end = (void *)ip + bpf_ntohs(ip->tot_len);

	if (icmp + 8 > data_end || icmp + 8 > quoted_end)
		return -1;
	type = *(__u8 *)icmp;
	if (type != ICMP_DEST_UNREACH && type != ICMP_TIME_EXCEEDED)
		return -1;
	icheck = icmp + 2;
	in = icmp + 8;
	if ((void *)(in + 1) > data_end || (void *)(in + 1) > quoted_end)
		return -1;
	if (in->version != 4 || in->ihl < 5 || ipv4_is_fragment(in))
		return -1; /* no ports to match a later fragment by */
	proto = in->protocol;
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return -1;
	ihl = in->ihl * 4;
	ports = (void *)in + ihl;
	/* RFC 792: the quote has at least 8 bytes past the IP header. */
	if ((void *)ports + 8 > data_end || (void *)ports + 8 > quoted_end)
		return -1;
	if (proto == IPPROTO_UDP)
		l4check = (void *)ports + 6;
	else if ((void *)ports + 18 <= data_end &&
		 (void *)ports + 18 <= quoted_end)
		l4check = (void *)ports + 16;

	k.saddr = in->daddr;
	k.daddr = in->saddr;
	k.sport = ports[1];
	k.dport = ports[0];
	k.proto = proto;
	f = ct_live_entry(&k, lb_now());
	if (!f)
		return -1;

	/* The quoted packet becomes what the error's receiver sent:
	 * f->daddr:f->dport -> f->saddr:f->sport. */
	in_addr =
	    csum_delta4(in->saddr, f->daddr) + csum_delta4(in->daddr, f->saddr);
	in_ports =
	    csum_delta2(ports[0], f->dport) + csum_delta2(ports[1], f->sport);
	old_ip_check = in->check;
	in->check = csum_update(in->check, in_addr);
	in->saddr = f->daddr;
	in->daddr = f->saddr;
	ports[0] = f->dport;
	ports[1] = f->sport;
	d = in_addr + in_ports + csum_delta2(old_ip_check, in->check);
	if (l4check && !(proto == IPPROTO_UDP && *l4check == 0)) {
		old_l4 = *l4check;
		l4_csum_rewrite(l4check, in_addr, in_ports, 0,
				proto == IPPROTO_UDP);
		d += csum_delta2(old_l4, *l4check);
	}
	*icheck = csum_update(*icheck, d);

	/* The outer header: from the LB's side of that leg. */
	ip_readdress(ip, f->saddr, f->daddr);
	count_backend(ctx, f->backend, 0);
	return nat_xmit(ctx, p, f);
}

#endif /* LB_ICMP_H */
