// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * The benchmarks' forward-only ceiling: the cheapest XDP program for lb's
 * hop. A static, stateless full NAT between one client and one backend,
 * every address and MAC a load-time constant: no connection table, no
 * Maglev, no FIB lookup, no counters.
 *
 *   client C:p -> VIP:vport     becomes  LB:p -> B:bport     (XDP_TX)
 *   backend B:bport -> LB:p     becomes  VIP:vport -> C:p    (XDP_TX)
 *
 * The client's port is kept (one client, so it cannot collide). vport 0:
 * every TCP port, kept as it is. Checksums are updated incrementally
 * (RFC 1624) and must be complete in the packet (native mode, senders
 * without TX checksum offload, as in scripts/topo native). Everything else
 * passes to the kernel.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "csum.h"

#define ETH_P_IP 0x0800
#define IPPROTO_TCP 6

/* The addresses (network order), set from Rust before load. */
const volatile __be32 fwd_vip;	   /* the service address */
const volatile __be32 fwd_lb;	   /* the LB's source address to the backend */
const volatile __be32 fwd_client;  /* the one client */
const volatile __be32 fwd_backend; /* the one backend */
/* The service port and the backend's (network order); vport 0: any port. */
const volatile __be16 fwd_vport;
const volatile __be16 fwd_bport;
/* The LB's interface, the client's and the backend's MACs. */
const volatile __u8 fwd_lb_mac[6];
const volatile __u8 fwd_client_mac[6];
const volatile __u8 fwd_backend_mac[6];

static __always_inline void set_mac(unsigned char *dst,
				    const volatile __u8 *src)
{
	for (int i = 0; i < 6; i++)
		dst[i] = src[i];
}

/* Rewrite the addresses and one port of a TCP/IPv4 packet, then the MACs. */
static __always_inline void rewrite(struct ethhdr *eth, struct iphdr *ip,
				    struct tcphdr *tcp, __be32 saddr,
				    __be32 daddr, __be16 *port, __be16 to,
				    const volatile __u8 *dmac)
{
	__u64 addrs =
	    csum_delta4(ip->saddr, saddr) + csum_delta4(ip->daddr, daddr);

	ip->check = csum_update(ip->check, addrs);
	tcp->check = csum_update(tcp->check, addrs + csum_delta2(*port, to));
	ip->saddr = saddr;
	ip->daddr = daddr;
	*port = to;
	set_mac(eth->h_source, fwd_lb_mac);
	set_mac(eth->h_dest, dmac);
}

SEC("xdp")
int fwd_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	struct tcphdr *tcp;

	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->ihl < 5 ||
	    ip->protocol != IPPROTO_TCP)
		return XDP_PASS;
	/* fragments pass: only a first fragment carries the ports */
	if (ip->frag_off & bpf_htons(0x3fff))
		return XDP_PASS;
	tcp = (void *)ip + ip->ihl * 4;
	if ((void *)(tcp + 1) > end)
		return XDP_PASS;

	if (ip->saddr == fwd_client && ip->daddr == fwd_vip &&
	    (!fwd_vport || tcp->dest == fwd_vport)) {
		rewrite(eth, ip, tcp, fwd_lb, fwd_backend, &tcp->dest,
			fwd_vport ? fwd_bport : tcp->dest, fwd_backend_mac);
		return XDP_TX;
	}
	if (ip->saddr == fwd_backend && ip->daddr == fwd_lb &&
	    (!fwd_vport || tcp->source == fwd_bport)) {
		rewrite(eth, ip, tcp, fwd_vip, fwd_client, &tcp->source,
			fwd_vport ? fwd_vport : tcp->source, fwd_client_mac);
		return XDP_TX;
	}
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
