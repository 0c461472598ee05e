/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * NAT source allocation: the (SNAT address, port) a new flow uses towards
 * its backend. The client's own port first, when it is in the NAT ranges
 * and its tuple is free: the backend then sees what the client sent, and a
 * client that reuses its port lands on the tuple the backend last saw for
 * it. Otherwise ports in order from a per-backend cursor, over every SNAT
 * address: the tuple reused is the one used least recently towards that
 * backend.
 */
#ifndef LB_NATPORT_ONCE
#define LB_NATPORT_ONCE

#include "maps.h"

/* Tuples tried for a new flow before giving up: the client's port, then
 * NAT_TRIES from the cursor: the next NAT_LINEAR in order, then at doubling
 * distances (2, 4, ... 2^17 past those), so that a search crosses a run of
 * live tuples of any length (connections opened in a burst hold
 * consecutive ports) instead of failing in front of it. */
#define NAT_TRIES 32
#define NAT_LINEAR 16

/* First and number of ports an address that is lb's alone may use. */
#define NAT_FULL_LO 1024
#define NAT_FULL_SIZE (65536 - NAT_FULL_LO)

enum nat_claim {
	NAT_TAKEN = 0, /* someone else's: try the next tuple */
	NAT_NEW,       /* ours now: the owner is written to ct_new */
	NAT_OURS_EST,  /* already this client's connection (in conntrack) */
	NAT_OURS_NEW,  /* already this client's connection (in ct_new) */
	NAT_TW,	       /* a finished connection's, the backend's TIME_WAIT not
			  over: taken, unless every other tuple is too */
};

/* Whether SNAT address `idx` is lb's alone (every port from 1024). */
static __always_inline int snat_is_full(__u32 idx)
{
	return (snat_full >> (idx & (LB_MAX_SNAT - 1))) & 1;
}

/* The same for IPv6 SNAT address `idx` (bits from 16). */
static __always_inline int snat_is_full6(__u32 idx)
{
	return (snat_full >> (16 + (idx & (LB_MAX_SNAT - 1)))) & 1;
}

/* The `i`-th port of the NAT ranges (of 1024-65535 if `full`). */
static __always_inline __u16 nat_port_at(__u32 i, int full)
{
	__u32 first = nat_hi[0] - nat_lo[0] + 1;

	if (full)
		return NAT_FULL_LO + i % NAT_FULL_SIZE;
	i %= nat_size;
	if (i < first)
		return nat_lo[0] + i;
	return nat_lo[1] + (i - first);
}

/* Whether `port` is one of the NAT ports (any from 1024 if `full`). */
static __always_inline int nat_port_ok(__u16 port, int full)
{
	if (full)
		return port >= NAT_FULL_LO;
	return (port >= nat_lo[0] && port <= nat_hi[0]) ||
	       (port >= nat_lo[1] && port <= nat_hi[1]);
}

/* How far past the cursor candidate `i` (1..NAT_TRIES) of a search is. */
static __always_inline __u32 nat_step(__u32 i)
{
	if (i <= NAT_LINEAR)
		return i - 1;
	return NAT_LINEAR - 1 + (1u << ((i - NAT_LINEAR) & 31));
}

#endif /* LB_NATPORT_ONCE */

/* The rest once per family (pipeline.h). */

/* A NAT search, the state of the bpf_loop over candidate tuples. */
struct FN(nat_search) {
	FKEY t;	  /* candidate tuple: the owner's key */
	FKEY ck;  /* the client's key */
	FLOW rev; /* the owner to write */
	__u64 now;
	ADDR fib_saddr; /* the LB's source address, if no SNAT pool */
	__u32 h;	/* flow hash */
	__u32 cursor;	/* the backend's cursor when the search began */
	__u32 result;	/* enum nat_claim */
	__u32 tries;	/* the candidate that ended the search */
	__u32 tw;	/* 1 + the first candidate that was NAT_TW, or 0 */
	__u32 force;	/* the last try: candidate tw - 1, taken even so */
};

/* A new flow's working state: the NAT search and the client entry made.
 * Too big for the stack beside the rest (a program has 512 bytes, shared
 * by its call chain), it lives in a per-CPU scratch entry, and bpf_loop
 * (which takes a stack pointer) gets a pointer to the search. Two slots a
 * CPU, each taken while a packet uses it: a run of the program can be
 * interrupted on its CPU by another (BPF_PROG_TEST_RUN from a process by
 * the NIC's softirq; generic XDP from process context), which then takes
 * the other slot. */
struct FN(new_scratch) {
	struct FN(nat_search) s;
	FLOW fwd;
	struct FN(affinity_work) aff; /* client affinity's key and value */
};

struct FN(nat_loop) {
	struct FN(nat_search) * s;
};

struct FN(new_slots) {
	struct FN(new_scratch) slot[2];
	__u32 busy[2];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct FN(new_slots));
} FN(new_scratch) SEC(".maps");

/* Takes a free slot of this CPU's scratch (its index in *i), or NULL. */
static __always_inline struct FN(new_scratch) * FN(new_scratch_get)(int *i)
{
	__u32 zero = 0;
	struct FN(new_slots) *s = bpf_map_lookup_elem(&FN(new_scratch), &zero);

	if (!s)
		return NULL;
	if (!s->busy[0]) {
		s->busy[0] = 1;
		*i = 0;
		return &s->slot[0];
	}
	if (!s->busy[1]) {
		s->busy[1] = 1;
		*i = 1;
		return &s->slot[1];
	}
	return NULL;
}

/* Gives slot `i` back (a negative `i`: none was taken). */
static __always_inline void FN(new_scratch_put)(int i)
{
	__u32 zero = 0;
	struct FN(new_slots) * s;

	if (i < 0)
		return;
	s = bpf_map_lookup_elem(&FN(new_scratch), &zero);
	if (s)
		s->busy[i & 1] = 0;
}

/*
 * Tries to make tuple s->t the new flow's. A free tuple is claimed by
 * inserting its owner (BPF_NOEXIST: one CPU wins). A finished connection's
 * tuple (see ct_reusable) is reclaimed by the one CPU that marks it
 * LB_CT_RECLAIMED, which then replaces it; its client entry, left behind,
 * no longer has an owner pointing back and is stale from then on.
 */
static __always_inline int FN(nat_claim)(struct FN(nat_search) * s)
{
	FLOW *o;
	__u32 state;
	int est = 1;

	o = bpf_map_lookup_elem(&CT, &s->t);
	if (!o) {
		if (!FN(ho_add)(&s->t, &s->rev))
			return NAT_NEW;
		o = FN(ho_lookup)(&s->t);
		if (!o)
			return NAT_TAKEN;
		est = 0;
	}
	state = o->state;
	if (FN(ct_owner_of)(o, &s->ck) && !(state & LB_CT_RECLAIMED)) {
		/* This client's connection on this tuple: it continues, or
		 * starts over if it had ended. */
		if ((state & LB_CT_CLOSING) ||
		    FN(ct_expired)(o, state, s->ck.proto, est, s->now)) {
			if (s->ck.proto == IPPROTO_TCP) {
				count_unanswered(o->backend, state);
				o->syn_t = s->rev.syn_t;
			}
			o->state = 0;
			o->created = s->now;
		}
		o->seen = s->now;
		return est ? NAT_OURS_EST : NAT_OURS_NEW;
	}
	if (!FN(ct_reusable)(o, state, s->ck.proto, est, s->now)) {
		if (!FN(ct_tw_held)(o, state, s->ck.proto, est, s->now))
			return NAT_TAKEN;
		if (!s->force)
			return NAT_TW;
	}
	if (__sync_val_compare_and_swap(&o->state, state,
					state | LB_CT_RECLAIMED) != state)
		return NAT_TAKEN;
	if (s->ck.proto == IPPROTO_TCP)
		count_unanswered(o->backend, state);
	if (est)
		bpf_map_delete_elem(&CT, &s->t);
	else
		FN(ho_delete)(&s->t);
	if (FN(ho_add)(&s->t, &s->rev))
		return NAT_TAKEN;
	return NAT_NEW;
}

/* SNAT address `idx` (of SNAT_COUNT) into *a. IPv6 word by word: clang
 * folds a copy of a const volatile array to its zero initializer. */
static __always_inline void FN(snat_addr_at)(ADDR *a, __u32 idx)
{
	idx &= LB_MAX_SNAT - 1;
#if LB_V6
	a->w[0] = snat_addr6[idx].w[0];
	a->w[1] = snat_addr6[idx].w[1];
	a->w[2] = snat_addr6[idx].w[2];
	a->w[3] = snat_addr6[idx].w[3];
#else
	*a = snat_addr[idx];
#endif
}

/* Candidate `i` of a search (0: the client's port; then the cursor's; past
 * NAT_TRIES, the first finished connection's met, if every one was held). */
static long FN(nat_try)(__u32 i, void *arg)
{
	struct FN(nat_search) *s = ((struct FN(nat_loop) *)arg)->s;
	__u32 n = SNAT_COUNT, idx, k;
	__u16 port;

	if (i > NAT_TRIES) {
		/* Every tuple tried is held: a finished connection's, if one
		 * was met, rather than a drop (ct_tw_held). */
		if (!s->tw)
			return 1;
		s->force = 1;
		i = s->tw - 1;
	}
	if (i == 0) {
		idx = n ? s->h % n : 0;
		port = bpf_ntohs(s->ck.sport);
		if (!nat_port_ok(port, n && FN(snat_is_full)(idx)))
			return 0;
	} else {
		k = s->cursor + nat_step(i);
		idx = n ? k % n : 0;
		port = nat_port_at(n ? k / n : k, n && FN(snat_is_full)(idx));
	}
	if (n)
		FN(snat_addr_at)(&s->t.daddr, idx);
	else
		s->t.daddr = s->fib_saddr;
	s->t.dport = bpf_htons(port);
	s->result = FN(nat_claim)(s);
	s->tries = i;
	if (s->result == NAT_TW) {
		if (!s->tw)
			s->tw = i + 1;
		s->result = NAT_TAKEN;
	}
	return s->result != NAT_TAKEN;
}
