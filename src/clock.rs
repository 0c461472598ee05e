//! The datapath's clock: jiffies, read in the kernel by `bpf_jiffies64`
//! (inlined by the JIT, unlike `bpf_ktime_get_coarse_ns`). Userspace reads
//! the same clock by running the `lb_clock` program once, and learns its
//! rate (the kernel's HZ) by watching it tick.

use std::mem::MaybeUninit;
use std::sync::OnceLock;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::ProgramInput;

use crate::skel::pass::PassSkelBuilder;

/// Rates the kernel can be built with (CONFIG_HZ).
const KNOWN_HZ: &[u32] = &[100, 250, 300, 1000];

/// Loads the clock program and hands it to `f`.
fn with_clock<T>(f: impl FnOnce(&libbpf_rs::ProgramMut<'_>) -> Result<T>) -> Result<T> {
    let mut storage = MaybeUninit::uninit();
    let skel = PassSkelBuilder::default()
        .open(&mut storage)
        .context("opening the clock program")?
        .load()
        .context("loading the clock program")?;
    f(&skel.progs.lb_clock)
}

/// Reads the datapath clock now (jiffies).
pub fn now() -> Result<u64> {
    with_clock(read)
}

fn read(prog: &libbpf_rs::ProgramMut<'_>) -> Result<u64> {
    let frame = [0u8; 64];
    let mut out = [0u8; 64];
    let input = ProgramInput {
        data_in: Some(&frame),
        data_out: Some(&mut out),
        repeat: 1,
        ..Default::default()
    };
    prog.test_run(input).context("reading the clock")?;
    Ok(u64::from_ne_bytes(out[..8].try_into().expect("8 bytes")))
}

/// The clock's ticks a second (the kernel's HZ), measured once a process.
pub fn hz() -> Result<u32> {
    static HZ: OnceLock<u32> = OnceLock::new();
    if let Some(h) = HZ.get() {
        return Ok(*h);
    }
    let h = measure_hz()?;
    Ok(*HZ.get_or_init(|| h))
}

fn measure_hz() -> Result<u32> {
    with_clock(measure_hz_with)
}

fn measure_hz_with(prog: &libbpf_rs::ProgramMut<'_>) -> Result<u32> {
    // From one tick edge to the tenth after it: 10 ms at HZ=1000, 100 ms
    // at HZ=100.
    let edge = |from: u64| -> Result<(u64, Instant)> {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            let j = read(prog)?;
            if j != from {
                return Ok((j, Instant::now()));
            }
            if Instant::now() > deadline {
                bail!("the kernel's jiffies do not advance");
            }
            sleep(Duration::from_micros(200));
        }
    };
    let (j0, t0) = edge(read(prog)?)?;
    let mut j = j0;
    let mut t = t0;
    while j - j0 < 10 {
        (j, t) = edge(j)?;
    }
    let measured = (j - j0) as f64 / (t - t0).as_secs_f64();
    KNOWN_HZ
        .iter()
        .copied()
        .min_by(|a, b| {
            (f64::from(*a) - measured)
                .abs()
                .total_cmp(&(f64::from(*b) - measured).abs())
        })
        .filter(|h| (f64::from(*h) - measured).abs() < f64::from(*h) * 0.2)
        .ok_or_else(|| anyhow!("cannot tell the kernel's HZ (measured {measured:.0} ticks/s)"))
}
