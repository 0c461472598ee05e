/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/* Types the decapsulation program (decap.bpf.c) shares with the Rust CLI
 * (through its skeleton). */
#ifndef LB_DECAP_H
#define LB_DECAP_H

/*
 * What the program did with a packet: the index of its per-CPU
 * `decap_stats` map (struct lb_counter: packets, bytes). The Rust side
 * names them (src/decap.rs) in this order: decapsulated, pass_not_ipip,
 * pass_fragment, pass_malformed.
 */
enum decap_stat {
	LB_DECAP_DONE = 0,	 /* IPIP: outer header removed, inner passed */
	LB_DECAP_PASS_NOT_IPIP,	 /* not IPv4 protocol 4 nor IPv6 next header 41:
				    untouched */
	LB_DECAP_PASS_FRAGMENT,	 /* a fragment of an IPIP datagram: untouched */
	LB_DECAP_PASS_MALFORMED, /* truncated or bad outer header (length,
				    checksum), or no IP header of the same
				    family inside: untouched */
	LB_DECAP_STAT_MAX,
};

/* Never read: puts the enum into BTF for the skeleton (as lb.h's
 * struct lb_shared). */
struct decap_shared {
	enum decap_stat stat;
};

#endif /* LB_DECAP_H */
