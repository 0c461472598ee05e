//! The datapath's clock: jiffies, read in the kernel by `bpf_jiffies64`
//! (inlined by the JIT, unlike `bpf_ktime_get_coarse_ns`). Userspace reads
//! the same clock by running the `lb_clock` program once, and learns its
//! rate (the kernel's HZ) by watching it tick. The program is loaded once a
//! process, on first use.

use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};

use crate::skel::pass::PassSkelBuilder;

/// Rates the kernel can be built with (CONFIG_HZ).
const KNOWN_HZ: &[u32] = &[100, 250, 300, 1000];

/// Times the clock program was loaded in this process.
static LOADS: AtomicUsize = AtomicUsize::new(0);

/// The clock program, loaded on first use and kept for the process: its
/// file descriptor holds it in the kernel. Loaded once: first readers at
/// the same time wait for one load; a failed load is tried again next call.
fn clock() -> Result<BorrowedFd<'static>> {
    static PROG: OnceLock<OwnedFd> = OnceLock::new();
    static LOADING: Mutex<()> = Mutex::new(());
    if let Some(fd) = PROG.get() {
        return Ok(fd.as_fd());
    }
    let _one = LOADING.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(fd) = PROG.get() {
        return Ok(fd.as_fd());
    }
    let fd = load()?;
    Ok(PROG.get_or_init(|| fd).as_fd())
}

fn load() -> Result<OwnedFd> {
    let mut storage = MaybeUninit::uninit();
    let skel = PassSkelBuilder::default()
        .open(&mut storage)
        .context("opening the clock program")?
        .load()
        .context("loading the clock program")?;
    LOADS.fetch_add(1, Ordering::Relaxed);
    skel.progs
        .lb_clock
        .as_fd()
        .try_clone_to_owned()
        .context("keeping the clock program")
}

/// Reads the datapath clock now (jiffies).
pub fn now() -> Result<u64> {
    read(clock()?)
}

/// Runs the clock program once (BPF_PROG_TEST_RUN): jiffies.
fn read(prog: BorrowedFd<'_>) -> Result<u64> {
    let frame = [0u8; 64];
    let mut out = [0u8; 64];
    let mut opts = libbpf_sys::bpf_test_run_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_test_run_opts>() as _,
        data_in: frame.as_ptr().cast(),
        data_size_in: frame.len() as u32,
        data_out: out.as_mut_ptr().cast(),
        data_size_out: out.len() as u32,
        repeat: 1,
        ..Default::default()
    };
    // SAFETY: the buffers outlive the call and their sizes are given.
    let rc = unsafe { libbpf_sys::bpf_prog_test_run_opts(prog.as_raw_fd(), &mut opts) };
    if rc < 0 {
        return Err(std::io::Error::from_raw_os_error(-rc)).context("reading the clock");
    }
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
    let prog = clock()?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_is_loaded_once_a_process() {
        if !nix::unistd::geteuid().is_root() {
            assert!(std::env::var("CI").is_err(), "needs root under CI");
            eprintln!("SKIPPED clock_is_loaded_once_a_process: needs root");
            return;
        }
        // First readers at once, as the daemon's threads may be.
        let first: Vec<u64> = std::thread::scope(|s| {
            let t: Vec<_> = (0..4).map(|_| s.spawn(|| now().unwrap())).collect();
            t.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let t = Instant::now();
        let reads: Vec<u64> = (0..100).map(|_| now().unwrap()).collect();
        eprintln!("100 clock reads: {:?}", t.elapsed());
        let h = hz().unwrap();
        assert!(KNOWN_HZ.contains(&h), "{h}");
        assert!(
            reads.windows(2).all(|w| w[0] <= w[1]),
            "the clock goes back"
        );
        assert!(first.iter().all(|f| *f > 0 && *f <= reads[0]));
        assert_eq!(LOADS.load(Ordering::Relaxed), 1, "loaded more than once");
    }
}
