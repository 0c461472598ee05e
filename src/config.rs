//! The load-time configuration of the datapath: who is the LB, the client
//! and the backends.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use anyhow::{bail, Result};

/// Most backends the program can hold (LB_MAX_BACKENDS in bpf/lb.h).
pub const MAX_BACKENDS: usize = 16;

/// Addresses the XDP program is loaded with.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Config {
    /// The LB's address: clients connect to it, backends answer to it.
    pub lb: Ipv4Addr,
    /// The client whose connections are balanced.
    pub client: Ipv4Addr,
    /// The backends, chosen per connection by a hash of the flow.
    pub backends: Vec<Ipv4Addr>,
    /// Only this TCP port is balanced; `None`: every port.
    pub port: Option<u16>,
}

impl Config {
    /// Checks the configuration makes sense before anything is loaded.
    pub fn validate(&self) -> Result<()> {
        if self.backends.is_empty() {
            bail!("at least one --backend is needed");
        }
        if self.backends.len() > MAX_BACKENDS {
            bail!(
                "at most {MAX_BACKENDS} backends are supported, got {}",
                self.backends.len()
            );
        }
        let mut seen = HashSet::new();
        for b in &self.backends {
            if !seen.insert(b) {
                bail!("backend {b} is given twice");
            }
            if *b == self.lb || *b == self.client {
                bail!("backend {b} is also the LB or the client address");
            }
        }
        if self.lb == self.client {
            bail!("the LB and the client have the same address {}", self.lb);
        }
        for a in [self.lb, self.client] {
            if a.is_unspecified() || a.is_broadcast() || a.is_multicast() {
                bail!("{a} is not a unicast address");
            }
        }
        if self.port == Some(0) {
            bail!("port 0 is not a valid port");
        }
        Ok(())
    }

    /// Addresses the program sends to: their MACs must be known.
    pub fn neighbours(&self) -> Vec<Ipv4Addr> {
        std::iter::once(self.client)
            .chain(self.backends.iter().copied())
            .collect()
    }
}
