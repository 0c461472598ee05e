//! Weighted Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and
//! Reliable Software Network Load Balancer", NSDI'16, section 3.4).
//!
//! [`build`] fills a lookup table of prime size `M` with backend ids. Every
//! backend has a permutation of the table's slots, `(offset + j * skip) % M`
//! for `j = 0, 1, ...`, where `offset = h1(key) % M` and
//! `skip = h2(key) % (M - 1) + 1`. Backends take turns claiming the next
//! still-free slot of their own permutation until the table is full. Because
//! each backend's preferences depend on its key alone, adding or removing one
//! backend moves only about its own share of the slots.
//!
//! Weights: turns are taken in rounds, backends sorted by key. In every round
//! each backend adds its weight to a credit and takes one slot when the credit
//! reaches the largest weight (then subtracting the largest weight), so the
//! heaviest backends take a slot every round and a backend of weight `w`
//! takes `w / max_weight` slots per round on average. Backends of weight 0
//! take no slot at all (draining), and the table is then identical to one
//! built without them.
//!
//! `h1` and `h2` are SipHash-2-4 with two fixed keys, so a table depends only
//! on the (key, id, weight) set and the size: not on the process, the host,
//! the order of the input, nor on the id values except as the values written.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use anyhow::{bail, Result};

/// Default lookup-table size: a prime, as Maglev needs.
pub const DEFAULT_SIZE: u32 = 65537;

/// Table entry meaning "no backend can take new flows".
pub const NO_BACKEND: u32 = u32::MAX;

/// One backend as the table builder sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Stable identity that places the backend in the table, e.g.
    /// `"10.200.0.11:80"`. Must be unique among the backends.
    pub key: String,
    /// Value written in the table's entries for this backend. Must not be
    /// [`NO_BACKEND`].
    pub id: u32,
    /// Relative share of the table; 0 means no new flows (drain).
    pub weight: u32,
}

/// Whether n is prime.
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n < 4 {
        return true;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    let n = u64::from(n);
    let mut i = 5u64;
    while i * i <= n {
        if n.is_multiple_of(i) || n.is_multiple_of(i + 2) {
            return false;
        }
        i += 6;
    }
    true
}

/// Builds the table: `size` entries (must be prime, else Err), each the id of
/// a backend; backends with weight 0 get no entries (drain); no backend with
/// weight > 0 => every entry [`NO_BACKEND`].
///
/// Also fails when two backends share a key (the error names it) or when a
/// backend's id is [`NO_BACKEND`]. The result depends neither on the order of
/// `backends` nor on the ids except as the values written.
pub fn build(backends: &[Backend], size: u32) -> Result<Vec<u32>> {
    if !is_prime(size) {
        bail!("Maglev table size {size} is not a prime (e.g. {DEFAULT_SIZE})");
    }

    let mut sorted: Vec<&Backend> = backends.iter().collect();
    sorted.sort_unstable_by(|a, b| a.key.cmp(&b.key));
    for pair in sorted.windows(2) {
        if pair[0].key == pair[1].key {
            bail!("duplicate Maglev backend key {:?}", pair[0].key);
        }
    }
    if let Some(b) = sorted.iter().find(|b| b.id == NO_BACKEND) {
        bail!(
            "Maglev backend {:?} has id {}, which is reserved for NO_BACKEND",
            b.key,
            b.id
        );
    }

    let m = u64::from(size);
    let mut table = vec![NO_BACKEND; size as usize];

    struct Turns {
        id: u32,
        weight: u64,
        /// Entries taken so far.
        taken: u64,
        /// Next slot of this backend's permutation to try.
        pos: u64,
        skip: u64,
    }
    let mut active: Vec<Turns> = sorted
        .iter()
        .filter(|b| b.weight > 0)
        .map(|b| {
            let (offset, skip) = permutation(&b.key, size);
            Turns {
                id: b.id,
                weight: u64::from(b.weight),
                taken: 0,
                pos: u64::from(offset),
                skip: u64::from(skip),
            }
        })
        .collect();
    let Some(max_weight) = active.iter().map(|t| t.weight).max() else {
        return Ok(table);
    };

    // The rounds of the credit scheme (module doc): after round r (from 1)
    // a backend of weight w has taken floor(r * w / max_weight) entries, so it
    // takes its k-th entry in round ceil(k * max_weight / w), and within a
    // round backends go in key order. A min-heap of each backend's next
    // (round, index) replays exactly that order without visiting backends
    // that sit rounds out: O(size * log n) however skewed the weights.
    // k <= size < 2^32 and max_weight < 2^32, so k * max_weight fits a u64.
    let next_round = |t: &Turns| ((t.taken + 1) * max_weight).div_ceil(t.weight);
    let mut heap: BinaryHeap<Reverse<(u64, usize)>> = active
        .iter()
        .enumerate()
        .map(|(i, t)| Reverse((next_round(t), i)))
        .collect();
    // Each turn fills one entry. The table has a free entry at every turn,
    // and a permutation visits every entry (size prime, 0 < skip < size), so
    // the search for a free one ends.
    for _ in 0..m {
        let mut top = heap.peek_mut().expect("one turn per active backend");
        let i = top.0 .1;
        let t = &mut active[i];
        loop {
            let p = t.pos as usize;
            t.pos += t.skip;
            if t.pos >= m {
                t.pos -= m;
            }
            if table[p] == NO_BACKEND {
                table[p] = t.id;
                break;
            }
        }
        t.taken += 1;
        *top = Reverse((next_round(t), i));
    }
    Ok(table)
}

/// Fixed SipHash keys of `h1` (offset) and `h2` (skip). Changing them moves
/// almost every flow: never do.
const OFFSET_KEY: (u64, u64) = (0x6d61_676c_6576_2d6f, 0x6666_7365_742d_6831);
const SKIP_KEY: (u64, u64) = (0x6d61_676c_6576_2d73, 0x6b69_702d_2d2d_6832);

/// A backend's permutation of a table of prime size `size` (>= 2):
/// `(offset, skip)` with `offset < size` and `0 < skip < size`.
fn permutation(key: &str, size: u32) -> (u32, u32) {
    let m = u64::from(size);
    let h1 = siphash24(OFFSET_KEY.0, OFFSET_KEY.1, key.as_bytes());
    let h2 = siphash24(SKIP_KEY.0, SKIP_KEY.1, key.as_bytes());
    ((h1 % m) as u32, (h2 % (m - 1) + 1) as u32)
}

/// SipHash-2-4 (Aumasson and Bernstein) of `data` under the key `(k0, k1)`,
/// the key's two little-endian halves.
fn siphash24(k0: u64, k1: u64, data: &[u8]) -> u64 {
    let mut v = [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ];
    fn round(v: &mut [u64; 4]) {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13) ^ v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16) ^ v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21) ^ v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17) ^ v[2];
        v[2] = v[2].rotate_left(32);
    }
    fn compress(v: &mut [u64; 4], m: u64) {
        v[3] ^= m;
        round(v);
        round(v);
        v[0] ^= m;
    }

    let chunks = data.chunks_exact(8);
    let tail = chunks.remainder();
    for chunk in chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        compress(&mut v, u64::from_le_bytes(word));
    }
    let mut last = (data.len() as u64) << 56;
    for (i, &byte) in tail.iter().enumerate() {
        last |= u64::from(byte) << (8 * i);
    }
    compress(&mut v, last);
    v[2] ^= 0xff;
    for _ in 0..4 {
        round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(key: &str, id: u32, weight: u32) -> Backend {
        Backend {
            key: key.to_string(),
            id,
            weight,
        }
    }

    /// `n` backends "10.200.0.<11+i>:80", ids 0..n, the given weights.
    fn backends(weights: &[u32]) -> Vec<Backend> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| backend(&format!("10.200.0.{}:80", 11 + i), i as u32, w))
            .collect()
    }

    /// Entries per id, for ids 0..n.
    fn counts(table: &[u32], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for &e in table {
            c[e as usize] += 1;
        }
        c
    }

    /// Deterministic Fisher-Yates shuffle (xorshift64), no dependencies.
    fn shuffle<T>(v: &mut [T], mut seed: u64) {
        for i in (1..v.len()).rev() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            v.swap(i, (seed % (i as u64 + 1)) as usize);
        }
    }

    fn assert_shares(weights: &[u32]) {
        let table = build(&backends(weights), DEFAULT_SIZE).unwrap();
        assert_eq!(table.len(), DEFAULT_SIZE as usize);
        let total: u32 = weights.iter().sum();
        for (i, &c) in counts(&table, weights.len()).iter().enumerate() {
            let share = c as f64 / f64::from(DEFAULT_SIZE);
            let want = f64::from(weights[i]) / f64::from(total);
            assert!(
                (share - want).abs() <= 0.01,
                "backend {i}: share {share:.4}, weight share {want:.4}"
            );
        }
    }

    #[test]
    fn shares_follow_weights() {
        assert_shares(&[1, 2, 3, 4]);
        assert_shares(&[1; 10]);
        assert_shares(&[7, 7, 7]);
        assert_shares(&[100, 1, 50]);
        assert_shares(&[1_000_000, 3_000_000]);
    }

    #[test]
    fn every_entry_filled_and_huge_weights_do_not_overflow() {
        let table = build(&backends(&[u32::MAX, u32::MAX - 1, 1]), DEFAULT_SIZE).unwrap();
        let c = counts(&table, 3);
        assert_eq!(c.iter().sum::<usize>(), DEFAULT_SIZE as usize);
        assert!(c[0].abs_diff(c[1]) <= 1, "{c:?}");
    }

    #[test]
    fn removing_one_of_n_moves_about_one_nth() {
        let n = 10;
        let all = backends(&[1; 10]);
        let before = build(&all, DEFAULT_SIZE).unwrap();
        for removed in 0..n {
            let mut rest = all.clone();
            rest.remove(removed);
            let after = build(&rest, DEFAULT_SIZE).unwrap();
            assert!(after.iter().all(|&e| e != removed as u32));
            let changed = before.iter().zip(&after).filter(|(b, a)| b != a).count();
            let fraction = changed as f64 / f64::from(DEFAULT_SIZE);
            assert!(
                fraction <= 1.0 / n as f64 + 0.02,
                "removing backend {removed} changed {fraction:.4} of the table"
            );
            // Every entry of the removed backend changed (checked above); of
            // the others, only a few moved.
            let removed_entries = before.iter().filter(|&&e| e == removed as u32).count();
            let others_moved = changed - removed_entries;
            assert!(
                (others_moved as f64) / f64::from(DEFAULT_SIZE) <= 0.02,
                "removing backend {removed} moved {others_moved} other entries"
            );
        }
    }

    #[test]
    fn input_order_does_not_matter() {
        let mut input = backends(&[3, 1, 4, 1, 5, 9, 2, 6, 0, 5]);
        let table = build(&input, DEFAULT_SIZE).unwrap();
        for seed in 1u64..6 {
            shuffle(&mut input, seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            assert_eq!(build(&input, DEFAULT_SIZE).unwrap(), table);
        }
        input.reverse();
        assert_eq!(build(&input, DEFAULT_SIZE).unwrap(), table);
    }

    #[test]
    fn ids_are_only_the_values_written() {
        let input = backends(&[1, 2, 3]);
        let table = build(&input, 251).unwrap();
        let renamed: Vec<Backend> = input
            .iter()
            .map(|b| backend(&b.key, 1000 + 7 * b.id, b.weight))
            .collect();
        let table2 = build(&renamed, 251).unwrap();
        let expect: Vec<u32> = table.iter().map(|&e| 1000 + 7 * e).collect();
        assert_eq!(table2, expect);
    }

    #[test]
    fn siphash_reference_vectors() {
        // Key 00 01 .. 0f; from the SipHash paper's reference vectors.
        let (k0, k1) = (0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908);
        let msg: Vec<u8> = (0u8..64).collect();
        assert_eq!(siphash24(k0, k1, &[]), 0x726f_db47_dd0e_0e31);
        assert_eq!(siphash24(k0, k1, &msg[..15]), 0xa129_ca61_49be_45e5);
        // And std's (deprecated, but fixed) SipHash-2-4 for every length.
        #[allow(deprecated)]
        for len in 0..msg.len() {
            use std::hash::Hasher;
            let mut h = std::hash::SipHasher::new_with_keys(k0, k1);
            h.write(&msg[..len]);
            assert_eq!(siphash24(k0, k1, &msg[..len]), h.finish(), "length {len}");
        }
    }

    #[test]
    fn known_answer() {
        // Computed once; a change here means every deployed table moves.
        assert_eq!(permutation("10.200.0.11:80", DEFAULT_SIZE), (36751, 24180));
        let table = build(&backends(&[1, 2, 3, 4]), DEFAULT_SIZE).unwrap();
        assert_eq!(
            &table[..16],
            &[3, 2, 1, 2, 3, 0, 3, 1, 3, 2, 3, 3, 3, 2, 3, 1]
        );
        let small = build(&backends(&[1, 1, 1]), 7).unwrap();
        assert_eq!(small, [0, 0, 2, 1, 2, 0, 1]);
    }

    #[test]
    fn zero_weight_backends_get_nothing() {
        let table = build(&backends(&[2, 0, 1]), DEFAULT_SIZE).unwrap();
        let c = counts(&table, 3);
        assert_eq!(c[1], 0);
        assert_eq!(c[0] + c[2], DEFAULT_SIZE as usize);

        let none = vec![NO_BACKEND; DEFAULT_SIZE as usize];
        assert_eq!(build(&backends(&[0, 0, 0]), DEFAULT_SIZE).unwrap(), none);
        assert_eq!(build(&[], DEFAULT_SIZE).unwrap(), none);
        assert_eq!(build(&[], 2).unwrap(), [NO_BACKEND; 2]);
    }

    #[test]
    fn adding_a_zero_weight_backend_changes_nothing() {
        let base = backends(&[1, 2, 3, 4, 5]);
        let table = build(&base, DEFAULT_SIZE).unwrap();
        for key in ["0.0.0.0:1", "10.200.0.13:81", "zzz", "10.200.0.99:80"] {
            let mut more = base.clone();
            more.insert(2, backend(key, 42, 0));
            assert_eq!(build(&more, DEFAULT_SIZE).unwrap(), table, "adding {key}");
        }
    }

    #[test]
    fn single_backend_takes_everything() {
        let table = build(&[backend("a", 5, 1)], DEFAULT_SIZE).unwrap();
        assert!(table.iter().all(|&e| e == 5));
        let table = build(&backends(&[1, 1]), 2).unwrap();
        let mut sorted = table.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [0, 1]);
    }

    #[test]
    fn primes() {
        let small: Vec<u32> = (0..50).filter(|&n| is_prime(n)).collect();
        assert_eq!(
            small,
            [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47]
        );
        assert!(is_prime(DEFAULT_SIZE));
        assert!(is_prime(65521));
        assert!(!is_prime(65535));
        assert!(!is_prime(65536));
        assert!(!is_prime(25));
        assert!(!is_prime(49));
        assert!(!is_prime(65537 * 3));
        assert!(is_prime(4_294_967_291)); // largest u32 prime
        assert!(!is_prime(u32::MAX));
        assert!(!is_prime(65521 * 65521));
    }

    #[test]
    fn bad_sizes_are_rejected() {
        let input = backends(&[1, 1]);
        for size in [0, 1, 4, 9, 100, 65536] {
            let err = build(&input, size).unwrap_err().to_string();
            assert!(err.contains("not a prime"), "{size}: {err}");
        }
    }

    #[test]
    fn duplicate_keys_are_rejected() {
        let mut input = backends(&[1, 1, 1]);
        input.push(backend("10.200.0.12:80", 9, 0));
        let err = build(&input, DEFAULT_SIZE).unwrap_err().to_string();
        assert!(err.contains("\"10.200.0.12:80\""), "{err}");
    }

    #[test]
    fn reserved_id_is_rejected() {
        let input = [backend("a", 0, 1), backend("b", NO_BACKEND, 1)];
        let err = build(&input, DEFAULT_SIZE).unwrap_err().to_string();
        assert!(err.contains("\"b\""), "{err}");
    }

    #[test]
    #[ignore = "timing; run with --release -- --ignored --nocapture"]
    fn build_time_1000_backends() {
        let equal: Vec<Backend> = (0..1000)
            .map(|i| backend(&format!("10.{}.{}.1:80", i / 256, i % 256), i, 1))
            .collect();
        let mut skewed = equal.clone();
        skewed[0].weight = 1_000_000;
        for (name, input) in [("equal weights", &equal), ("one heavy", &skewed)] {
            let start = std::time::Instant::now();
            let table = build(input, DEFAULT_SIZE).unwrap();
            let elapsed = start.elapsed();
            assert_eq!(table.len(), DEFAULT_SIZE as usize);
            println!("{DEFAULT_SIZE} entries, 1000 backends, {name}: {elapsed:?}");
        }
        let start = std::time::Instant::now();
        build(&backends(&[1, 1]), DEFAULT_SIZE).unwrap();
        println!("{DEFAULT_SIZE} entries, 2 backends: {:?}", start.elapsed());
    }
}
