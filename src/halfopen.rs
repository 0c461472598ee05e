//! The half-open tables (`ct_new`, `ct_new6`) from user space. They are
//! not BPF hashes but arrays of sets of [`WAYS`] entries (bpf/halfopen.h):
//! an entry lives in the set a keyed hash of its key picks; a free way
//! has protocol 0 (IPv4) or tag 0 (IPv6, see [`Layout`]). This module
//! computes the same hash (the keys and set count are in the program's
//! settings) to find, write and remove one entry, and reads
//! whole tables for listings.
//!
//! The maps are mmapable: a set is read and written in place, taken the
//! way the datapath takes it (its sequence number odd while a writer has
//! it), so neither side sees the other's half-written entry.

use std::ffi::c_void;
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU32, Ordering};

use anyhow::{anyhow, bail, Context, Result};
use libbpf_rs::{MapCore, MapHandle};
use nix::sys::mman;

use crate::maps::{self, Flow, Flow6, FlowKey, FlowKey6, Maps};
use crate::skel::lb::types::{self, lb_limits};

/// Entries a set holds.
pub const WAYS: usize = lb_limits::LB_HO_WAYS.0 as usize;

/// The sets a table of `entries` entries takes.
pub fn sets_for(entries: u32) -> u32 {
    entries.div_ceil(WAYS as u32).max(1)
}

/// Random keys of the hash, as the program's settings hold them (`ho_key`).
pub type Keys = [u64; lb_limits::LB_HO_KEYS.0 as usize];

/// Which hash an instance's half-open sets are of, as its settings record
/// it (`ho_hash_id`): 2, pair-multiply-shift and murmur3's finaliser. An
/// instance with another (0: pair-multiply-shift alone, or the seeded
/// murmur3 before it) places keys elsewhere, and is not reused.
pub const HASH: u32 = 2;

/// The hash of a key (its bytes as the datapath stores them), as
/// `ho_hash` in bpf/halfopen.h: pair-multiply-shift over its 32-bit words
/// with the instance's keys, then murmur3's finaliser.
fn hash(keys: &Keys, key: &[u8]) -> u32 {
    let w: Vec<u64> = key
        .chunks_exact(4)
        .map(|w| u64::from(u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
        .collect();
    let h = w
        .chunks_exact(2)
        .zip(keys[1..].chunks_exact(2))
        .fold(keys[0], |h, (w, a)| {
            h.wrapping_add(
                a[0].wrapping_add(w[1])
                    .wrapping_mul(a[1].wrapping_add(w[0])),
            )
        });
    mix32((h >> 32) as u32)
}

/// murmur3's finaliser, as `mix32` in bpf/select.h.
fn mix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The set of hash `h` in a table of `sets`, as `ho_index` in
/// bpf/halfopen.h computes it: the top half of hash x sets.
fn set_of_hash(h: u32, sets: u32) -> u32 {
    ((u64::from(h) * u64::from(sets)) >> 32) as u32
}

/// One family's table: its key and entry types.
pub trait Family {
    /// The key (`flow_key`, `flow6_key`).
    type Key: plain::Plain + Default + Copy;
    /// The entry (`flow`, `flow6`).
    type Val: plain::Plain + Default + Copy;
    /// The family's table of an instance.
    fn map(m: &Maps) -> &MapHandle;
    /// Its sets, from the program's settings.
    fn sets(ro: &types::rodata) -> u32;
    /// Whether a set has a tag per way (IPv6), not its keys, in its first
    /// line.
    const TAGGED: bool;
    /// Whether a key marks a free way (untagged sets).
    fn is_free(k: &Self::Key) -> bool;
    /// Makes a key mark a free way (untagged sets).
    fn free(k: &mut Self::Key);
}

/// IPv4: `ct_new`.
pub struct V4;
/// IPv6: `ct_new6`.
pub struct V6;

impl Family for V4 {
    type Key = FlowKey;
    type Val = Flow;
    const TAGGED: bool = false;
    fn map(m: &Maps) -> &MapHandle {
        &m.ct_new
    }
    fn sets(ro: &types::rodata) -> u32 {
        ro.ho_sets
    }
    fn is_free(k: &FlowKey) -> bool {
        k.proto == 0
    }
    fn free(k: &mut FlowKey) {
        k.proto = 0;
    }
}

impl Family for V6 {
    type Key = FlowKey6;
    type Val = Flow6;
    const TAGGED: bool = true;
    fn map(m: &Maps) -> &MapHandle {
        &m.ct_new6
    }
    fn sets(ro: &types::rodata) -> u32 {
        ro.ho_sets6
    }
    fn is_free(k: &FlowKey6) -> bool {
        k.proto == 0
    }
    fn free(k: &mut FlowKey6) {
        k.proto = 0;
    }
}

/// Where things are in a set (struct ho_set, ho_set6 in bpf/maps.h): its
/// sequence number and insert times, then (IPv4) the keys in the rest of
/// the first line and an entry on each line after; or (IPv6) a tag per way
/// (the key's hash, never 0; 0: free) and each way's key and entry on
/// lines of their own.
struct Layout {
    tagged: bool,
    key_size: usize,
    key_at: [usize; WAYS],
    val_at: [usize; WAYS],
    tag_at: [usize; WAYS],
    /// The lines of way w: from way_at[w], way_len bytes.
    way_at: [usize; WAYS],
    way_len: usize,
    /// Bytes of the first part (what says which ways are taken).
    head: usize,
    size: usize,
}

const LINE: usize = 64;
const STAMPS: usize = 4;

fn layout<F: Family>() -> Layout {
    let key_size = std::mem::size_of::<F::Key>();
    let val_size = std::mem::size_of::<F::Val>();
    let after_stamps = STAMPS + 4 * WAYS;
    let w = |f: &dyn Fn(usize) -> usize| [f(0), f(1), f(2)];
    if F::TAGGED {
        let head = (after_stamps + 4 * WAYS).next_multiple_of(LINE);
        let val_off = key_size.next_multiple_of(std::mem::align_of::<F::Val>());
        let way_len = (val_off + val_size).next_multiple_of(LINE);
        let way_at = w(&|i| head + i * way_len);
        Layout {
            tagged: true,
            key_size,
            key_at: way_at,
            val_at: w(&|i| way_at[i] + val_off),
            tag_at: w(&|i| after_stamps + 4 * i),
            way_at,
            way_len,
            head,
            size: head + WAYS * way_len,
        }
    } else {
        let head = (after_stamps + WAYS * key_size).next_multiple_of(LINE);
        let way_len = val_size.next_multiple_of(LINE);
        let way_at = w(&|i| head + i * way_len);
        Layout {
            tagged: false,
            key_size,
            key_at: w(&|i| after_stamps + i * key_size),
            val_at: way_at,
            tag_at: [0; WAYS],
            way_at,
            way_len,
            head,
            size: head + WAYS * way_len,
        }
    }
}

fn check_layout<F: Family>(map: &MapHandle) -> Result<Layout> {
    let l = layout::<F>();
    if map.key_size() != 4 || map.value_size() as usize != l.size {
        bail!(
            "map {} is not a half-open table of this build ({}-byte sets, not {})",
            map.name().to_string_lossy(),
            map.value_size(),
            l.size
        );
    }
    Ok(l)
}

/// A half-open table mapped into this process (the map is mmapable), its
/// sets taken as the datapath takes them (bpf/halfopen.h): a set's first
/// word is its sequence number, odd while a writer has the set.
struct Table {
    base: NonNull<c_void>,
    len: usize,
    stride: usize,
    sets: u32,
    keys: Keys,
    l: Layout,
}

impl Drop for Table {
    fn drop(&mut self) {
        // SAFETY: base and len are what mmap returned; nothing borrows
        // the mapping past the Table.
        let _ = unsafe { mman::munmap(self.base, self.len) };
    }
}

/// Tries a reader or writer makes on a set another writer has before
/// giving up (the datapath's writes take tens of nanoseconds).
const TRIES: usize = 100_000;

impl Table {
    fn open<F: Family>(m: &Maps) -> Result<Self> {
        let map = F::map(m);
        let l = check_layout::<F>(map)?;
        let stride = (map.value_size() as usize).next_multiple_of(8);
        let sets = map.max_entries();
        let ro = m.rodata()?;
        if F::sets(&ro) != sets {
            bail!(
                "half-open table of {sets} sets, settings say {}",
                F::sets(&ro)
            );
        }
        if ro.ho_hash_id != HASH {
            bail!("the instance's half-open table is of an earlier lb's hash: detach it first");
        }
        let len = NonZeroUsize::new(stride * sets as usize)
            .ok_or_else(|| anyhow!("half-open table with no sets"))?;
        // SAFETY: a shared mapping of the map's own memory, of its size;
        // every access below stays inside it.
        let base = unsafe {
            mman::mmap(
                None,
                len,
                mman::ProtFlags::PROT_READ | mman::ProtFlags::PROT_WRITE,
                mman::MapFlags::MAP_SHARED,
                map.as_fd(),
                0,
            )
        }
        .with_context(|| format!("mapping {}", map.name().to_string_lossy()))?;
        Ok(Self {
            base,
            len: len.get(),
            stride,
            sets,
            keys: ro.ho_key,
            l,
        })
    }

    /// Key `key`'s set, and its tag (see [`Layout`]).
    fn index_of<K: plain::Plain>(&self, key: &K) -> (u32, u32) {
        let h = hash(&self.keys, maps::bytes(key));
        (set_of_hash(h, self.sets), h | 1)
    }

    fn set_ptr(&self, i: u32) -> *mut u8 {
        assert!(i < self.sets, "set {i} of {}", self.sets);
        // SAFETY: inside the mapping (i < sets).
        unsafe {
            self.base
                .as_ptr()
                .cast::<u8>()
                .add(i as usize * self.stride)
        }
    }

    fn seq(&self, i: u32) -> &AtomicU32 {
        // SAFETY: a set starts with its u32 sequence number, 8-aligned;
        // the datapath changes it only atomically.
        unsafe { &*self.set_ptr(i).cast::<AtomicU32>() }
    }

    /// Set `i` as it was between two reads of the same even sequence:
    /// its keys, and the entries of the ways `used` says are taken (all
    /// ways if `None`; a listing copies only those).
    fn read_ways(&self, i: u32, used: Option<fn(&Set<'_>, usize) -> bool>) -> Result<Set<'_>> {
        let mut b = vec![0u8; self.l.size];
        let p = self.set_ptr(i);
        for _ in 0..TRIES {
            let q = self.seq(i).load(Ordering::Acquire);
            if q & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            // SAFETY: the set's bytes, inside the mapping; a writer may
            // change them meanwhile, which the second read of seq sees.
            unsafe { std::ptr::copy_nonoverlapping(p, b.as_mut_ptr(), self.l.head) };
            let mut set = Set {
                l: &self.l,
                index: i,
                b,
            };
            for w in 0..WAYS {
                if used.is_none_or(|u| u(&set, w)) {
                    let at = self.l.way_at[w];
                    // SAFETY: as above, the way's lines.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            p.add(at),
                            set.b.as_mut_ptr().add(at),
                            self.l.way_len,
                        )
                    };
                }
            }
            fence(Ordering::Acquire);
            if self.seq(i).load(Ordering::Relaxed) == q {
                return Ok(set);
            }
            b = set.b;
        }
        bail!("half-open set {i} kept changing")
    }

    fn read(&self, i: u32) -> Result<Set<'_>> {
        self.read_ways(i, None)
    }

    /// Runs `f` on set `i` owned (its sequence odd), then gives it back.
    fn write<R>(&self, i: u32, f: impl FnOnce(&Set<'_>, *mut u8) -> R) -> Result<R> {
        for _ in 0..TRIES {
            let q = self.seq(i).load(Ordering::Acquire);
            if q & 1 == 1
                || self
                    .seq(i)
                    .compare_exchange(q, q + 1, Ordering::AcqRel, Ordering::Relaxed)
                    .is_err()
            {
                std::hint::spin_loop();
                continue;
            }
            let mut b = vec![0u8; self.l.size];
            // SAFETY: the set is ours until seq moves on.
            unsafe { std::ptr::copy_nonoverlapping(self.set_ptr(i), b.as_mut_ptr(), b.len()) };
            let set = Set {
                l: &self.l,
                index: i,
                b,
            };
            let r = f(&set, self.set_ptr(i));
            self.seq(i).fetch_add(1, Ordering::Release);
            return Ok(r);
        }
        bail!("half-open set {i} stayed another writer's")
    }
}

/// Writes `v` at byte `at` of the set at `p` (owned).
///
/// # Safety
/// `p` is an owned set of the mapping and `at` an aligned field's offset.
unsafe fn store<T: Copy>(p: *mut u8, at: usize, v: T) {
    unsafe { std::ptr::write_volatile(p.add(at).cast::<T>(), v) }
}

/// A set read from the table, as bytes.
struct Set<'l> {
    l: &'l Layout,
    index: u32,
    b: Vec<u8>,
}

impl Set<'_> {
    fn key<K: plain::Plain + Default>(&self, w: usize) -> K {
        let at = self.l.key_at[w];
        maps::from_bytes(&self.b[at..at + self.l.key_size])
    }
    fn val<V: plain::Plain + Default>(&self, w: usize) -> V {
        let at = self.l.val_at[w];
        maps::from_bytes(&self.b[at..at + std::mem::size_of::<V>()])
    }
    fn tag(&self, w: usize) -> u32 {
        let at = self.l.tag_at[w];
        u32::from_ne_bytes([self.b[at], self.b[at + 1], self.b[at + 2], self.b[at + 3]])
    }
    /// Whether way w is free (read from the first part only).
    fn is_free<F: Family>(&self, w: usize) -> bool {
        if self.l.tagged {
            self.tag(w) == 0
        } else {
            F::is_free(&self.key::<F::Key>(w))
        }
    }
    fn way_of<F: Family>(&self, key: &F::Key) -> Option<usize> {
        (0..WAYS).find(|&w| {
            !self.is_free::<F>(w) && maps::bytes(&self.key::<F::Key>(w)) == maps::bytes(key)
        })
    }
}

/// Every entry of family `F`'s half-open table: (key, entry).
pub fn entries<F: Family>(m: &Maps) -> Result<Vec<(F::Key, F::Val)>> {
    let t = Table::open::<F>(m)?;
    let mut out = Vec::new();
    for i in 0..t.sets {
        let set = t.read_ways(i, Some(|s, w| !s.is_free::<F>(w)))?;
        for w in 0..WAYS {
            if !set.is_free::<F>(w) {
                out.push((set.key(w), set.val(w)));
            }
        }
    }
    Ok(out)
}

/// The entry keyed `key`, if any.
pub fn get<F: Family>(m: &Maps, key: &F::Key) -> Result<Option<F::Val>> {
    let t = Table::open::<F>(m)?;
    let set = t.read(t.index_of(key).0)?;
    Ok(set.way_of::<F>(key).map(|w| set.val(w)))
}

/// Writes the entry keyed `key`: over its own, else into a free way; a
/// full set is an error (nothing is evicted from here).
pub fn put<F: Family>(m: &Maps, key: &F::Key, val: &F::Val) -> Result<()> {
    let t = Table::open::<F>(m)?;
    let (i, tag) = t.index_of(key);
    let stamp = crate::clock::now().unwrap_or(0) as u32;
    let l = &t.l;
    t.write(i, |set, p| {
        let w = set
            .way_of::<F>(key)
            .or_else(|| (0..WAYS).find(|&w| set.is_free::<F>(w)))
            .ok_or_else(|| anyhow!("half-open set {} is full", set.index))?;
        // SAFETY: the set is owned; the offsets are its fields'.
        unsafe {
            store(p, l.val_at[w], *val);
            store(p, l.key_at[w], *key);
            store(p, STAMPS + 4 * w, stamp);
            if l.tagged {
                store(p, l.tag_at[w], tag);
            }
        }
        Ok(())
    })?
}

/// Removes the entry keyed `key`; whether there was one.
pub fn delete<F: Family>(m: &Maps, key: &F::Key) -> Result<bool> {
    Ok(delete_all::<F>(m, std::slice::from_ref(key), |_, _| true)? == 1)
}

/// Removes the entries keyed `keys` whose values pass `ok` (given the
/// key's index in `keys`); the table mapped once, each entry checked and
/// freed in one hold of its set, so an entry the datapath gave to another
/// connection meanwhile stays. How many went.
pub fn delete_all<F: Family>(
    m: &Maps,
    keys: &[F::Key],
    ok: impl Fn(usize, &F::Val) -> bool,
) -> Result<usize> {
    if keys.is_empty() {
        return Ok(0);
    }
    let t = Table::open::<F>(m)?;
    let l = &t.l;
    let mut n = 0;
    for (i, key) in keys.iter().enumerate() {
        let gone = t.write(t.index_of(key).0, |set, p| {
            let Some(w) = set.way_of::<F>(key) else {
                return false;
            };
            if !ok(i, &set.val::<F::Val>(w)) {
                return false;
            }
            // SAFETY: the set is owned; the offsets are its fields'. A
            // free way as ho_drop makes it: tag 0, or (untagged) protocol 0.
            unsafe {
                if l.tagged {
                    store(p, l.tag_at[w], 0u32);
                } else {
                    let mut k = *key;
                    F::free(&mut k);
                    store(p, l.key_at[w], k);
                }
            }
            true
        })?;
        n += usize::from(gone);
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash by hand for a key of four words, and the two words of a
    /// pair weighed each by its own key (swapping them changes the hash).
    #[test]
    fn hash_is_pair_multiply_shift_and_a_finaliser() {
        let mut keys: Keys = [0; lb_limits::LB_HO_KEYS.0 as usize];
        for (i, k) in keys.iter_mut().enumerate() {
            *k = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i as u64 + 1);
        }
        let words = [7u32, 0xffff_ffff, 3, 0x8000_0000];
        let key: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let (a, w): (Vec<u128>, Vec<u128>) = (
            keys.iter().map(|&k| u128::from(k)).collect(),
            words.iter().map(|&x| u128::from(x)).collect(),
        );
        let m = 1u128 << 64;
        let sum = (a[0]
            + (a[1] + w[1]) % m * ((a[2] + w[0]) % m) % m
            + (a[3] + w[3]) % m * ((a[4] + w[2]) % m) % m)
            % m;
        assert_eq!(hash(&keys, &key), mix32((sum >> 32) as u32));
        let swapped: Vec<u8> = [words[1], words[0], words[2], words[3]]
            .iter()
            .flat_map(|w| w.to_ne_bytes())
            .collect();
        assert_ne!(hash(&keys, &key), hash(&keys, &swapped));
    }

    /// How many of `keys`' entries find their set full (beyond its
    /// ways), in a table of 128K sets: the IPv4 keys of one client's UDP
    /// flows from 5,000 consecutive ports to each of three service ports.
    fn overflow_of_consecutive_ports(keys: &Keys) -> usize {
        let sets = 128 * 1024;
        let mut used = vec![0usize; sets as usize];
        for dport in 81..84u16 {
            for sport in 2000..7000u16 {
                let mut key = [0u8; 16];
                key[..8].copy_from_slice(&[10, 200, 0, 10, 10, 200, 0, 1]);
                key[8..10].copy_from_slice(&sport.to_be_bytes());
                key[10..12].copy_from_slice(&dport.to_be_bytes());
                key[12] = 17;
                used[set_of_hash(hash(keys, &key), sets) as usize] += 1;
            }
        }
        used.iter().map(|&n| n.saturating_sub(WAYS)).sum()
    }

    /// Keys that differ in one word (consecutive ports) have sums in
    /// arithmetic progression; where the ports word's multiplier steps the
    /// sum by about an eighth of 2^64 a port, pair-multiply-shift alone
    /// puts the 15,000 flows in a few runs of sets (12,600 of them find
    /// their set full). The finaliser spreads them as random keys do.
    #[test]
    fn consecutive_ports_spread_over_the_sets() {
        let mut keys: Keys =
            std::array::from_fn(|i| 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i as u64 + 1));
        // the ports word's multiplier, a[3] + the proto word (17): 2^53 +
        // 2^32, a port (256 in the word) steps the sum 2^61 + 2^40
        keys[3] = (1 << 53) + (1 << 32) - 17;
        let n = overflow_of_consecutive_ports(&keys);
        assert!(n <= 10, "{n} of 15,000 flows find their set full");
        let mut x = 7u64;
        for _ in 0..5 {
            let keys: Keys = std::array::from_fn(|_| {
                x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let z = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^ (z >> 31)
            });
            let n = overflow_of_consecutive_ports(&keys);
            assert!(n <= 10, "{n} of 15,000 flows find their set full");
        }
    }

    #[test]
    fn every_set_is_reached() {
        let sets = 7;
        let mut seen = [false; 7];
        let keys: Keys =
            std::array::from_fn(|i| 0x2545_f491_4f6c_dd1du64.wrapping_mul(i as u64 + 3));
        for i in 0..1000u64 {
            let s = set_of_hash(hash(&keys, &i.to_ne_bytes()), sets);
            seen[s as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }

    /// The C layout (bpf/maps.h): keys after the lock and stamps, entries
    /// each on lines of their own.
    #[test]
    fn set_layout() {
        let l = layout::<V4>();
        assert_eq!(
            (l.key_at, l.val_at, l.head, l.size),
            ([16, 32, 48], [64, 128, 192], 64, 256)
        );
        let l = layout::<V6>();
        assert_eq!(l.tag_at, [16, 20, 24]);
        assert_eq!(
            (l.key_at, l.val_at[0], l.way_len, l.size),
            ([64, 192, 320], 104, 128, 448)
        );
    }

    #[test]
    fn sets_hold_the_entries() {
        assert_eq!(sets_for(2048), 683);
        assert_eq!(sets_for(3), 1);
        assert_eq!(sets_for(0), 1);
    }
}
