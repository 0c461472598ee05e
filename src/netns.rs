//! Entering a named network namespace (`/run/netns/NAME`) without touching the
//! mount namespace, so pins still land in the host's bpffs. `ip netns exec`
//! would also remount /sys, hiding /sys/fs/bpf.

use std::fs::File;
use std::os::fd::AsFd;

use anyhow::{Context, Result};
use nix::sched::{setns, CloneFlags};

/// While alive, the calling thread is in the named network namespace; dropping
/// it returns the thread to the namespace it came from.
pub struct NetnsGuard {
    previous: File,
}

impl NetnsGuard {
    /// Moves the calling thread into `/run/netns/<name>`.
    pub fn enter(name: &str) -> Result<Self> {
        let previous = File::open("/proc/thread-self/ns/net")
            .context("opening this thread's network namespace")?;
        let path = format!("/run/netns/{name}");
        let target = File::open(&path)
            .with_context(|| format!("no such network namespace: {name} ({path})"))?;
        setns(target.as_fd(), CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering network namespace {name}"))?;
        Ok(Self { previous })
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        // Failing to return would leave the thread in a namespace that may be
        // deleted; nothing sensible can continue from there.
        setns(self.previous.as_fd(), CloneFlags::CLONE_NEWNET)
            .expect("returning to the original network namespace");
    }
}

/// Enters `name` if given; `None` stays where the thread is.
pub fn enter_opt(name: Option<&str>) -> Result<Option<NetnsGuard>> {
    name.map(NetnsGuard::enter).transpose()
}
