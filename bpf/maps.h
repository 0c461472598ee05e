/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/* Maps. Names stay within 15 characters (BPF_OBJ_NAME_LEN). */
#ifndef LB_MAPS_H
#define LB_MAPS_H

#include "lb.h"

/* Packets and bytes per verdict reason, per CPU: bumped without atomics. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, LB_STAT_MAX);
	__type(key, __u32);
	__type(value, struct lb_counter);
} stats SEC(".maps");

static __always_inline int count(struct xdp_md *ctx, enum lb_stat reason,
				 int verdict)
{
	__u32 key = reason;
	struct lb_counter *c = bpf_map_lookup_elem(&stats, &key);

	if (c) {
		c->packets++;
		c->bytes += ctx->data_end - ctx->data;
	}
	return verdict;
}

#endif /* LB_MAPS_H */
