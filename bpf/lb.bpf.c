// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * lb's XDP datapath: full NAT layer-4 load balancing for TCP and UDP over
 * IPv4 and IPv6.
 *
 *   client -> VIP:port       becomes  LB:natport -> backend:port
 *   backend -> LB:natport    becomes  VIP:port -> client
 *
 * A connection table remembers both directions of every flow; a new flow
 * picks its backend from the service's Maglev table. The pipeline that does
 * it is written once and compiled per family (pipeline.h, fam.h). ICMP
 * errors about a tracked flow go to its other end, translated (icmp.h,
 * icmp6.h). IPv4 services in DSR or IP-in-IP mode send the client's packet
 * itself to the backend (dsr.h, ipip.h). Everything else passes to the
 * kernel untouched.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lb.h"

/* Load-time settings, set by the CLI between open and load. */
const volatile __u8 skb_mode = 0; /* skb mode: partial checksums exist */
/* NAT source ports towards backends: up to two ranges (host order,
 * inclusive; an unused range is empty, lo > hi) and how many ports in all. */
const volatile __u16 nat_lo[LB_MAX_PORT_RANGES] = {1024, 61000};
const volatile __u16 nat_hi[LB_MAX_PORT_RANGES] = {32767, 65535};
const volatile __u32 nat_size = 36279;
/* SNAT pool: source addresses towards backends (none: the FIB's source);
 * bit i of snat_full: snat_addr[i] is lb's alone, every port from 1024. */
const volatile __be32 snat_addr[LB_MAX_SNAT] = {};
const volatile __u32 snat_count = 0;
const volatile __u32 snat_full = 0; /* bits 16..: of snat_addr6 */
/* The IPv6 SNAT pool (none: the FIB's source). */
const volatile struct lb_in6 snat_addr6[LB_MAX_SNAT] = {};
const volatile __u32 snat_count6 = 0;
const volatile __u32 maglev_size = 65537;  /* entries of every Maglev table */
const volatile __u32 hz = 250;		   /* clock ticks (jiffies) a second */
const volatile __u32 tcp_timeout = 150000; /* idle TCP flow, ticks */
const volatile __u32 udp_timeout = 15000;  /* idle UDP flow, ticks */
const volatile __u32 syn_timeout = 2500;   /* idle half-open TCP flow, ticks */
const volatile __u32 fin_timeout = 2500; /* after RST or FIN both ways, ticks */
const volatile __u32 tw_timeout = 15250; /* a backend's TIME_WAIT, ticks */
const volatile __u32 nh_ttl = 250;	 /* a cached next hop is fresh, ticks */
/* Handshake latency (SYN to SYN-ACK) is not measured: no clock read on a
 * new flow's SYN, no sample on its SYN-ACK (0, the default: measured, also
 * what an instance of a build before this setting reads as). */
const volatile __u8 hs_latency_off = 0;
/* The half-open tables (halfopen.h): their sets, and the half-open
 * connections asked for (what `lb status` shows). ho_hash_id: which hash
 * (ho_hash) the instance's sets are of, read by user space only (0: an
 * earlier build's; see src/halfopen.rs, HASH); ho_key below. */
const volatile __u32 ho_sets = 128 * 1024;
const volatile __u32 ho_sets6 = 32 * 1024;
const volatile __u32 ho_hash_id = 0;
const volatile __u32 ho_half_open = 0;
/* The random keys of the half-open tables' hash (halfopen.h: ho_hash),
 * drawn for each instance (all 0: an instance of an earlier build). */
const volatile __u64 ho_key[LB_HO_KEYS] = {};
/* The shared enums' BTF anchor (see lb.h); last, so no setting moves. */
const volatile struct lb_shared lb_shared = {};

#include "parse.h"
#include "maps.h"
#include "pkt.h"
#include "trace.h"

/* Counts the packet under `reason` and notes it for the trace. */
static __always_inline int done(struct xdp_md *ctx, struct verdict_note *n,
				enum lb_stat reason, int verdict)
{
	n->reason = reason;
	return count(ctx, reason, verdict);
}

/* The pipeline, once for IPv4 and once for IPv6. */
#define LB_V6 0
#include "pipeline.h"
#undef LB_V6
#define LB_V6 1
#include "pipeline.h"
#undef LB_V6

/* Parse up to the ports; a reason counter on failure, 0 on success. */
static __always_inline int parse(struct xdp_md *ctx, struct pkt *p)
{
	struct hdr_cursor c = {(void *)(long)ctx->data,
			       (void *)(long)ctx->data_end};
	struct iphdr *ip;

	p->eth = parse_eth(&c);
	if (!p->eth)
		return LB_PASS_MALFORMED;
	ip = parse_ipv4(&c);
	if (!ip)
		return LB_PASS_MALFORMED;
	p->ip = ip;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return LB_PASS_NOT_L4;
	if (ipv4_is_fragment(ip)) {
		/* Only the first fragment has ports (frag.h). */
		if (ip->frag_off & bpf_htons(IP_OFFSET)) {
			p->frag = LB_FRAG_LATER;
			return LB_PASS_FRAGMENT;
		}
		p->frag = LB_FRAG_FIRST;
	}
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *tcp =
		    parse_tcp(&c, (void *)ip + bpf_ntohs(ip->tot_len));

		if (!tcp)
			return LB_PASS_MALFORMED;
		p->ports = &tcp->source;
		p->l4_check = &tcp->check;
		p->tcp_flags = ((__u8 *)tcp)[13];
	} else {
		struct udphdr *udp =
		    parse_udp(&c, (void *)ip + bpf_ntohs(ip->tot_len));

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

/* parse() for IPv6: past the extension headers lb skips (parse.h) to the
 * ports. A UDP datagram without a checksum is malformed (RFC 8200 8.1). */
static __always_inline int parse6(struct xdp_md *ctx, struct pkt6 *p)
{
	struct hdr_cursor c = {(void *)(long)ctx->data,
			       (void *)(long)ctx->data_end};
	struct ipv6hdr *ip6;
	void *dgram_end;
	__u8 nexthdr;
	int ext;

	p->eth = parse_eth(&c);
	if (!p->eth)
		return LB_PASS_MALFORMED;
	ip6 = parse_ipv6(&c);
	if (!ip6)
		return LB_PASS_MALFORMED;
	p->ip6 = ip6;
	dgram_end = (void *)(ip6 + 1) + bpf_ntohs(ip6->payload_len);
	nexthdr = ip6->nexthdr;
	ext = ipv6_skip_ext(&c, &nexthdr, dgram_end);
	if (ext == IPV6_EXT_BAD)
		return LB_PASS_MALFORMED;
	if (ext == IPV6_EXT_FRAGMENT) {
		/* RFC 8200 4.5: next header, reserved, offset (13 bits, in
		 * 8 bytes) and M, identification. Only the first fragment
		 * (offset 0) has the ports (frag6.h). */
		__u8 *h = c.pos;
		__u16 off;

		if ((void *)(h + 8) > c.end || (void *)(h + 8) > dgram_end)
			return LB_PASS_MALFORMED;
		nexthdr = h[0];
		off = ((__u16)h[2] << 8 | h[3]) >> 3;
		p->frag_id = *(__be32 *)(h + 4);
		p->key.proto = nexthdr;
		if (off) {
			p->frag = LB_FRAG_LATER;
			return LB_PASS_FRAGMENT;
		}
		if (h[3] & 1)
			p->frag = LB_FRAG_FIRST;
		c.pos = h + 8;
	} else if (ext != IPV6_EXT_OK) {
		return LB_PASS_NOT_L4;
	}
	if (nexthdr == IPPROTO_TCP) {
		struct tcphdr *tcp = parse_tcp(&c, dgram_end);

		if (!tcp)
			return LB_PASS_MALFORMED;
		p->ports = &tcp->source;
		p->l4_check = &tcp->check;
		p->tcp_flags = ((__u8 *)tcp)[13];
	} else if (nexthdr == IPPROTO_UDP) {
		struct udphdr *udp = parse_udp(&c, dgram_end);

		if (!udp)
			return LB_PASS_MALFORMED;
		if (!udp->check)
			return LB_PASS_MALFORMED;
		p->ports = &udp->source;
		p->l4_check = &udp->check;
		p->tcp_flags = 0;
	} else {
		if (nexthdr == IPPROTO_ICMPV6) {
			/* (for icmp6_error: where the message starts) */
			p->ports = c.pos;
			p->key.proto = nexthdr;
		}
		return LB_PASS_NOT_L4;
	}
	p->l4_len = dgram_end - (void *)p->ports;
	p->key.saddr = *ip6_saddr(ip6);
	p->key.daddr = *ip6_daddr(ip6);
	p->key.sport = p->ports[0];
	p->key.dport = p->ports[1];
	p->key.proto = nexthdr;
	return 0;
}

/* An IPv4 packet: ICMP errors and later fragments of tracked flows, and
 * TCP and UDP through the connection table. A function of its own, like
 * process6: each family's stack frame then need not fit beside the other's
 * in the 512 bytes a program has (a BPF-to-BPF call costs ~2 ns). */
static __noinline int process4(struct xdp_md *ctx, struct verdict_note *n)
{
	struct pkt p = {};
	int why;

	why = parse(ctx, &p);
	if (why == LB_PASS_NOT_L4 && p.ip->protocol == IPPROTO_ICMP &&
	    !ipv4_is_fragment(p.ip)) {
		int act = icmp_error(ctx, &p, (void *)p.ip + p.ip->ihl * 4,
				     (void *)(long)ctx->data_end);

		if (act >= 0)
			return done(ctx, n, LB_ICMP_ERROR, act);
	}
	if (why == LB_PASS_FRAGMENT && p.frag == LB_FRAG_LATER) {
		int act = frag_later(ctx, &p, lb_now());

		if (act >= 0)
			return done(ctx, n, LB_FRAGMENT, act);
	}
	if (why)
		return done(ctx, n, why, XDP_PASS);
	return flow_process(ctx, n, &p);
}

/* An IPv6 packet: ICMPv6 errors about tracked flows, and TCP and UDP
 * through the connection table. */
static __noinline int process6(struct xdp_md *ctx, struct verdict_note *n)
{
	struct pkt6 p = {};
	int why;

	why = parse6(ctx, &p);
	if (why == LB_PASS_FRAGMENT && p.frag == LB_FRAG_LATER) {
		int act = frag_later6(ctx, &p, lb_now());

		if (act >= 0)
			return done(ctx, n, LB_FRAGMENT, act);
	}
	if (why == LB_PASS_NOT_L4 && p.key.proto == IPPROTO_ICMPV6 && p.ports) {
		int act = icmp6_error(ctx, &p, p.ports,
				      (void *)(p.ip6 + 1) +
					  bpf_ntohs(p.ip6->payload_len));

		if (act >= 0)
			return done(ctx, n, LB_ICMP_ERROR, act);
	}
	if (why)
		return done(ctx, n, why, XDP_PASS);
	return flow_process6(ctx, n, &p);
}

static __always_inline int process(struct xdp_md *ctx, struct verdict_note *n)
{
	struct ethhdr *eth = (void *)(long)ctx->data;

	if ((void *)(eth + 1) > (void *)(long)ctx->data_end)
		return done(ctx, n, LB_PASS_MALFORMED, XDP_PASS);
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		return process4(ctx, n);
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return process6(ctx, n);
	return done(ctx, n, LB_PASS_NOT_IP, XDP_PASS);
}

SEC("xdp")
int lb_xdp(struct xdp_md *ctx)
{
	struct lb_trace_cfg *t = trace_state();
	struct verdict_note n = {};
	int verdict;

	if (!t)
		return XDP_PASS; /* (a one-entry array: never) */
	trace_begin(ctx, t);
	verdict = process(ctx, &n);
	trace_end(ctx, t, &n, verdict);
	return verdict;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
