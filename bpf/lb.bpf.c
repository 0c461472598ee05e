// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * lb's XDP datapath: full NAT layer-4 load balancing for IPv4 TCP and UDP.
 *
 *   client -> VIP:port       becomes  LB:natport -> backend:port
 *   backend -> LB:natport    becomes  VIP:port -> client
 *
 * A connection table remembers both directions of every flow; a new flow
 * picks its backend from the service's Maglev table. ICMP errors about a
 * tracked flow go to its other end, translated (icmp.h). Services in
 * DSR or IP-in-IP mode send the client's packet itself to the backend
 * (dsr.h, ipip.h). Everything else passes to the kernel untouched.
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
const volatile __u32 snat_full = 0;
const volatile __u32 maglev_size = 65537;  /* entries of every Maglev table */
const volatile __u32 hz = 250;		   /* clock ticks (jiffies) a second */
const volatile __u32 tcp_timeout = 150000; /* idle TCP flow, ticks */
const volatile __u32 udp_timeout = 15000;  /* idle UDP flow, ticks */
const volatile __u32 syn_timeout = 2500;   /* idle half-open TCP flow, ticks */
const volatile __u32 fin_timeout = 2500; /* after RST or FIN both ways, ticks */
const volatile __u32 tw_timeout = 15250; /* a backend's TIME_WAIT, ticks */
const volatile __u32 nh_ttl = 250;	 /* a cached next hop is fresh, ticks */
/* The shared enums' BTF anchor (see lb.h); last, so no setting moves. */
const volatile struct lb_shared lb_shared = {};

#include "parse.h"
#include "maps.h"
#include "nat.h"
#include "conntrack.h"
#include "dsr.h"
#include "frag.h"
#include "icmp.h"
#include "trace.h"

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
	if (ipv4_is_fragment(ip)) {
		/* Only the first fragment has ports (frag.h). */
		if (ip->frag_off & bpf_htons(IP_OFFSET)) {
			p->frag = LB_FRAG_LATER;
			return LB_PASS_FRAGMENT;
		}
		p->frag = LB_FRAG_FIRST;
	}
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

/* A TCP segment with SYN and without ACK: only it opens a connection. */
static __always_inline int is_syn(const struct pkt *p)
{
	return p->key.proto == IPPROTO_TCP &&
	       (p->tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN;
}

/* A TCP segment with SYN and ACK: a backend's answer to a SYN. */
static __always_inline int is_synack(const struct pkt *p)
{
	return (p->tcp_flags & (TCP_SYN | TCP_ACK)) == (TCP_SYN | TCP_ACK);
}

/* Counts the packet under `reason` and notes it for the trace. */
static __always_inline int done(struct xdp_md *ctx, struct verdict_note *n,
				enum lb_stat reason, int verdict)
{
	n->reason = reason;
	return count(ctx, reason, verdict);
}

static __always_inline int process(struct xdp_md *ctx, struct verdict_note *n)
{
	struct pkt p = {};
	struct flow *f, *o, nf; /* nf: a new flow's entry, set by flow_new */
	struct flow_key ok = {};
	__u32 state;
	__u64 now;
	int why, est = 1, new_flow = 0, routed = 0;

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

	now = lb_now();
	f = bpf_map_lookup_elem(&conntrack, &p.key);
	if (!f) {
		est = 0;
		f = bpf_map_lookup_elem(&ct_new, &p.key);
	}
	if (f && f->dir == LB_DIR_TO_CLIENT) {
		/* From a backend to a NAT tuple: the owner itself. */
		o = f;
		state = o->state;
		if ((state & LB_CT_RECLAIMED) ||
		    ct_expired(o, state, p.key.proto, est, now) ||
		    ((state & LB_CT_CLOSING) && is_syn(&p)))
			return done(ctx, n, LB_PASS_NOT_OURS, XDP_PASS);
		ct_seen(o, now);
		/* The backend's first answer (an answered flow in conntrack
		 * has the bit, unless a SYN reopened it): if a SYN-ACK, the
		 * handshake's latency. */
		if (!(state & LB_CT_REPLIED) &&
		    !(__sync_fetch_and_or(&o->state, LB_CT_REPLIED) &
		      LB_CT_REPLIED) &&
		    is_synack(&p))
			count_handshake(o);
		if (p.tcp_flags & (TCP_FIN | TCP_RST)) {
			if ((p.tcp_flags & TCP_RST) && !(state & LB_CT_CLOSING))
				count_reset(o->backend);
			ct_tcp_end(o, LB_DIR_TO_CLIENT, p.tcp_flags);
		}
		goto xmit;
	}
	if (f) {
		/* A client entry is valid while its owner points back. */
		ct_owner_key(f, p.key.proto, &ok);
		o = est ? bpf_map_lookup_elem(&conntrack, &ok)
			: bpf_map_lookup_elem(&ct_new, &ok);
		if (!o && !est) {
			/* Promoted by another CPU meanwhile (ct_promote)? */
			struct flow *pf =
			    bpf_map_lookup_elem(&conntrack, &p.key);

			if (pf) {
				f = pf;
				est = 1;
				ct_owner_key(f, p.key.proto, &ok);
			}
			/* (or the tuple's owner now: another connection's) */
			o = bpf_map_lookup_elem(&conntrack, &ok);
		}
		state = o ? o->state : 0;
		if (!o || !ct_owner_of(o, &p.key) ||
		    (state & LB_CT_RECLAIMED)) {
			/* Its owner gone: evicted from a full table (the
			 * connection is lost); or its tuple given to another
			 * connection (this one had ended). */
			count(ctx, o ? LB_STALE : LB_EVICTED, 0);
			if (est)
				bpf_map_delete_elem(&conntrack, &p.key);
			else
				bpf_map_delete_elem(&ct_new, &p.key);
			f = NULL;
		} else if ((is_syn(&p) || p.key.proto == IPPROTO_UDP) &&
			   ((state & LB_CT_CLOSING) ||
			    ct_expired(o, state, p.key.proto, est, now))) {
			/* The client reuses a finished flow's ports: the
			 * backend still knows the tuple (TIME_WAIT), so the
			 * new connection takes the same one, if its backend
			 * still takes flows. (UDP: any packet after
			 * expiry.) */
			if (backend_takes(f, &p.key)) {
				if (p.key.proto == IPPROTO_TCP) {
					count_unanswered(o, state);
					o->syn_t = hs_now();
				}
				o->state = 0;
				o->seen = now;
				o->created = now;
				count(ctx, LB_REOPEN, 0);
				new_flow = 1;
			} else {
				if (est)
					bpf_map_delete_elem(&conntrack, &p.key);
				else
					bpf_map_delete_elem(&ct_new, &p.key);
				f = NULL;
			}
		} else if (ct_expired(o, state, p.key.proto, est, now)) {
			/* Dead: the kernel answers (RST) and no state is
			 * made. */
			return done(ctx, n, LB_PASS_NOT_OURS, XDP_PASS);
		} else {
			ct_seen(o, now);
			if (p.tcp_flags & (TCP_FIN | TCP_RST))
				ct_tcp_end(o, LB_DIR_TO_BACKEND, p.tcp_flags);
			if (!est && (state & LB_CT_REPLIED) && ct_confirms(&p))
				count(ctx, ct_promote(&p.key, f, &ok, o), 0);
		}
	}
	if (!f) {
		struct svc_value *svc;

		/* Only a SYN opens a TCP connection: a stray segment (of a
		 * flow that ended, or a flood of ACKs) goes to the kernel,
		 * which answers with a RST, and costs no table entries;
		 * unless it is for a DSR or IPIP service (any packet there). */
		if (p.key.proto == IPPROTO_TCP && !is_syn(&p) && !dsr_any())
			return done(ctx, n, LB_PASS_NOT_OURS, XDP_PASS);
		svc = service_of(&p.key);
		if (!svc)
			return done(ctx, n, LB_PASS_NOT_OURS, XDP_PASS);
		if (svc->flags & (LB_SVC_DSR | LB_SVC_IPIP)) {
			int dsr_why = 0, dsr_new = 0;
			int act = dsr_forward(ctx, &p, svc->id, svc->flags, now,
					      &dsr_why, &dsr_new);

			if (dsr_new)
				count(ctx, LB_NEW_FLOW, 0);
			n->new_flow = dsr_new;
			return done(ctx, n, dsr_why, act);
		}
		if (p.key.proto == IPPROTO_TCP && !is_syn(&p))
			return done(ctx, n, LB_PASS_NOT_OURS, XDP_PASS);
		why = flow_new(ctx, &p, svc->id, svc->flags, now, &nf);
		if (why && why != LB_PASS_NO_NEIGH)
			return done(ctx, n, why,
				    why == LB_PASS_NO_ROUTE ? XDP_PASS
							    : XDP_DROP);
		f = &nf; /* the entry as written: no need to look it up */
		new_flow = 1;
		routed = 1;
	}
	/* A flow whose next hop was unresolved: try again (a new flow has
	 * just tried). */
	if (!f->nh_ok && !routed && flow_route(ctx, f, 0) == LB_PASS_NO_ROUTE)
		return done(ctx, n, LB_PASS_NO_ROUTE, XDP_PASS);

xmit:
	if (p.frag && f->nh_ok)
		frag_first(&p, f, now);
	nat_rewrite(ctx, &p, f);
	count_backend(ctx, f->backend, new_flow);
	if (new_flow)
		count(ctx, LB_NEW_FLOW, 0);
	n->new_flow = new_flow;
	if (!f->nh_ok) /* the kernel forwards it, resolving the neighbour */
		return done(ctx, n, LB_PASS_NO_NEIGH, XDP_PASS);
	return done(ctx, n,
		    f->dir == LB_DIR_TO_BACKEND ? LB_TO_BACKEND : LB_TO_CLIENT,
		    nat_xmit(ctx, &p, f));
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
