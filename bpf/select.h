/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/* Backend selection: the flow hash, the service's Maglev table, and whether
 * a backend still takes a flow. Part of the pipeline (fam.h): the Maglev
 * lookup is shared by both families, the hashes are per family. */
#ifndef LB_SELECT_ONCE
#define LB_SELECT_ONCE

#include "maps.h"
#include "pkt.h"

/* murmur3 finaliser: cheap, and every input bit reaches every output bit. */
static __always_inline __u32 mix32(__u32 h)
{
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

static __always_inline __u32 flow_hash(const struct flow_key *k)
{
	__u32 ports = ((__u32)k->sport << 16) | k->dport;

	return mix32(k->saddr ^ mix32(k->daddr ^ mix32(ports ^ k->proto)));
}

/* The hash a service picks a new flow's backend by (svc_flags). */
static __always_inline __u32 pick_hash(const struct flow_key *k, __u32 flags)
{
	if (flags & LB_SVC_CLIENT_IP)
		return mix32(k->saddr ^ 0x9e3779b9);
	return flow_hash(k);
}

/* An IPv6 address folded into a hash. */
static __always_inline __u32 mix_in6(__u32 h, const struct lb_in6 *a)
{
	return mix32(h ^ a->w[0] ^
		     mix32(a->w[1] ^ mix32(a->w[2] ^ mix32(a->w[3]))));
}

static __always_inline __u32 flow_hash6(const struct flow6_key *k)
{
	__u32 ports = ((__u32)k->sport << 16) | k->dport;

	return mix_in6(mix_in6(mix32(ports ^ k->proto), &k->daddr), &k->saddr);
}

static __always_inline __u32 pick_hash6(const struct flow6_key *k, __u32 flags)
{
	if (flags & LB_SVC_CLIENT_IP)
		return mix_in6(0x9e3779b9, &k->saddr);
	return flow_hash6(k);
}

/* Backend `id`, if it is one of service `svc_id`'s (a CPU may still hold
 * a Maglev table the service has since replaced, or a prefetch's pick from
 * before a change), else NULL. */
static __always_inline struct backend *backend_of(__u32 svc_id, __u32 *id)
{
	struct backend *be = bpf_map_lookup_elem(&backends, id);

	if (!be || !(be->flags & LB_BACKEND_USED) || be->svc != svc_id)
		return NULL;
	return be;
}

/* The backend service `svc_id`'s Maglev table gives hash `h`, or NULL. */
static __always_inline struct backend *backend_pick(__u32 svc_id, __u32 h,
						    __u32 *id)
{
	void *table;
	__u32 slot, *bid;

	table = bpf_map_lookup_elem(&maglev, &svc_id);
	if (!table)
		return NULL;
	slot = h % maglev_size;
	bid = bpf_map_lookup_elem(table, &slot);
	if (!bid || *bid == LB_NO_BACKEND)
		return NULL;
	*id = *bid;
	return backend_of(svc_id, id);
}

#endif /* LB_SELECT_ONCE */

/* Whether the backend of client entry `f` (packet key `k`) still takes new
 * flows: present, of the flow's service, same address and port, weight > 0.
 */
static __always_inline int FN(backend_takes)(const FLOW *f, const FKEY *k)
{
	struct backend *be = bpf_map_lookup_elem(&backends, &f->backend);

	return be && (be->flags & LB_BACKEND_USED) && be->weight &&
	       be->svc == f->svc && ADDR_EQ(BE_ADDR(be), f->daddr) &&
	       (be->port ? be->port : k->dport) == f->dport;
}

/* The affinity map's key and value as backend_select builds them: in a new
 * flow's scratch (natport.h), off the stack the program is short of. */
struct FN(affinity_work) {
#if LB_V6
	struct affinity6_key k;
#else
	struct affinity_key k;
#endif
	struct affinity v;
};

/*
 * The backend of a new flow of service `svc_id` (flags `flags`) from the
 * client of `k`, its Maglev hash `h`: with an affinity timeout, the
 * backend the client's last new flow took if that was within the timeout
 * and the backend still takes flows (of the service, weight > 0), even if
 * the Maglev table changed since (IPVS persistence); else the table's,
 * remembered for the client's next flows (in `w`, scratch). Without a
 * timeout, the table's.
 */
static __always_inline struct backend *
FN(backend_select)(__u32 svc_id, __u32 flags, const FKEY *k, __u32 h, __u64 now,
		   __u32 *id, struct FN(affinity_work) * w)
{
	__u32 secs = flags >> LB_SVC_AFFINITY_SHIFT;
	struct affinity *a;
	struct backend *be;
#if LB_V6
	void *map = &affinity6;
#else
	void *map = &affinity;
#endif

	if (!secs)
		return backend_pick(svc_id, h, id);
	__builtin_memset(w, 0, sizeof(*w));
	w->k.svc = svc_id;
	w->k.client = k->saddr;
	a = bpf_map_lookup_elem(map, &w->k);
	if (a && now - a->seen <= (__u64)secs * hz) {
		w->v.backend = a->backend;
		be = bpf_map_lookup_elem(&backends, &w->v.backend);
		if (be && (be->flags & LB_BACKEND_USED) && be->weight &&
		    be->svc == svc_id) {
			*id = w->v.backend;
			if (a->seen != now)
				a->seen = now;
			return be;
		}
	}
	be = backend_pick(svc_id, h, id);
	if (be) {
		w->v.backend = *id;
		w->v.seen = now;
		bpf_map_update_elem(map, &w->k, &w->v, BPF_ANY);
	}
	return be;
}
