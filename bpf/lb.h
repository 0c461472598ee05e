/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/* Types shared by the XDP program and the Rust CLI (through the skeleton). */
#ifndef LB_H
#define LB_H

/* Most backends the load-time configuration can name. */
#define LB_MAX_BACKENDS 16

/*
 * Why a packet got its verdict. Index of the per-CPU `stats` map; the Rust
 * side prints these names (keep src/stats.rs in the same order).
 */
enum lb_stat {
	LB_TO_BACKEND = 0, /* client -> LB, rewritten to a backend */
	LB_TO_CLIENT,	   /* backend -> LB, rewritten to the client */
	LB_PASS_NOT_IPV4,  /* ARP, IPv6, VLAN, ...: not ours */
	LB_PASS_NOT_TCP,   /* ICMP, UDP, ... : not ours */
	LB_PASS_NOT_OURS,  /* IPv4/TCP, but not client<->LB<->backend */
	LB_PASS_MALFORMED, /* truncated header, IHL < 5, bad lengths */
	LB_PASS_NO_ROUTE,  /* FIB has no usable route to the new destination */
	LB_PASS_NO_NEIGH,  /* next hop unresolved: rewritten, kernel forwards */
	LB_DROP_FRAGMENT,  /* IP fragment for the LB: no ports to balance on */
	LB_STAT_MAX,
};

/* One per-CPU counter slot. */
struct lb_counter {
	__u64 packets;
	__u64 bytes;
};

#endif /* LB_H */
