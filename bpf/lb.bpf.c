// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * The talk's XDP load balancer, made correct: double NAT between one client
 * and a set of backends behind the LB address.
 *
 *   client -> LB        becomes  LB -> backend (chosen per connection)
 *   backend -> LB       becomes  LB -> client
 *
 * Everything else passes to the kernel untouched.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lb.h"

/* Load-time configuration, set by the CLI between open and load (addresses
 * and ports in network byte order, converted in Rust). */
const volatile __u8 skb_mode =
    0; /* attached in skb mode: partial checksums exist */
const volatile __be32 lb_ip = 0;     /* the LB's address, the clients' target */
const volatile __be32 client_ip = 0; /* the client whose flows are balanced */
const volatile __be16 lb_port = 0;   /* balanced TCP port; 0 = every port */
const volatile __u32 n_backends = 0; /* used entries of backend_ip */
const volatile __be32 backend_ip[LB_MAX_BACKENDS] = {}; /* backend addresses */

#include "parse.h"
#include "maps.h"
#include "nat.h"

static __always_inline int is_backend(__be32 addr)
{
	for (__u32 i = 0; i < LB_MAX_BACKENDS; i++) {
		if (i >= n_backends)
			break;
		if (backend_ip[i] == addr)
			return 1;
	}
	return 0;
}

static __always_inline int process(struct xdp_md *ctx)
{
	struct hdr_cursor c = {(void *)(long)ctx->data,
			       (void *)(long)ctx->data_end};
	struct ethhdr *eth;
	struct iphdr *ip;
	struct tcphdr *tcp;

	eth = parse_eth(&c);
	if (!eth)
		return count(ctx, LB_PASS_MALFORMED, XDP_PASS);
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return count(ctx, LB_PASS_NOT_IPV4, XDP_PASS);
	ip = parse_ipv4(&c);
	if (!ip)
		return count(ctx, LB_PASS_MALFORMED, XDP_PASS);
	if (ip->protocol != IPPROTO_TCP)
		return count(ctx, LB_PASS_NOT_TCP, XDP_PASS);
	if (ip->daddr != lb_ip)
		return count(ctx, LB_PASS_NOT_OURS, XDP_PASS);
	if (ip->saddr != client_ip && !is_backend(ip->saddr))
		return count(ctx, LB_PASS_NOT_OURS, XDP_PASS);
	/* Ours, but only the first fragment carries ports. */
	if (ipv4_is_fragment(ip))
		return count(ctx, LB_DROP_FRAGMENT, XDP_DROP);
	tcp = parse_tcp(&c, ip);
	if (!tcp)
		return count(ctx, LB_PASS_MALFORMED, XDP_PASS);

	if (ip->saddr == client_ip) {
		__u32 idx;

		if (lb_port && tcp->dest != lb_port)
			return count(ctx, LB_PASS_NOT_OURS, XDP_PASS);
		if (!n_backends)
			return count(ctx, LB_PASS_NOT_OURS, XDP_PASS);
		idx = flow_hash(ip, tcp) % n_backends;
		if (idx >= LB_MAX_BACKENDS)
			return count(ctx, LB_PASS_NOT_OURS, XDP_PASS);
		return nat_forward(ctx, eth, ip, tcp, lb_ip, backend_ip[idx],
				   LB_TO_BACKEND);
	}
	if (lb_port && tcp->source != lb_port)
		return count(ctx, LB_PASS_NOT_OURS, XDP_PASS);
	return nat_forward(ctx, eth, ip, tcp, lb_ip, client_ip, LB_TO_CLIENT);
}

SEC("xdp")
int lb_xdp(struct xdp_md *ctx)
{
	return process(ctx);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
