/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * Connection state, kept in the connection's owner entry (keyed by its NAT
 * tuple, see struct flow): the clock, expiry, TCP end, and whether the NAT
 * tuple of a finished connection may be given to a new one.
 */
#ifndef LB_CTSTATE_ONCE
#define LB_CTSTATE_ONCE

#include "consts.h"
#include "pkt.h"

/* The clock: 64-bit jiffies (HZ ticks a second), never wrapping. The JIT
 * inlines bpf_jiffies64 to one load, where bpf_ktime_get_coarse_ns costs a
 * call (~20 ns here). */
static __always_inline __u64 lb_now(void)
{
	return bpf_jiffies64();
}

#endif /* LB_CTSTATE_ONCE */

/* The rest once per family (pipeline.h). */

/* The key of the owner of client entry `f`: backend -> SNAT:port. */
static __always_inline void FN(ct_owner_key)(const FLOW *f, __u8 proto, FKEY *k)
{
	k->saddr = f->daddr;
	k->daddr = f->saddr;
	k->sport = f->dport;
	k->dport = f->sport;
	k->proto = proto;
}

/* Whether owner `o` belongs to the client whose packet has key `k`. */
static __always_inline int FN(ct_owner_of)(const FLOW *o, const FKEY *k)
{
	return ADDR_EQ(o->daddr, k->saddr) && o->dport == k->sport &&
	       ADDR_EQ(o->saddr, k->daddr) && o->sport == k->dport;
}

/* Whether owner `o` (in conntrack if `est`, else in ct_new) is past its
 * timeout: its connection is dead. A half-open TCP flow waits syn_timeout. */
static __always_inline int FN(ct_expired)(const FLOW *o, __u32 state,
					  __u8 proto, int est, __u64 now)
{
	__u32 timeout = (state & LB_CT_CLOSING) ? fin_timeout
			: proto == IPPROTO_UDP	? udp_timeout
			: est			? tcp_timeout
						: syn_timeout;

	return now - o->seen > timeout;
}

/* A packet keeps its connection alive (both directions: the owner holds the
 * clock). Written at most once a tick. */
static __always_inline void FN(ct_seen)(FLOW *o, __u64 now)
{
	if (o->seen != now)
		o->seen = now;
}

/*
 * TCP end, from a packet going `dir`: a RST closes the connection; a FIN
 * half-closes its direction, and the connection is closing once both sides
 * sent one. The bits are set atomically in the one owner entry, so FINs of
 * both directions handled at once on two CPUs always see each other.
 */
static __always_inline void FN(ct_tcp_end)(FLOW *o, __u8 dir, __u8 tcp_flags)
{
	__u32 fin = dir == LB_DIR_TO_BACKEND ? LB_CT_FIN_FWD : LB_CT_FIN_REV;
	__u32 other = LB_CT_FIN_FWD ^ LB_CT_FIN_REV ^ fin;
	__u32 old;

	if (o->state & LB_CT_CLOSING)
		return;
	if (tcp_flags & TCP_RST) {
		__sync_fetch_and_or(&o->state, LB_CT_CLOSING);
		return;
	}
	if (o->state & fin)
		return; /* a repeated FIN */
	old = __sync_fetch_and_or(&o->state, fin);
	if (old & other)
		__sync_fetch_and_or(&o->state, LB_CT_CLOSING);
}

/*
 * Whether a new flow may take the NAT tuple that owner `o` (in conntrack if
 * `est`) holds. A live connection keeps it. A finished TCP connection keeps
 * it until the backend's TIME_WAIT for the tuple is over (tw_timeout): a SYN
 * from any other client tuple would carry timestamps and a sequence
 * unrelated to the old connection's (Linux offsets both per connection, so
 * even the same client address on another port), and the backend would
 * reject it (PAWS) about half the time (but see ct_tw_held). Only the
 * same client tuple reopens it earlier (see nat_claim and process). A half-open
 * flow never reached TIME_WAIT. A TCP one gives up its tuple to any new flow
 * once its SYN has waited a tenth of a second unanswered (a SYN flood cannot
 * hold the ports: the cursor takes the oldest first), or the backend's
 * SYN-ACK a second unconfirmed (a client far away, or starved of CPU, may
 * take long to send its ACK and request; at 250 ms a flood-test client lost
 * its connection: backends answering a flood hold ports that second). A UDP one
 * gives it up once idle for a second (a one-way stream that paused, an answer
 * not confirmed).
 */
static __always_inline int FN(ct_reusable)(const FLOW *o, __u32 state,
					   __u8 proto, int est, __u64 now)
{
	if (state & LB_CT_RECLAIMED)
		return 0;
	if (!est) {
		__u64 idle = now - o->seen;

		if (state & LB_CT_CLOSING)
			return 1;
		if (proto != IPPROTO_TCP)
			return idle > hz;
		return idle > ((state & LB_CT_REPLIED) ? hz : hz / 10);
	}
	if (!(state & LB_CT_CLOSING) &&
	    !FN(ct_expired)(o, state, proto, est, now))
		return 0;
	if (proto != IPPROTO_TCP)
		return 1;
	return now - o->seen > tw_timeout;
}

/*
 * Whether owner `o` is a finished TCP connection whose tuple ct_reusable
 * still holds for the backend's TIME_WAIT, quiet for a second (its last
 * segments have arrived). A new flow takes such a tuple only when every
 * other it tried is held too (nat_try: the first met, in the cursor's
 * order the least recently handed out), rather than be dropped: the
 * backend's TIME_WAIT accepts the new SYN if its timestamps happen to be
 * newer than the old connection's; if not, it answers with an ACK, the
 * client's RST ends that TIME_WAIT and Linux sends the SYN again at once
 * (an unacceptable ACK in SYN-SENT rearms its retransmission for the
 * minimum timeout), which gets through. A drop costs the client a second.
 */
static __always_inline int FN(ct_tw_held)(const FLOW *o, __u32 state,
					  __u8 proto, int est, __u64 now)
{
	return est && proto == IPPROTO_TCP && (state & LB_CT_CLOSING) &&
	       !(state & LB_CT_RECLAIMED) && now - o->seen > hz;
}
