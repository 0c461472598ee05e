// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * lb's XDP datapath: full NAT layer-4 load balancing for IPv4 TCP and UDP.
 *
 *   client -> VIP:port       becomes  LB:natport -> backend:port
 *   backend -> LB:natport    becomes  VIP:port -> client
 *
 * A connection table remembers both directions of every flow; a new flow
 * picks its backend from the service's Maglev table. Everything else passes
 * to the kernel untouched.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lb.h"

/* Load-time settings, set by the CLI between open and load. */
const volatile __u8 skb_mode = 0; /* skb mode: partial checksums exist */
const volatile __u16 nat_port_lo =
    61000; /* NAT source ports towards backends */
const volatile __u16 nat_port_hi = 65535;  /* (host order, inclusive) */
const volatile __u32 maglev_size = 65537;  /* entries of every Maglev table */
const volatile __u32 hz = 250;		   /* clock ticks (jiffies) a second */
const volatile __u32 tcp_timeout = 150000; /* idle TCP flow, ticks */
const volatile __u32 udp_timeout = 15000;  /* idle UDP flow, ticks */
const volatile __u32 fin_timeout = 2500; /* after RST or FIN both ways, ticks */
const volatile __u32 nh_ttl = 250;	 /* a cached next hop is fresh, ticks */

#include "parse.h"
#include "maps.h"
#include "nat.h"
#include "conntrack.h"

/* Parse up to the ports; a reason counter on failure, 0 on success. */
static __always_inline int parse(struct xdp_md *ctx, struct pkt *p)
{
	struct hdr_cursor c = {(void *)(long)ctx->data,
			       (void *)(long)ctx->data_end};
	struct iphdr *ip;

	p->eth = parse_eth(&c);
	if (!p->eth)
		return LB_PASS_MALFORMED;
	if (p->eth->h_proto != bpf_htons(ETH_P_IP))
		return LB_PASS_NOT_IPV4;
	ip = parse_ipv4(&c);
	if (!ip)
		return LB_PASS_MALFORMED;
	p->ip = ip;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return LB_PASS_NOT_L4;
	if (ipv4_is_fragment(ip))
		return LB_PASS_FRAGMENT;
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = parse_tcp(&c, ip);

		if (!tcp)
			return LB_PASS_MALFORMED;
		p->ports = &tcp->source;
		p->l4_check = &tcp->check;
		p->tcp_flags = ((__u8 *)tcp)[13];
	} else {
		struct udphdr *udp = parse_udp(&c, ip);

		if (!udp)
			return LB_PASS_MALFORMED;
		p->ports = &udp->source;
		p->l4_check = &udp->check;
		p->tcp_flags = 0;
	}
	p->l4_len = bpf_ntohs(ip->tot_len) - ip->ihl * 4;
	p->key.saddr = ip->saddr;
	p->key.daddr = ip->daddr;
	p->key.sport = p->ports[0];
	p->key.dport = p->ports[1];
	p->key.proto = ip->protocol;
	return 0;
}

static __always_inline struct svc_value *service_of(const struct flow_key *k)
{
	struct svc_key sk = {
	    .vip = k->daddr, .port = k->dport, .proto = k->proto};
	struct svc_value *svc = bpf_map_lookup_elem(&services, &sk);

	if (svc)
		return svc;
	sk.port = 0; /* a service on every port of the VIP */
	return bpf_map_lookup_elem(&services, &sk);
}

static __always_inline int process(struct xdp_md *ctx)
{
	struct pkt p = {};
	struct flow *f, nf; /* nf: a new flow's entry, set by flow_new */
	__u32 now;
	int why, new_flow = 0;

	why = parse(ctx, &p);
	if (why)
		return count(ctx, why, XDP_PASS);

	now = lb_now();
	f = bpf_map_lookup_elem(&conntrack, &p.key);
	if (f && (flow_expired(f, p.key.proto, now) ||
		  ((f->state & LB_CT_CLOSING) &&
		   (p.tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN))) {
		/* A dead flow's return path is nobody's; a client's new
		 * flow (or reused port) starts over. */
		if (f->dir == LB_DIR_TO_CLIENT)
			return count(ctx, LB_PASS_NOT_OURS, XDP_PASS);
		f = NULL;
	}
	if (!f) {
		struct svc_value *svc;

		/* Only a SYN opens a TCP connection: a stray segment (of a
		 * flow that ended, or a flood of ACKs) goes to the kernel,
		 * which answers with a RST, and costs no table entries. */
		if (p.key.proto == IPPROTO_TCP &&
		    (p.tcp_flags & (TCP_SYN | TCP_ACK)) != TCP_SYN)
			return count(ctx, LB_PASS_NOT_OURS, XDP_PASS);
		svc = service_of(&p.key);
		if (!svc)
			return count(ctx, LB_PASS_NOT_OURS, XDP_PASS);
		why = flow_new(ctx, &p, svc->id, now, &nf);
		if (why && why != LB_PASS_NO_NEIGH)
			return count(ctx, why,
				     why == LB_PASS_NO_ROUTE ? XDP_PASS
							     : XDP_DROP);
		f = &nf; /* the entry as written: no need to look it up */
		new_flow = 1;
	} else {
		flow_touch(f, p.key.proto, now);
		if (p.tcp_flags & (TCP_FIN | TCP_RST))
			flow_tcp_end(f, p.tcp_flags);
	}
	/* A flow whose next hop was unresolved: try again (a new flow has
	 * just tried). */
	if (!f->nh_ok && !new_flow && flow_route(ctx, f, 0) == LB_PASS_NO_ROUTE)
		return count(ctx, LB_PASS_NO_ROUTE, XDP_PASS);

	nat_rewrite(ctx, &p, f);
	count_backend(ctx, f->backend, new_flow);
	if (new_flow)
		count(ctx, LB_NEW_FLOW, 0);
	if (!f->nh_ok) /* the kernel forwards it, resolving the neighbour */
		return count(ctx, LB_PASS_NO_NEIGH, XDP_PASS);
	return count(ctx,
		     f->dir == LB_DIR_TO_BACKEND ? LB_TO_BACKEND : LB_TO_CLIENT,
		     nat_xmit(ctx, &p, f));
}

SEC("xdp")
int lb_xdp(struct xdp_md *ctx)
{
	return process(ctx);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
