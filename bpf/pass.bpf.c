// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * An XDP program that passes everything. Two uses: on the bridge-side peer
 * of a veth, where XDP_TX frames are only delivered if the peer runs XDP;
 * and as the empty-program baseline of the benchmarks.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

SEC("xdp")
int lb_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
