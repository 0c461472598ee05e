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
 * The datapath's clock, for userspace: returns the low 32 bits of jiffies
 * (what `lb_now` reads). Run through BPF_PROG_TEST_RUN, never attached.
 */
SEC("xdp")
int lb_clock(struct xdp_md *ctx)
{
	return (__u32)bpf_jiffies64();
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
