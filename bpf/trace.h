/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * `lb trace`: packets lb forwards with XDP_TX never reach tcpdump on the LB,
 * so the program reports them itself, while a tracer asks for it: the
 * frame's first bytes as it came and as lb left it, the verdict, the
 * counter it went under and whether it made a flow, into a ring buffer. The
 * tracer decodes and filters. When nobody traces the cost is one per-CPU
 * array lookup and two tests per packet (trace_cfg.on and .pending are 0).
 */
#ifndef LB_TRACE_H
#define LB_TRACE_H

#include "maps.h"

/* What process() decided, for the trace. */
struct verdict_note {
	__u16 reason;
	__u8 new_flow;
};

/* Copies the frame's first bytes (at most LB_TRACE_HDR) to `to`. */
static __always_inline __u8 trace_copy(struct xdp_md *ctx, __u8 *to)
{
	__u64 len = ctx->data_end - ctx->data;

	/* Opaque to clang, so that the bound below stays a 64-bit test the
	 * verifier sees. */
	asm volatile("" : "+r"(len));
	if (len > LB_TRACE_HDR)
		len = LB_TRACE_HDR;
	if (len < 1)
		return 0;
	if (bpf_xdp_load_bytes(ctx, 0, to, len))
		return 0;
	return len;
}

/* This CPU's tracing state (one lookup per packet, kept through it). */
static __always_inline struct lb_trace_cfg *trace_state(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&trace_cfg, &zero);
}

/* Keeps the frame as it came, if this packet is traced. Nothing of it
 * stays in registers or on the stack across process() but `t`: the
 * verifier then sees one state there, traced or not. */
static __always_inline void trace_begin(struct xdp_md *ctx,
					struct lb_trace_cfg *t)
{
	if (!t->on)
		return;
	if (bpf_jiffies64() > t->until)
		return; /* the tracer went away without saying so */
	if (t->sample > 1 && bpf_get_prandom_u32() % t->sample)
		return;
	t->ev.ns = bpf_ktime_get_ns();
	t->ev.ifindex = ctx->ingress_ifindex;
	t->ev.len = ctx->data_end - ctx->data;
	t->ev.in_len = trace_copy(ctx, t->ev.in);
	t->pending = 1;
}

/* Sends the packet kept by trace_begin with what lb did and the frame as
 * it left it. */
static __always_inline void trace_end(struct xdp_md *ctx,
				      struct lb_trace_cfg *t,
				      const struct verdict_note *n, int verdict)
{
	struct lb_trace_event *ev;

	if (!t->pending)
		return;
	t->pending = 0;
	t->ev.verdict = verdict;
	t->ev.reason = n->reason;
	t->ev.new_flow = n->new_flow;
	trace_copy(ctx, t->ev.out);
	ev = bpf_ringbuf_reserve(&trace_rb, sizeof(*ev), 0);
	if (!ev) {
		t->lost++;
		return;
	}
	__builtin_memcpy(ev, &t->ev, sizeof(*ev));
	bpf_ringbuf_submit(ev, 0);
}

#endif /* LB_TRACE_H */
