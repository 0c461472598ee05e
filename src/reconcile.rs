//! The one path by which an instance's interfaces, services and backends
//! change. Every writer states what it wants as a [`Target`]: `lb apply`
//! and `lb run` (start, reload) the whole file, `lb run` at a health change
//! the weights of its checked backends, `lb attach` an interface (and the
//! one-liner's service), `lb service`/`lb backend` one edit of what is
//! loaded. [`plan`] reads what is loaded once and takes the difference;
//! [`apply`] makes the changes in order (attachments, additions, weights,
//! removals), allocating ids from the state it read, and on a failure
//! undoes those made, in reverse order. Callers that share the instance
//! hold its lock ([`crate::lock`]) across both.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;

use anyhow::{anyhow, bail, Context, Result};

use crate::bpffs::PinDir;
use crate::config::Iface;
use crate::loader::{self, Attachment};
use crate::maps::{self, Maps};
use crate::service::{self, Backend, Service, SvcConf};
use crate::settings::Settings;

/// Services (with their mode and scheduler) and backends with their
/// weights: wanted, or loaded.
pub type State = BTreeMap<Service, SvcState>;

/// A service as wanted or loaded, without ids.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SvcState {
    /// Forwarding mode and scheduler.
    pub conf: SvcConf,
    /// Backends and their weights.
    pub backends: BTreeMap<SocketAddr, u32>,
}

/// A service of the default mode and scheduler with these backends.
impl<const N: usize> From<[(SocketAddr, u32); N]> for SvcState {
    fn from(b: [(SocketAddr, u32); N]) -> Self {
        Self::new(SvcConf::default(), b)
    }
}

impl SvcState {
    /// A service with `conf` and `backends`.
    pub fn new(conf: SvcConf, backends: impl IntoIterator<Item = (SocketAddr, u32)>) -> Self {
        Self {
            conf,
            backends: backends.into_iter().collect(),
        }
    }
}

/// A loaded backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedBackend {
    /// Its id.
    pub id: u32,
    /// Its weight in the maps.
    pub weight: u32,
}

/// A loaded service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedService {
    /// Its id.
    pub id: u32,
    /// Its forwarding mode and scheduler.
    pub conf: SvcConf,
    /// Its backends by address.
    pub backends: BTreeMap<SocketAddr, LoadedBackend>,
}

impl LoadedService {
    fn table(&self) -> Vec<Backend> {
        self.backends
            .iter()
            .map(|(a, b)| Backend {
                id: b.id,
                addr: *a,
                weight: b.weight,
                svc_id: self.id,
            })
            .collect()
    }
}

/// What an instance has loaded, with the ids the datapath uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Loaded {
    /// Services by VIP:port/proto.
    pub services: BTreeMap<Service, LoadedService>,
    /// Every backend id in use (a backend of no service included).
    used_backends: BTreeSet<u32>,
}

impl Loaded {
    /// Reads the services and backends of an instance.
    pub fn read(m: &Maps) -> Result<Self> {
        let bes = service::backends(m)?;
        let used_backends = bes.iter().map(|b| b.id).collect();
        let services = service::services_of(m, &bes)?
            .into_iter()
            .map(|s| {
                let backends = s
                    .backends
                    .iter()
                    .map(|b| {
                        (
                            b.addr,
                            LoadedBackend {
                                id: b.id,
                                weight: b.weight,
                            },
                        )
                    })
                    .collect();
                (
                    s.service,
                    LoadedService {
                        id: s.id,
                        conf: s.conf,
                        backends,
                    },
                )
            })
            .collect();
        Ok(Self {
            services,
            used_backends,
        })
    }

    /// Services, backends and weights, without ids.
    pub fn state(&self) -> State {
        self.services
            .iter()
            .map(|(s, l)| {
                let b = l.backends.iter().map(|(a, b)| (*a, b.weight));
                (*s, SvcState::new(l.conf, b))
            })
            .collect()
    }

    /// The id of a loaded backend.
    pub fn backend_id(&self, svc: &Service, addr: SocketAddr) -> Option<u32> {
        Some(self.services.get(svc)?.backends.get(&addr)?.id)
    }

    fn free_service_id(&self) -> Result<u32> {
        let used: BTreeSet<u32> = self.services.values().map(|s| s.id).collect();
        (0..maps::MAX_SERVICES)
            .find(|i| !used.contains(i))
            .ok_or_else(|| anyhow!("service table full ({} services)", maps::MAX_SERVICES))
    }

    fn free_backend_id(&self) -> Result<u32> {
        (0..maps::MAX_BACKENDS)
            .find(|i| !self.used_backends.contains(i))
            .ok_or_else(|| anyhow!("backend table full ({} backends)", maps::MAX_BACKENDS))
    }
}

/// One change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Attach to an interface (or replace the program on it).
    Attach(Iface),
    /// A new service.
    AddService(Service, SvcConf),
    /// A new backend.
    AddBackend(Service, SocketAddr, u32),
    /// A weight changes (old, new).
    SetWeight(Service, SocketAddr, u32, u32),
    /// A backend goes (with its weight, for rollback).
    DelBackend(Service, SocketAddr, u32),
    /// A service goes (with what it was, for rollback).
    DelService(Service, SvcState),
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Attach(i) => write!(f, "+ interface {} ({} mode)", i.name, i.mode),
            Change::AddService(s, _) => write!(f, "+ service {s}"),
            Change::AddBackend(s, a, w) => write!(f, "+ backend {a} weight {w} (service {s})"),
            Change::SetWeight(s, a, o, n) => {
                write!(f, "~ backend {a} weight {o} -> {n} (service {s})")
            }
            Change::DelBackend(s, a, _) => write!(f, "- backend {a} (service {s})"),
            Change::DelService(s, _) => write!(f, "- service {s}"),
        }
    }
}

/// The changes that take `have` to `want`, in the order they are applied:
/// additions first, then weights, then removals. A service whose mode or
/// scheduler changes is replaced (removed, then added with its backends):
/// its flows were made the old way.
pub fn diff(have: &State, want: &State) -> Vec<Change> {
    let mut adds = Vec::new();
    let mut sets = Vec::new();
    let mut dels = Vec::new();
    for (svc, ws) in want {
        let mut hs = have.get(svc);
        if let Some(h) = hs.filter(|h| h.conf != ws.conf) {
            adds.push(Change::DelService(*svc, h.clone()));
            hs = None;
        }
        if hs.is_none() {
            adds.push(Change::AddService(*svc, ws.conf));
        }
        let hb = hs.map(|h| &h.backends);
        let wb = &ws.backends;
        for (a, w) in wb {
            match hb.and_then(|h| h.get(a)) {
                None => adds.push(Change::AddBackend(*svc, *a, *w)),
                Some(o) if o != w => sets.push(Change::SetWeight(*svc, *a, *o, *w)),
                Some(_) => {}
            }
        }
        if let Some(hb) = hb {
            for (a, w) in hb {
                if !wb.contains_key(a) {
                    dels.push(Change::DelBackend(*svc, *a, *w));
                }
            }
        }
    }
    for (svc, hs) in have {
        if !want.contains_key(svc) {
            dels.push(Change::DelService(*svc, hs.clone()));
        }
    }
    adds.extend(sets);
    adds.extend(dels);
    adds
}

/// One edit of a state, as a command asks for it; each refuses what the
/// command may not do (adding what exists, changing what does not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    /// A new service (`lb service add`).
    AddService(Service, SvcConf),
    /// A service goes (`lb service del`).
    DelService(Service),
    /// A new backend (`lb backend add`).
    AddBackend(Service, SocketAddr, u32),
    /// A backend goes (`lb backend del`).
    DelBackend(Service, SocketAddr),
    /// A backend's weight (`lb backend set`, `drain`).
    SetWeight(Service, SocketAddr, u32),
    /// The service exists with exactly these backends, new ones with
    /// weight 1, the others keeping theirs (the one-liner of `lb attach`);
    /// a new service has the default mode and scheduler.
    Backends(Service, Vec<SocketAddr>),
    /// A backend's weight if the backend is there (`lb run` at a health
    /// change); nothing otherwise.
    WeightIfPresent(Service, SocketAddr, u32),
}

impl Edit {
    /// Checks what the edit holds on its own (addresses, weights): what
    /// the datapath can take, before anything is read or made.
    pub fn check(&self) -> Result<()> {
        match self {
            Edit::AddService(s, conf) => {
                service::check_service(s)?;
                crate::model::check_conf(s, conf)
            }
            Edit::DelService(s) => service::check_service(s),
            Edit::AddBackend(s, a, w) | Edit::SetWeight(s, a, w) => {
                service::check_service(s)?;
                service::check_backend(s, *a)?;
                service::check_weight(*w)
            }
            Edit::DelBackend(s, a) => {
                service::check_service(s)?;
                service::check_backend(s, *a)
            }
            Edit::Backends(s, addrs) => {
                service::check_service(s)?;
                addrs.iter().try_for_each(|a| service::check_backend(s, *a))
            }
            Edit::WeightIfPresent(_, _, w) => service::check_weight(*w),
        }
    }

    /// Applies the edit to `st`, or says why it cannot be.
    pub fn apply_to(&self, st: &mut State) -> Result<()> {
        fn svc_mut<'a>(
            st: &'a mut State,
            s: &Service,
        ) -> Result<&'a mut BTreeMap<SocketAddr, u32>> {
            st.get_mut(s)
                .map(|x| &mut x.backends)
                .ok_or_else(|| anyhow!("no such service: {s}"))
        }
        self.check()?;
        match self {
            Edit::AddService(s, conf) => {
                if st.contains_key(s) {
                    bail!("service {s} already exists");
                }
                st.insert(*s, SvcState::new(*conf, []));
            }
            Edit::DelService(s) => {
                st.remove(s)
                    .ok_or_else(|| anyhow!("no such service: {s}"))?;
            }
            Edit::AddBackend(s, a, w) => {
                if let Some(have) = st.get(s) {
                    crate::model::check_mode_backend(&have.conf, s, *a)?;
                    crate::net::check_direct_backend(have.conf.mode, a.ip())?;
                }
                let b = svc_mut(st, s)?;
                if b.contains_key(a) {
                    bail!("backend {a} already belongs to service {s}");
                }
                b.insert(*a, *w);
            }
            Edit::DelBackend(s, a) => {
                svc_mut(st, s)?
                    .remove(a)
                    .ok_or_else(|| anyhow!("service {s} has no backend {a}"))?;
            }
            Edit::SetWeight(s, a, w) => {
                *svc_mut(st, s)?
                    .get_mut(a)
                    .ok_or_else(|| anyhow!("service {s} has no backend {a}"))? = *w;
            }
            Edit::Backends(s, addrs) => {
                let have = st.remove(s).unwrap_or_default();
                let b = addrs
                    .iter()
                    .map(|a| (*a, have.backends.get(a).copied().unwrap_or(1)));
                st.insert(*s, SvcState::new(have.conf, b));
            }
            Edit::WeightIfPresent(s, a, w) => {
                if let Some(x) = st.get_mut(s).and_then(|b| b.backends.get_mut(a)) {
                    *x = *w;
                }
            }
        }
        Ok(())
    }
}

/// The services a target wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    /// Exactly these, nothing else (a file).
    Exactly(State),
    /// What is loaded, edited.
    Edited(Vec<Edit>),
}

/// What a writer wants an instance to be.
#[derive(Debug, Clone)]
pub struct Target {
    /// The file it comes from, for errors.
    pub file: Option<String>,
    /// Datapath settings asked for (`None`: the instance's, or defaults).
    pub settings: Option<Settings>,
    /// Where the settings are in the file (`file:line:column`).
    pub settings_at: Option<String>,
    /// Interfaces to attach to if not attached yet.
    pub interfaces: Vec<Iface>,
    /// Attach even if attached (replacing the program: `lb attach`).
    pub reattach: bool,
    /// Services and backends.
    pub services: Want,
}

impl Target {
    /// Edits of what is loaded, nothing else.
    pub fn edits(edits: Vec<Edit>) -> Self {
        Self {
            file: None,
            settings: None,
            settings_at: None,
            interfaces: Vec::new(),
            reattach: false,
            services: Want::Edited(edits),
        }
    }
}

/// The changes a target needs, against the state read.
#[derive(Debug, Clone)]
pub struct Plan {
    /// In the order they are made.
    pub changes: Vec<Change>,
    settings: Option<Settings>,
    loaded: Loaded,
}

impl Plan {
    /// What was loaded when the plan was made.
    pub fn loaded(&self) -> &Loaded {
        &self.loaded
    }
}

/// The plan for `t` against the instance at `pins` (interfaces of the
/// current network namespace).
pub fn plan(t: &Target, pins: &PinDir) -> Result<Plan> {
    let maps = if pins.map("conntrack").exists() {
        Some(Maps::open(pins)?)
    } else {
        None
    };
    let existing = maps.as_ref().map(Maps::settings).transpose()?;
    if let (Some(want), Some(have)) = (&t.settings, &existing) {
        if want != have {
            match t.settings_at.as_ref().or(t.file.as_ref()) {
                Some(at) => bail!(
                    "{at}: settings: [settings] differ from those of the running instance at {} ({have:?}); detach all its interfaces to change them",
                    pins.root.display()
                ),
                None => bail!(
                    "the instance at {} runs with other settings ({have:?}); detach all its interfaces to change them",
                    pins.root.display()
                ),
            }
        }
    }
    let mut changes = Vec::new();
    for i in &t.interfaces {
        if !i.at.is_empty() {
            crate::net::ifindex(&i.name)
                .with_context(|| format!("{}: interfaces.name: interface {}", i.at, i.name))?;
        }
        if t.reattach || !pins.link(&i.name).exists() {
            changes.push(Change::Attach(i.clone()));
        }
    }
    let loaded = match &maps {
        Some(m) => Loaded::read(m)?,
        None if changes.is_empty() => match &t.file {
            Some(f) => bail!(
                "no lb instance at {} and no interface to attach in {f}",
                pins.root.display()
            ),
            None => bail!(
                "no lb instance at {} (run lb attach first, or give --pin-dir/--netns)",
                pins.root.display()
            ),
        },
        None => Loaded::default(),
    };
    let have = loaded.state();
    let want = match &t.services {
        Want::Exactly(s) => s.clone(),
        Want::Edited(edits) => {
            let mut st = have.clone();
            for e in edits {
                e.apply_to(&mut st)?;
            }
            st
        }
    };
    changes.extend(diff(&have, &want));
    Ok(Plan {
        changes,
        settings: t.settings.clone(),
        loaded,
    })
}

/// What [`apply`] did.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The attachments made (or replaced).
    pub attachments: Vec<Attachment>,
    /// What is loaded now (with the ids given).
    pub loaded: Loaded,
}

/// Test hook: with `LB_TEST_FAIL_AFTER=N` set, applying fails after N
/// changes, so that tests can watch the rollback.
const FAIL_AFTER_ENV: &str = "LB_TEST_FAIL_AFTER";

/// The instance's maps: opened from the pins (once the first attachment
/// has made them), or given.
enum Handle<'a> {
    Pins(&'a PinDir, Option<Box<Maps>>),
    Maps(&'a Maps),
}

impl Handle<'_> {
    fn maps(&mut self) -> Result<&Maps> {
        match self {
            Handle::Maps(m) => Ok(m),
            Handle::Pins(p, slot) => {
                if slot.is_none() {
                    *slot = Some(Box::new(Maps::open(p)?));
                }
                Ok(slot.as_deref().expect("opened"))
            }
        }
    }
}

struct Writer<'a> {
    handle: Handle<'a>,
    settings: Option<&'a Settings>,
    loaded: Loaded,
    maglev_size: Option<u32>,
}

impl Writer<'_> {
    /// Makes one change in the maps and in `loaded`; an attachment
    /// returns what it did.
    fn make(&mut self, c: &Change) -> Result<Option<Attachment>> {
        if let Change::Attach(i) = c {
            let Handle::Pins(pins, _) = &self.handle else {
                bail!("no pin directory to attach {} with", i.name);
            };
            let a = loader::attach(&i.name, i.mode, self.settings, pins)
                .with_context(|| format!("attaching to {}", i.name))?;
            return Ok(Some(a));
        }
        let m = self.handle.maps()?;
        let size = match self.maglev_size {
            Some(s) => s,
            None => *self.maglev_size.insert(m.settings()?.maglev_size),
        };
        let st = &mut self.loaded;
        let svc_of = |st: &Loaded, s: &Service| -> Result<LoadedService> {
            st.services
                .get(s)
                .cloned()
                .ok_or_else(|| anyhow!("no such service: {s}"))
        };
        match c {
            Change::Attach(_) => unreachable!("handled above"),
            Change::AddService(s, conf) => {
                let id = st.free_service_id()?;
                service::create_service(m, s, conf, id, size)?;
                st.services.insert(
                    *s,
                    LoadedService {
                        id,
                        conf: *conf,
                        backends: BTreeMap::new(),
                    },
                );
            }
            Change::AddBackend(s, a, w) => {
                let mut ls = svc_of(st, s)?;
                if ls.backends.contains_key(a) {
                    bail!("backend {a} already belongs to service {s}");
                }
                let id = st.free_backend_id()?;
                ls.backends.insert(*a, LoadedBackend { id, weight: *w });
                let b = Backend {
                    id,
                    addr: *a,
                    weight: *w,
                    svc_id: ls.id,
                };
                service::create_backend(m, &b, &ls.table(), size)?;
                if ls.conf.mode.is_direct() {
                    // The datapath forwards a DSR packet only to a
                    // resolved MAC (the kernel would take it for the VIP),
                    // and an IPIP one best so: have the kernel resolve it
                    // now (an IPIP backend's router, if it is behind one).
                    crate::net::resolve_neighbour(a.ip());
                }
                st.used_backends.insert(id);
                st.services.insert(*s, ls);
            }
            Change::SetWeight(s, a, _, w) => {
                let mut ls = svc_of(st, s)?;
                let lb = ls
                    .backends
                    .get_mut(a)
                    .ok_or_else(|| anyhow!("service {s} has no backend {a}"))?;
                lb.weight = *w;
                let b = Backend {
                    id: lb.id,
                    addr: *a,
                    weight: *w,
                    svc_id: ls.id,
                };
                service::set_weight(m, &b, &ls.table(), size)?;
                st.services.insert(*s, ls);
            }
            Change::DelBackend(s, a, _) => {
                let mut ls = svc_of(st, s)?;
                let lb = ls
                    .backends
                    .remove(a)
                    .ok_or_else(|| anyhow!("service {s} has no backend {a}"))?;
                let b = Backend {
                    id: lb.id,
                    addr: *a,
                    weight: lb.weight,
                    svc_id: ls.id,
                };
                service::remove_backend(m, &b, &ls.table(), size)?;
                st.used_backends.remove(&lb.id);
                st.services.insert(*s, ls);
            }
            Change::DelService(s, _) => {
                let ls = svc_of(st, s)?;
                let ids: Vec<u32> = ls.backends.values().map(|b| b.id).collect();
                service::remove_service(m, s, ls.id, &ids)?;
                for id in &ids {
                    st.used_backends.remove(id);
                }
                st.services.remove(s);
            }
        }
        if matches!(c, Change::AddService(..) | Change::DelService(..)) {
            // The datapath looks for DSR and IPIP services only while
            // there are.
            let n = st
                .services
                .values()
                .filter(|l| l.conf.mode.is_direct())
                .count();
            maps::set_dsr_services(m, n as u32)?;
        }
        Ok(None)
    }

    /// Undoes a change made (an attachment made as `a`).
    fn undo(&mut self, c: &Change, a: Option<&Attachment>) -> Result<()> {
        let inverse = match c {
            Change::Attach(i) => {
                // A replaced program runs the same maps: nothing to undo.
                if a.is_some_and(|a| !a.replaced) {
                    if let Handle::Pins(pins, slot) = &mut self.handle {
                        *slot = None;
                        loader::detach(&i.name, pins)?;
                    }
                }
                return Ok(());
            }
            Change::AddService(s, _) => vec![Change::DelService(*s, SvcState::default())],
            Change::AddBackend(s, a, w) => vec![Change::DelBackend(*s, *a, *w)],
            Change::SetWeight(s, a, o, n) => vec![Change::SetWeight(*s, *a, *n, *o)],
            Change::DelBackend(s, a, w) => vec![Change::AddBackend(*s, *a, *w)],
            Change::DelService(s, was) => std::iter::once(Change::AddService(*s, was.conf))
                .chain(
                    was.backends
                        .iter()
                        .map(|(a, w)| Change::AddBackend(*s, *a, *w)),
                )
                .collect(),
        };
        for c in &inverse {
            self.make(c)?;
        }
        Ok(())
    }
}

fn run(mut w: Writer<'_>, changes: &[Change]) -> Result<Applied> {
    let fail_after: Option<usize> = std::env::var(FAIL_AFTER_ENV)
        .ok()
        .and_then(|v| v.parse().ok());
    let mut done: Vec<(&Change, Option<Attachment>)> = Vec::new();
    let mut result = Ok(());
    for c in changes {
        if fail_after == Some(done.len()) {
            result = Err(anyhow!(
                "{FAIL_AFTER_ENV}: failing after {} changes",
                done.len()
            ));
            break;
        }
        match w.make(c) {
            Ok(a) => done.push((c, a)),
            Err(e) => {
                result = Err(e.context(format!("applying '{c}'")));
                break;
            }
        }
    }
    if let Err(e) = result {
        let mut failed = Vec::new();
        for (c, a) in done.iter().rev() {
            if let Err(u) = w.undo(c, a.as_ref()) {
                failed.push(format!("undoing '{c}': {u:#}"));
            }
        }
        if failed.is_empty() {
            return Err(e.context("nothing changed (rolled back)"));
        }
        return Err(e.context(format!("rollback incomplete: {}", failed.join("; "))));
    }
    Ok(Applied {
        attachments: done.into_iter().filter_map(|(_, a)| a).collect(),
        loaded: w.loaded,
    })
}

/// Makes the changes of `plan` (from [`plan`] on the same `pins`, under the
/// same lock) all or nothing: on a failure, those made are undone in
/// reverse order and the error returned. (A backend removed and put back
/// by a rollback has lost its flows.)
pub fn apply(plan: &Plan, pins: &PinDir) -> Result<Applied> {
    let w = Writer {
        handle: Handle::Pins(pins, None),
        settings: plan.settings.as_ref(),
        loaded: plan.loaded.clone(),
        maglev_size: None,
    };
    run(w, &plan.changes)
}

/// Edits the services of the instance whose maps are `m` through the same
/// plan and apply (no attachments, no lock: for tests and benchmarks that
/// own their instance). Returns what is loaded after.
pub fn edit_maps(m: &Maps, edits: &[Edit]) -> Result<Loaded> {
    let loaded = Loaded::read(m)?;
    let have = loaded.state();
    let mut want = have.clone();
    for e in edits {
        e.apply_to(&mut want)?;
    }
    let w = Writer {
        handle: Handle::Maps(m),
        settings: None,
        loaded,
        maglev_size: None,
    };
    Ok(run(w, &diff(&have, &want))?.loaded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::Proto;

    fn svc(port: u16) -> Service {
        Service::new(SocketAddr::from(([10, 0, 0, 1], port)), Proto::Tcp)
    }

    fn be(last: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 1, last], 80))
    }

    fn edited(st: &State, e: Edit) -> Result<State> {
        let mut s = st.clone();
        e.apply_to(&mut s).map(|()| s)
    }

    #[test]
    fn edits_refuse_what_a_command_may_not_do() {
        let mut st = State::new();
        st.insert(svc(80), [(be(1), 1)].into());
        let err = |e: Edit| format!("{:#}", edited(&st, e).unwrap_err());
        assert_eq!(
            err(Edit::AddService(svc(80), SvcConf::default())),
            "service 10.0.0.1:80/tcp already exists"
        );
        assert_eq!(
            err(Edit::DelService(svc(81))),
            "no such service: 10.0.0.1:81/tcp"
        );
        assert_eq!(
            err(Edit::AddBackend(svc(80), be(1), 1)),
            "backend 10.0.1.1:80 already belongs to service 10.0.0.1:80/tcp"
        );
        assert_eq!(
            err(Edit::AddBackend(svc(80), be(2), 10_001)),
            "weight 10001 out of range 0..=10000"
        );
        assert_eq!(
            err(Edit::SetWeight(svc(80), be(2), 1)),
            "service 10.0.0.1:80/tcp has no backend 10.0.1.2:80"
        );
        assert_eq!(
            err(Edit::AddService(
                Service::new(
                    "255.255.255.255:80".parse::<SocketAddr>().unwrap(),
                    Proto::Tcp
                ),
                SvcConf::default()
            )),
            "255.255.255.255 is not a unicast address"
        );
    }

    #[test]
    fn one_liner_keeps_weights_and_health_touches_only_what_is_there() {
        let mut st = State::new();
        st.insert(svc(80), [(be(1), 5), (be(2), 1)].into());
        st.insert(svc(81), [(be(3), 1)].into());
        let s = edited(&st, Edit::Backends(svc(80), vec![be(1), be(4)])).unwrap();
        assert_eq!(s[&svc(80)], [(be(1), 5), (be(4), 1)].into());
        assert_eq!(s[&svc(81)], st[&svc(81)]);
        let d = diff(&st, &s);
        let text: Vec<String> = d.iter().map(|c| c.to_string()).collect();
        assert_eq!(
            text,
            [
                "+ backend 10.0.1.4:80 weight 1 (service 10.0.0.1:80/tcp)",
                "- backend 10.0.1.2:80 (service 10.0.0.1:80/tcp)"
            ]
        );
        let s = edited(&st, Edit::WeightIfPresent(svc(80), be(9), 0)).unwrap();
        assert_eq!(s, st);
        let s = edited(&st, Edit::WeightIfPresent(svc(81), be(3), 0)).unwrap();
        assert_eq!(diff(&st, &s), [Change::SetWeight(svc(81), be(3), 1, 0)]);
    }
}
