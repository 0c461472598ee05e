// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * Helper programs. lb_pass passes everything: on the bridge-side peer of a
 * veth, where XDP_TX frames are only delivered if the peer runs XDP, and as
 * the empty-program baseline of the benchmarks. lb_clock tells userspace
 * the datapath's time.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

SEC("xdp")
int lb_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

/*
 * The datapath's clock, for userspace: writes jiffies (what `lb_now` reads)
 * into the first 8 bytes of the frame. Run through BPF_PROG_TEST_RUN, never
 * attached.
 */
SEC("xdp")
int lb_clock(struct xdp_md *ctx)
{
	__u64 *j = (void *)(long)ctx->data;

	if ((void *)(j + 1) > (void *)(long)ctx->data_end)
		return XDP_ABORTED;
	*j = bpf_jiffies64();
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
