/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * The address family of a pass over the pipeline (pipeline.h), which
 * lb.bpf.c compiles twice: with LB_V6 0 for IPv4, with LB_V6 1 for IPv6.
 * The connection table, NAT allocation, routing, rewrite and flow handling
 * are written once over the names below; each family gets its own maps,
 * keys and functions (an IPv6 function is the IPv4 one's name with a 6),
 * so IPv4 keeps its 16-byte keys and no packet tests its family twice.
 * Included before each pass; no include guard, on purpose.
 */
#undef FN
#undef FKEY
#undef FLOW
#undef PKT
#undef ADDR
#undef CT
#undef CT_NEW
#undef HO_SET
#undef DSR_FLOWS
#undef ADDR_EQ
#undef BE_ADDR
#undef NH_SADDR
#undef SNAT_COUNT

#if LB_V6
#define FN(name) name##6
#define FKEY struct flow6_key
#define FLOW struct flow6
#define PKT struct pkt6
#define ADDR struct lb_in6
#define CT conntrack6
#define CT_NEW ct_new6
#define HO_SET struct ho_set6
#define DSR_FLOWS dsr_flows6
#define ADDR_EQ(a, b) in6_eq(&(a), &(b))
#define BE_ADDR(be) ((be)->ip6)
#define NH_SADDR(nh) ((nh)->saddr6)
#define SNAT_COUNT snat_count6
#else
#define FN(name) name
#define FKEY struct flow_key
#define FLOW struct flow
#define PKT struct pkt
#define ADDR __be32
#define CT conntrack
#define CT_NEW ct_new
#define HO_SET struct ho_set
#define DSR_FLOWS dsr_flows
#define ADDR_EQ(a, b) ((a) == (b))
#define BE_ADDR(be) ((be)->ip)
#define NH_SADDR(nh) ((nh)->saddr)
#define SNAT_COUNT snat_count
#endif
