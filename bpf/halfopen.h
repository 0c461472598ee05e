/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * The half-open table (maps.h: ct_new, ct_new6): a set-associative array of
 * sets of HO_WAYS entries. An entry lives in the set a keyed hash of its
 * key picks (the keys, random per instance, keep a flood from aiming at
 * one set). An insert into a full set replaces the set's oldest entry
 * (counted half_open_evicted): the table keeps the newest half-open flows,
 * as an LRU would, at the cost of one set's cache lines.
 *
 * A set is guarded by its sequence number, a seqlock without waiting: a
 * writer takes the set by moving `seq` from even to odd (compare and swap:
 * one CPU wins) and gives it back by moving it on to even; a reader reads
 * `seq`, the keys, `seq` again, and trusts the keys if it was the same even
 * number both times. Nobody spins: a writer that finds the set taken gives
 * up (a new flow's insert fails: it tries another NAT tuple, or is dropped
 * as drop_ct_race; a delete leaves the entry, shadowed by conntrack), a
 * reader that finds it changing twice takes it as a miss. (A
 * bpf_spin_lock, which saves and restores interrupts, cost a new flow 120
 * ns on this VM.) The reader's ordering rests on x86's: loads
 * are not reordered with loads nor stores with stores (TSO), so compiler
 * barriers suffice; the JIT of a weakly ordered CPU would need acquire
 * loads. User space takes a set the same way, through the map's mmap
 * (src/halfopen.rs).
 *
 * A pointer returned to an entry is used after the check, as one to a BPF
 * hash's element is: an entry replaced meanwhile changes under it, which
 * the owner checks (ct_owner_of) catch. The operations are global
 * functions (see ho_where). Part of the pipeline (fam.h): compiled once
 * per family.
 */
#ifndef LB_HALFOPEN_ONCE
#define LB_HALFOPEN_ONCE

#define barrier() asm volatile("" ::: "memory")

/* Takes a set for writing (its seq from even to odd): 0, or -1 if another
 * writer has it (two tries). */
static __always_inline int ho_own(__u32 *seq)
{
	__u32 q;
	int i;

#pragma unroll
	for (i = 0; i < 2; i++) {
		q = *(volatile __u32 *)seq;
		if (!(q & 1) && __sync_val_compare_and_swap(seq, q, q + 1) == q)
			return 0;
	}
	return -1;
}

/* Gives a set back (its seq on to even), its writes done before: a plain
 * store, since nobody else writes seq while it is odd (and x86 keeps
 * stores in order). */
static __always_inline void ho_release(__u32 *seq)
{
	barrier();
	*(volatile __u32 *)seq = *(volatile __u32 *)seq + 1;
}

/* The lowest set bit of a non-zero 4-bit mask, from a table (2 bits an
 * entry) rather than branches. */
#define HO_CTZ_TABLE                                                           \
	((0u << 2) | (1u << 4) | (0u << 6) | (2u << 8) | (0u << 10) |          \
	 (1u << 12) | (0u << 14) | (3u << 16) | (0u << 18) | (1u << 20) |      \
	 (0u << 22) | (2u << 24) | (0u << 26) | (1u << 28) | (0u << 30))
static __always_inline __u32 ho_ctz(__u32 m)
{
	return (HO_CTZ_TABLE >> ((m & 15) * 2)) & 3;
}

#endif /* LB_HALFOPEN_ONCE */

/* The rest once per family. */

#define HO_WORDS (sizeof(FKEY) / 4)
#undef HO_KEY
#undef HO_VAL
#if LB_V6
#define HO_KEY(s, i) ((s)->way[i].key)
#define HO_VAL(s, i) ((s)->way[i].f)
#else
#define HO_KEY(s, i) ((s)->key[i])
#define HO_VAL(s, i) ((s)->val[i].f)
#endif

/*
 * The hash of key `k`: pair-multiply-shift (Thorup) over its 32-bit words
 * w, with the instance's random 64-bit keys a (ho_key): the top half of
 * a0 + sum over pairs of (a[2i+1] + w[2i+1]) * (a[2i+2] + w[2i]), modulo
 * 2^64, then murmur3's finaliser (select.h: mix32). Strongly universal:
 * whoever does not know the keys cannot pick keys that share a set more
 * often than chance would (murmur3, seeded or not, has collisions that
 * hold for every seed). The finaliser, a fixed bijection, keeps that and
 * breaks the sum's linearity: keys that differ in one word (a client's
 * consecutive ports, the NAT cursor's) get hashes in arithmetic
 * progression, which for about one instance's keys in a hundred fall
 * into a few clusters of sets (thousands of evictions out of 30,000
 * flows; see src/halfopen.rs's tests). Two multiplies for an IPv4 key,
 * five for an IPv6 one, and two of the finaliser. src/halfopen.rs
 * computes the same to find an entry from user space.
 */
static __always_inline __u32 FN(ho_hash)(const FKEY *k)
{
	const __u32 *w = (const void *)k;
	__u64 h = ho_key[0];
	int i;

	_Static_assert(HO_WORDS % 2 == 0 && HO_WORDS < LB_HO_KEYS,
		       "a key is pairs of words, each with keys of its own");
	/* a pair at a time (the barrier): loaded all at once, the words
	 * spill to stack the chains of calls lack */
#pragma unroll
	for (i = 0; i < HO_WORDS / 2; i++) {
		h += (ho_key[2 * i + 1] + w[2 * i + 1]) *
		     (ho_key[2 * i + 2] + w[2 * i]);
		barrier();
	}
	return mix32(h >> 32);
}

/* Key `k`'s set: the top of hash x sets, in [0, sets) without a division. */
static __always_inline __u32 FN(ho_index)(__u32 h)
{
#if LB_V6
	return ((__u64)h * ho_sets6) >> 32;
#else
	return ((__u64)h * ho_sets) >> 32;
#endif
}

/* Key `k`'s set, and (IPv6) its tag: the hash, never 0 (a free way). */
static __always_inline HO_SET *FN(ho_set_of)(const FKEY *k, __u32 *tag)
{
	__u32 h = FN(ho_hash)(k), idx = FN(ho_index)(h);

	*tag = h | 1;
	return bpf_map_lookup_elem(&CT_NEW, &idx);
}

/* 1 if keys `a` and `b` are equal, else 0: without a branch, so that the
 * verifier walks one path through a set however its ways compare. */
static __always_inline __u32 FN(ho_key_eq)(const FKEY *a, const FKEY *b)
{
	const __u32 *x = (const void *)a, *y = (const void *)b;
	__u32 d = 0;
	int i;

#pragma unroll
	for (i = 0; i < HO_WORDS; i++)
		d |= x[i] ^ y[i];
	return ((d - 1) & ~d) >> 31;
}

/* Bit i set: way i of set `s` holds `k` (of tag `tag`). Called by a writer
 * that owns the set, or through ho_read. An IPv4 set has its keys in its
 * first line; an IPv6 one (40-byte keys) has tags there, and a key is read
 * (from its way's lines) only if its tag matches. */
static __always_inline __u32 FN(ho_match)(HO_SET *s, const FKEY *k, __u32 tag)
{
	__u32 m = 0;
	int i;

#if LB_V6
	__u32 x, j;

	/* The ways whose tag matches (without a branch), then their keys
	 * in turn (a collision of two 32-bit tags in a set is rare): each
	 * step ends or goes on, so the verifier walks a line of steps, not
	 * a tree of every way's outcome. */
#pragma unroll
	for (i = 0; i < HO_WAYS; i++) {
		x = s->tag[i] ^ tag;
		m |= (((x - 1) & ~x) >> 31) << i;
	}
#pragma nounroll
	for (i = 0; i < HO_WAYS; i++) {
		if (!m)
			return 0;
		j = ho_ctz(m);
		if (j >= HO_WAYS) /* never; tells the verifier */
			return 0;
		if (FN(ho_key_eq)(&HO_KEY(s, j), k))
			return 1u << j;
		m &= m - 1;
	}
	return 0;
#else
	/* A loop that reloads k's words each way (the barrier): hoisted out
	 * of it, they would spill to stack the callers lack. */
#pragma nounroll
	for (i = 0; i < HO_WAYS; i++) {
		barrier();
		m |= FN(ho_key_eq)(&HO_KEY(s, i), k) << i;
	}
	return m;
#endif
}

/* 1 if way i of set `s` is free (IPv4: its key's protocol 0; IPv6: its
 * tag 0), without a branch. */
static __always_inline __u32 FN(ho_free)(HO_SET *s, int i)
{
#if LB_V6
	__u32 t = s->tag[i];

	return ((t | -t) >> 31) ^ 1;
#else
	return ((__u32)s->key[i].proto - 1) >> 31;
#endif
}

/* ho_match for a reader: the keys as they were between two reads of the
 * same even seq; 0 (a miss) if the set changed under both tries. */
static __always_inline __u32 FN(ho_read)(HO_SET *s, const FKEY *k, __u32 tag)
{
	__u32 q, m;
	int i;

#pragma unroll
	for (i = 0; i < 2; i++) {
		q = *(volatile __u32 *)&s->seq;
		if (q & 1)
			continue;
		barrier();
		m = FN(ho_match)(s, k, tag);
		barrier();
		if (*(volatile __u32 *)&s->seq == q)
			return m;
	}
	return 0;
}

/* Writes `v` as the entry keyed `k`: a new entry, or (unless `noexist`,
 * then -1 is returned) over k's own. Returns 0 once written, -2 if another
 * writer had the set. The entry's stamp is its `seen` (a new flow's
 * clock). */
static __always_inline int FN(ho_put)(const FKEY *k, const FLOW *v,
				      const int noexist)
{
	__u32 m, oldest, lt, way, tag;
	HO_SET *s = FN(ho_set_of)(k, &tag);
	int i, evict = 0;

	if (!s || ho_own(&s->seq))
		return -2;
	/* k's own way, else a free one, else the oldest: one after the
	 * other, so that few values are live at once (registers, not
	 * stack) */
	m = FN(ho_match)(s, k, tag);
	barrier(); /* read the tags again below, rather than keep them */
	if (m && noexist) {
		ho_release(&s->seq);
		return -1;
	}
	if (!m) {
#pragma unroll
		for (i = 0; i < HO_WAYS; i++)
			m |= FN(ho_free)(s, i) << i;
	}
	if (m) {
		way = ho_ctz(m);
	} else {
		/* the least stamp (wrapping), without a branch */
		way = 0;
		oldest = s->stamp[0];
#pragma unroll
		for (i = 1; i < HO_WAYS; i++) {
			lt = ((__u32)(s->stamp[i] - oldest)) >> 31;
			oldest ^= (oldest ^ s->stamp[i]) & -lt;
			way ^= (way ^ i) & -lt;
		}
		evict = 1;
	}
	if (way >= HO_WAYS) /* never; tells the verifier */
		way = HO_WAYS - 1;
	HO_KEY(s, way) = *k;
	HO_VAL(s, way) = *v;
	s->stamp[way] = (__u32)v->seen;
#if LB_V6
	s->tag[way] = tag;
#endif
	ho_release(&s->seq);
	if (evict)
		count_event(LB_HALF_OPEN_EVICTED);
	return 0;
}

/* Removes the entry keyed `k`, if there is one. */
static __always_inline void FN(ho_drop)(const FKEY *k)
{
	__u32 m, tag;
	HO_SET *s = FN(ho_set_of)(k, &tag);

	if (!s || ho_own(&s->seq))
		return;
	m = FN(ho_match)(s, k, tag);
	if (m) {
		m = ho_ctz(m);
		if (m < HO_WAYS) {
#if LB_V6
			s->tag[m] = 0;
#else
			s->key[m].proto = 0;
#endif
		}
	}
	ho_release(&s->seq);
}

/*
 * The operations as the pipeline calls them: global functions, which the
 * verifier checks once each, not at every call on every path (as it does
 * inlined code or static functions: three times the instructions, near
 * its bound). A global function returns a number only: where k's entry is
 * (set << 2 | way), which ho_lookup turns into a pointer. Each keeps its
 * stack within 32 bytes: the deepest chain of calls (lb_xdp, the IPv6
 * pipeline, the NAT search's bpf_loop callback, one of these) has exactly
 * the verifier's 512.
 */
__noinline int FN(ho_where)(const FKEY *k)
{
	__u32 idx, m, tag;
	HO_SET *s;

	if (!k)
		return -1;
	tag = FN(ho_hash)(k);
	idx = FN(ho_index)(tag);
	tag |= 1;
	s = bpf_map_lookup_elem(&CT_NEW, &idx);
	if (!s)
		return -1;
	m = FN(ho_read)(s, k, tag);
	if (!m)
		return -1;
	return (int)((idx << 2) | ho_ctz(m));
}

/* k's entry may be replaced; and may not (-1 if k has one: one CPU wins a
 * key). -2: the set was another writer's. */
__noinline int FN(ho_insert)(const FKEY *k, const FLOW *v)
{
	if (!k || !v)
		return -2;
	return FN(ho_put)(k, v, 0);
}

__noinline int FN(ho_add)(const FKEY *k, const FLOW *v)
{
	if (!k || !v)
		return -2;
	return FN(ho_put)(k, v, 1);
}

__noinline int FN(ho_delete)(const FKEY *k)
{
	if (k)
		FN(ho_drop)(k);
	return 0;
}

/* Starts the loads of every line of k's set and returns without waiting
 * for them (nothing uses what they read): the set's miss then overlaps the
 * caller's other misses instead of stalling a later lookup or insert. */
static __always_inline void FN(ho_touch)(const FKEY *k)
{
	__u32 idx = FN(ho_index)(FN(ho_hash)(k));
	HO_SET *s = bpf_map_lookup_elem(&CT_NEW, &idx);
	int i;

	if (!s)
		return;
	(void)*(volatile __u32 *)&s->seq;
#pragma unroll
	for (i = 0; i < HO_WAYS; i++) {
#if LB_V6
		(void)*(volatile __u32 *)&s->way[i];
		(void)*((volatile __u32 *)&s->way[i] + 16);
#else
		(void)*(volatile __u32 *)&s->val[i];
#endif
	}
}

/* The entry keyed `k`, or NULL. */
static __always_inline FLOW *FN(ho_lookup)(const FKEY *k)
{
	int at = FN(ho_where)(k);
	__u32 idx;
	HO_SET *s;

	if (at < 0)
		return NULL;
	idx = (__u32)at >> 2;
	s = bpf_map_lookup_elem(&CT_NEW, &idx);
	if (!s)
		return NULL;
	at &= 3;
	if (at >= HO_WAYS) /* never; tells the verifier */
		return NULL;
	return &HO_VAL(s, at);
}
