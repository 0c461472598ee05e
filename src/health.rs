//! Health checks of backends: one probe (TCP connect, or HTTP GET expecting
//! a status), and the rise/fall state of a backend.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::config::{Check, CheckKind};

/// Probes `addr` once; the latency on success, why it failed otherwise.
/// Never takes (much) longer than the check's timeout.
pub fn probe(addr: SocketAddr, check: &Check) -> Result<Duration, String> {
    let t0 = Instant::now();
    let deadline = t0 + check.timeout;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("timed out after {:?}", check.timeout))
    };
    let mut s =
        TcpStream::connect_timeout(&addr, check.timeout).map_err(|e| format!("connect: {e}"))?;
    match &check.kind {
        CheckKind::Tcp => Ok(t0.elapsed()),
        CheckKind::Http { path, expect } => {
            let req = format!(
                "GET {path} HTTP/1.0\r\nHost: {}\r\nUser-Agent: lb-health\r\nConnection: close\r\n\r\n",
                match addr {
                    SocketAddr::V4(a) => a.ip().to_string(),
                    SocketAddr::V6(a) => format!("[{}]", a.ip()),
                }
            );
            s.set_write_timeout(Some(left()?))
                .map_err(|e| e.to_string())?;
            s.write_all(req.as_bytes())
                .map_err(|e| format!("sending: {e}"))?;
            let mut buf = Vec::new();
            let mut chunk = [0u8; 512];
            while !buf.contains(&b'\n') && buf.len() < 4096 {
                s.set_read_timeout(Some(left()?))
                    .map_err(|e| e.to_string())?;
                match s.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) => return Err(format!("reading: {e}")),
                }
            }
            let line = String::from_utf8_lossy(&buf);
            let line = line.lines().next().unwrap_or("");
            let status: Option<u16> = line
                .strip_prefix("HTTP/")
                .and_then(|r| r.split_whitespace().nth(1))
                .and_then(|c| c.parse().ok());
            match status {
                Some(c) if c == *expect => Ok(t0.elapsed()),
                Some(c) => Err(format!("status {c}, expected {expect}")),
                None => Err(format!("not an HTTP answer: {line:?}")),
            }
        }
    }
}

/// A backend's health: up or down, with runs of results.
#[derive(Debug, Clone, Default)]
pub struct Health {
    /// Whether it is down (a backend starts up).
    pub down: bool,
    /// Successes in a row.
    pub oks: u32,
    /// Failures in a row.
    pub fails: u32,
    /// Latency of the last successful check.
    pub last_latency: Option<Duration>,
    /// Why the last check failed, if it did.
    pub last_error: Option<String>,
}

impl Health {
    /// Records a probe result; returns the new state (`true`: up) when it
    /// changes: after `fall` failures in a row, or `rise` successes.
    pub fn record(&mut self, r: &Result<Duration, String>, check: &Check) -> Option<bool> {
        match r {
            Ok(d) => {
                self.oks += 1;
                self.fails = 0;
                self.last_latency = Some(*d);
                self.last_error = None;
                if self.down && self.oks >= check.rise {
                    self.down = false;
                    return Some(true);
                }
            }
            Err(e) => {
                self.fails += 1;
                self.oks = 0;
                self.last_error = Some(e.clone());
                if !self.down && self.fails >= check.fall {
                    self.down = true;
                    return Some(false);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(rise: u32, fall: u32) -> Check {
        Check {
            kind: CheckKind::Tcp,
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(50),
            rise,
            fall,
        }
    }

    #[test]
    fn rise_and_fall() {
        let c = check(2, 3);
        let ok: Result<Duration, String> = Ok(Duration::from_millis(1));
        let bad: Result<Duration, String> = Err("refused".into());
        let mut h = Health::default();
        assert_eq!(h.record(&bad, &c), None);
        assert_eq!(h.record(&bad, &c), None);
        assert_eq!(h.record(&ok, &c), None, "a success resets the failures");
        assert_eq!(h.record(&bad, &c), None);
        assert_eq!(h.record(&bad, &c), None);
        assert_eq!(h.record(&bad, &c), Some(false));
        assert!(h.down);
        assert_eq!(h.record(&bad, &c), None);
        assert_eq!(h.record(&ok, &c), None);
        assert_eq!(h.record(&bad, &c), None, "a failure resets the successes");
        assert_eq!(h.record(&ok, &c), None);
        assert_eq!(h.record(&ok, &c), Some(true));
        assert!(!h.down);
        assert_eq!(h.last_latency, Some(Duration::from_millis(1)));
    }
}
