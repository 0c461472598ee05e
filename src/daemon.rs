//! `lb run`: the foreground daemon. Applies the configuration file,
//! health-checks backends (taking a failed one out of new-flow selection and
//! ending its flows, putting it back after it recovers), reloads on SIGHUP,
//! stops on SIGTERM/SIGINT leaving the datapath attached, and optionally
//! serves Prometheus metrics.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{SigSet, Signal};
use tracing::{error, info, warn};

use crate::bpffs::PinDir;
use crate::config::{self, Check, Config};
use crate::health::{self, Health};
use crate::lock::{self, InstanceLock};
use crate::maps::Maps;
use crate::metrics::{self, HealthInfo, HealthView};
use crate::reconcile::{self, Edit, Target};
use crate::service::Service;
use crate::{announce, conntrack, netns, sched};

/// How `lb run` was started.
#[derive(Debug, Clone)]
pub struct Options {
    /// The configuration file.
    pub file: PathBuf,
    /// The LB's network namespace.
    pub netns: Option<String>,
    /// The instance's pins.
    pub pin_dir: PathBuf,
    /// Where to serve metrics.
    pub metrics: Option<SocketAddr>,
    /// This node's SNAT addresses (`--snat`), in place of the file's.
    pub snat: Option<Vec<std::net::IpAddr>>,
}

/// The file, with this node's SNAT addresses if given (at start and at
/// each reload).
fn load(o: &Options) -> Result<Config> {
    let cfg = config::load(&o.file)?;
    match &o.snat {
        Some(a) => cfg.with_snat(a),
        None => Ok(cfg),
    }
}

type Key = (Service, SocketAddr);

enum Event {
    Probe {
        generation: u64,
        key: Key,
        result: Result<Duration, String>,
    },
    Signal(Signal),
    /// A second passed: dynamic schedulers adjust their tables.
    Tick,
}

/// Health checkers of one configuration; stopped on drop.
struct Checkers {
    stop: Arc<AtomicBool>,
}

impl Drop for Checkers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn start_checkers(cfg: &Config, generation: u64, tx: &Sender<Event>) -> Result<Checkers> {
    let stop = Arc::new(AtomicBool::new(false));
    for s in &cfg.services {
        for b in &s.backends {
            let Some(check) = b.check.clone() else {
                continue;
            };
            let key = (s.service, b.addr);
            let (tx, stop) = (tx.clone(), Arc::clone(&stop));
            std::thread::Builder::new()
                .name(format!("check {}", b.addr))
                .spawn(move || loop {
                    let t0 = Instant::now();
                    let result = health::probe(key.1, &check);
                    if stop.load(Ordering::Relaxed)
                        || tx
                            .send(Event::Probe {
                                generation,
                                key,
                                result,
                            })
                            .is_err()
                    {
                        return;
                    }
                    while t0.elapsed() < check.interval {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        std::thread::sleep(
                            (check.interval - t0.elapsed()).min(Duration::from_millis(20)),
                        );
                    }
                })
                .context("starting a health checker")?;
        }
    }
    Ok(Checkers { stop })
}

struct State {
    cfg: Config,
    pins: PinDir,
    health: BTreeMap<Key, Health>,
    checks: BTreeMap<Key, Check>,
    /// Backends out of new-flow selection now.
    out: HashSet<Key>,
    view: HealthView,
    /// The last health change failed to apply.
    retry: bool,
    /// Dynamic schedulers' state (crate::sched).
    dynamic: sched::Dynamic,
}

impl State {
    /// The backends to take out: the down ones, except when that would
    /// leave a service without any backend taking flows.
    fn wanted_out(&self) -> HashSet<Key> {
        let mut out = HashSet::new();
        for s in &self.cfg.services {
            let down: Vec<Key> = s
                .backends
                .iter()
                .map(|b| (s.service, b.addr))
                .filter(|k| self.health.get(k).is_some_and(|h| h.down))
                .collect();
            if down.is_empty() {
                continue;
            }
            let serving = s
                .backends
                .iter()
                .any(|b| b.weight > 0 && !down.contains(&(s.service, b.addr)));
            if serving {
                out.extend(down);
            } else {
                error!(
                    service = %s.service,
                    "every backend of the service is down: keeping them all in (never blackhole)"
                );
            }
        }
        out
    }

    /// What the daemon wants: with `whole`, the file (weight 0 for the
    /// backends out); else only the weights of the checked backends it owns,
    /// leaving everything else as it is loaded (a health change).
    fn target(&self, out: &HashSet<Key>, whole: bool) -> Target {
        if whole {
            return self.cfg.target(out);
        }
        let mut edits = Vec::new();
        for s in &self.cfg.services {
            for b in &s.backends {
                let k = (s.service, b.addr);
                if self.checks.contains_key(&k) {
                    let w = if out.contains(&k) { 0 } else { b.weight };
                    edits.push(Edit::WeightIfPresent(s.service, b.addr, w));
                }
            }
        }
        Target::edits(edits)
    }

    /// Under the instance's lock, makes the maps match the file (`whole`) or
    /// the health state, and ends the flows of backends newly taken out.
    fn sync(&mut self, why: &str, whole: bool) -> Result<()> {
        let out = self.wanted_out();
        let _lock = InstanceLock::acquire(&self.pins, lock::wait_from_env(), |l| warn!("{l}"))?;
        let plan = reconcile::plan(&self.target(&out, whole), &self.pins)?;
        let done = reconcile::apply(&plan, &self.pins)?;
        // The health view (/metrics) before the log says it is applied: a
        // reader that saw the log finds the metrics agree.
        self.publish();
        for c in &plan.changes {
            info!(change = %c, reason = why, "applied");
        }
        let newly: Vec<Key> = out.difference(&self.out).copied().collect();
        if !newly.is_empty() {
            let m = Maps::open(&self.pins)?;
            for (svc, addr) in newly {
                if let Some(id) = done.loaded.backend_id(&svc, addr) {
                    let n = conntrack::end_flows(&m, |f| f.backend == id)?;
                    info!(service = %svc, backend = %addr, entries = n, "ended the flows of a backend taken out");
                }
            }
        }
        self.out = out;
        self.announce();
        // The reconciler installed tables from the configured weights.
        self.dynamic.reset_installed();
        Ok(())
    }

    /// Dynamic schedulers: rebuilds the tables whose weights moved.
    fn adjust(&mut self) -> Result<()> {
        let scheds: BTreeMap<Service, crate::model::Scheduler> = self
            .cfg
            .services
            .iter()
            .map(|s| (s.service, s.conf.scheduler))
            .collect();
        if scheds
            .values()
            .all(|s| *s == crate::model::Scheduler::Maglev)
        {
            return Ok(());
        }
        let m = Maps::open(&self.pins)?;
        let measured = sched::Measured::read(&m)?;
        let _lock = InstanceLock::acquire(&self.pins, lock::wait_from_env(), |l| warn!("{l}"))?;
        for (svc, ws) in self.dynamic.adjust(&m, &scheds, &measured)? {
            let ws: Vec<String> = ws.iter().map(|(a, w)| format!("{a}={w}")).collect();
            info!(service = %svc, weights = %ws.join(" "), "scheduler weights");
        }
        Ok(())
    }

    /// The VIPs to announce: those with a service that has a backend
    /// taking flows and not down (a backend without a check counts as up).
    fn serving_vips(&self) -> std::collections::BTreeSet<std::net::IpAddr> {
        self.cfg
            .services
            .iter()
            .filter(|s| {
                s.backends.iter().any(|b| {
                    let k = (s.service, b.addr);
                    b.weight > 0
                        && !self.out.contains(&k)
                        && !self.health.get(&k).is_some_and(|h| h.down)
                })
            })
            .map(|s| s.service.vip)
            .collect()
    }

    /// Holds exactly the VIPs served on the announce interface.
    fn announce(&self) {
        let Some(a) = &self.cfg.announce else { return };
        match announce::sync(&a.interface, &self.serving_vips()) {
            Ok((added, removed)) => {
                for v in added {
                    info!(vip = %v, interface = %a.interface, "announced");
                }
                for v in removed {
                    info!(vip = %v, interface = %a.interface, "withdrawn");
                }
            }
            Err(e) => error!(error = %format!("{e:#}"), "announcing the VIPs"),
        }
    }

    fn publish(&self) {
        let mut v = self.view.lock().expect("health lock");
        v.clear();
        for k in self.checks.keys() {
            let h = self.health.get(k).cloned().unwrap_or_default();
            v.insert(
                *k,
                HealthInfo {
                    up: !h.down,
                    latency: h.last_latency,
                },
            );
        }
    }

    fn set_config(&mut self, cfg: Config) {
        let mut checks = BTreeMap::new();
        for s in &cfg.services {
            for b in &s.backends {
                if let Some(c) = &b.check {
                    checks.insert((s.service, b.addr), c.clone());
                }
            }
        }
        // Backends still checked the same way keep their state.
        self.health
            .retain(|k, _| checks.contains_key(k) && self.checks.get(k) == checks.get(k));
        self.checks = checks;
        self.cfg = cfg;
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(o: &Options) -> Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    // Signals go to the signal thread only: block them here, before any
    // thread exists (threads inherit the mask).
    let mut sigs = SigSet::empty();
    for s in [Signal::SIGHUP, Signal::SIGTERM, Signal::SIGINT] {
        sigs.add(s);
    }
    sigs.thread_block().context("blocking signals")?;
    // Every thread started from here on lives in the LB's namespace: its
    // health checks and metrics sockets too.
    let _ns = netns::enter_opt(o.netns.as_deref())?;
    let pins = PinDir::new(&o.pin_dir);
    let cfg = load(o)?;
    let view: HealthView = Arc::default();
    let mut st = State {
        cfg: cfg.clone(),
        pins,
        health: BTreeMap::new(),
        checks: BTreeMap::new(),
        out: HashSet::new(),
        view: Arc::clone(&view),
        retry: false,
        dynamic: Default::default(),
    };
    st.set_config(cfg);
    st.sync("start", true)?;
    info!(file = %o.file.display(), services = st.cfg.services.len(), "config applied");

    let (tx, rx) = channel();
    let mut generation = 1;
    let mut checkers = start_checkers(&st.cfg, generation, &tx)?;
    if let Some(addr) = o.metrics {
        let addr = metrics::serve(addr, o.pin_dir.clone(), Arc::clone(&view))?;
        info!(%addr, "serving metrics at /metrics");
    }
    {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                match sigs.wait() {
                    Ok(s) => {
                        if tx.send(Event::Signal(s)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        error!(error = %e, "waiting for signals");
                        return;
                    }
                }
            })
            .context("starting the signal thread")?;
    }
    {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name("ticks".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_secs(1));
                if tx.send(Event::Tick).is_err() {
                    return;
                }
            })
            .context("starting the scheduler tick")?;
    }
    info!(pid = std::process::id(), "running");

    loop {
        let Ok(ev) = rx.recv() else {
            return Ok(());
        };
        match ev {
            Event::Signal(Signal::SIGHUP) => {
                info!(file = %o.file.display(), "SIGHUP: reloading");
                match load(o) {
                    Err(e) => {
                        error!(error = %format!("{e:#}"), "reload failed: keeping the running config")
                    }
                    Ok(new) => {
                        let old = st.cfg.clone();
                        let old_health = st.health.clone();
                        let old_checks = st.checks.clone();
                        st.set_config(new);
                        let old_announce = old.announce.clone();
                        match st.sync("reload", true) {
                            Ok(()) => {
                                // Announcing elsewhere now, or no more.
                                if let Some(a) = old_announce.filter(|a| {
                                    st.cfg.announce.as_ref().map(|n| &n.interface)
                                        != Some(&a.interface)
                                }) {
                                    if let Err(e) =
                                        announce::sync(&a.interface, &Default::default())
                                    {
                                        error!(error = %format!("{e:#}"), "withdrawing the VIPs");
                                    }
                                }
                                generation += 1;
                                drop(checkers);
                                checkers = start_checkers(&st.cfg, generation, &tx)?;
                                info!(file = %o.file.display(), services = st.cfg.services.len(), "config applied");
                            }
                            Err(e) => {
                                error!(error = %format!("{e:#}"), "reload failed: keeping the running config");
                                st.cfg = old;
                                st.health = old_health;
                                st.checks = old_checks;
                            }
                        }
                    }
                }
            }
            Event::Tick => {
                if let Err(e) = st.adjust() {
                    error!(error = %format!("{e:#}"), "adjusting scheduler weights");
                }
            }
            Event::Signal(s) => {
                info!(signal = %s, "stopping; the datapath stays attached");
                drop(checkers);
                if let Some(a) = st.cfg.announce.as_ref().filter(|a| !a.keep_on_stop) {
                    match announce::sync(&a.interface, &Default::default()) {
                        Ok((_, removed)) => {
                            for v in removed {
                                info!(vip = %v, interface = %a.interface, "withdrawn (stopping)");
                            }
                        }
                        Err(e) => error!(error = %format!("{e:#}"), "withdrawing the VIPs"),
                    }
                }
                return Ok(());
            }
            Event::Probe {
                generation: g,
                key,
                result,
            } => {
                if g != generation {
                    continue;
                }
                let Some(check) = st.checks.get(&key).cloned() else {
                    continue;
                };
                let h = st.health.entry(key).or_default();
                let change = h.record(&result, &check);
                let err = h.last_error.clone();
                match change {
                    Some(false) => {
                        warn!(service = %key.0, backend = %key.1, error = err.as_deref().unwrap_or(""), fall = check.fall, "backend down");
                    }
                    Some(true) => {
                        info!(service = %key.0, backend = %key.1, rise = check.rise, "backend up");
                    }
                    None if !st.retry => {
                        st.publish();
                        continue;
                    }
                    // A change that failed to apply is tried again.
                    None => {}
                }
                st.retry = false;
                if let Err(e) = st.sync("health", false) {
                    error!(error = %format!("{e:#}"), "applying a health change failed (tried again at the next check)");
                    st.retry = true;
                }
            }
        }
    }
}
