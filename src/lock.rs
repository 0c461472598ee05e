//! One writer at a time per instance: an exclusive `flock(2)` on the
//! instance's pin directory itself (bpffs holds no regular files). Every
//! command that changes an instance (attach, detach, apply, service and
//! backend changes, each change of `lb run`) holds it from reading the
//! instance's state to its last map write, so two writers never plan
//! against the same state nor interleave their writes, and ids are
//! allocated by one writer at a time. Readers (list, stats, status,
//! conntrack, scrapes) do not take it.
//!
//! The directory may be made and removed while others wait on it (the
//! first attach makes it, the last detach removes it): a writer that got
//! the lock checks that the path still names the directory it locked, and
//! starts again otherwise. A writer that had to make the directory removes
//! it again if it is still empty when it is done.

use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::bpffs::PinDir;

/// How long a writer waits for another one by default.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(10);

/// Environment variable overriding [`DEFAULT_WAIT`], in seconds.
pub const WAIT_ENV: &str = "LB_LOCK_WAIT";

/// How long to wait: `LB_LOCK_WAIT` seconds if set and valid, else
/// [`DEFAULT_WAIT`].
pub fn wait_from_env() -> Duration {
    std::env::var(WAIT_ENV)
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0 && *s <= 3600.0)
        .map_or(DEFAULT_WAIT, Duration::from_secs_f64)
}

/// The lock of one instance; released on drop.
pub struct InstanceLock {
    dir: Option<Flock<File>>,
    path: PathBuf,
    created: bool,
}

fn same_dir(f: &File, path: &Path) -> bool {
    match (f.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// The pid holding a lock on `f`, from /proc/locks, if it can be told.
fn holder(f: &File) -> Option<u32> {
    let md = f.metadata().ok()?;
    let dev = md.dev();
    let id = format!(
        "{:02x}:{:02x}:{}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev),
        md.ino()
    );
    let locks = fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        // "1: FLOCK  ADVISORY  WRITE 1234 00:2d:5678 0 EOF"
        (w.len() >= 6 && w[1] == "FLOCK" && w[5] == id)
            .then(|| w[4].parse().ok())
            .flatten()
    })
}

/// "pid 1234, lb apply" for messages.
fn describe(pid: Option<u32>) -> String {
    let Some(pid) = pid else {
        return "another lb command".to_string();
    };
    let cmd = fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .take(2)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .map(|a| a.rsplit('/').next().unwrap_or("").to_string())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    if cmd.is_empty() {
        format!("another lb command (pid {pid})")
    } else {
        format!("another lb command (pid {pid}, {cmd})")
    }
}

impl InstanceLock {
    /// Takes the lock of the instance at `pins`, making its directory if
    /// needed (its parent must exist). If another writer holds it, calls
    /// `waiting` once with a line saying so and waits up to `wait`; then
    /// fails with one line.
    pub fn acquire(pins: &PinDir, wait: Duration, waiting: impl FnOnce(&str)) -> Result<Self> {
        let path = pins.root.clone();
        let deadline = Instant::now() + wait;
        let mut waiting = Some(waiting);
        let mut last_holder = None;
        loop {
            let created = match fs::create_dir(&path) {
                Ok(()) => true,
                Err(e) if e.kind() == ErrorKind::AlreadyExists => false,
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("creating pin directory {}", path.display()))
                }
            };
            let f = match OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_CLOEXEC)
                .open(&path)
            {
                Ok(f) => f,
                // Removed by the writer we waited for: make it again.
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("opening {}", path.display()));
                }
            };
            let mut f = f;
            loop {
                match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                    Ok(locked) => {
                        if same_dir(&locked, &path) {
                            return Ok(Self {
                                dir: Some(locked),
                                path,
                                created,
                            });
                        }
                        // Locked a directory that has been removed (and
                        // maybe made again) meanwhile: start over.
                        break;
                    }
                    Err((back, Errno::EWOULDBLOCK)) => {
                        f = back;
                        last_holder = holder(&f).or(last_holder);
                        if let Some(w) = waiting.take() {
                            w(&format!(
                                "waiting for {} changing the instance at {} (up to {} s)",
                                describe(last_holder),
                                path.display(),
                                wait.as_secs_f64()
                            ));
                        }
                        if Instant::now() >= deadline {
                            bail!(
                                "{} has been changing the instance at {} for {} s: gave up, nothing changed (the lock is {} itself)",
                                describe(last_holder),
                                path.display(),
                                wait.as_secs_f64(),
                                path.display()
                            );
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err((_, e)) => {
                        return Err(e).with_context(|| format!("locking {}", path.display()));
                    }
                }
            }
        }
    }
}

impl Drop for InstanceLock {
    fn drop(&mut self) {
        // Still locked: a directory this writer made and left empty goes
        // (rmdir fails on a directory that is not empty).
        if self.created {
            let _ = fs::remove_dir(&self.path);
        }
        drop(self.dir.take());
    }
}
