//! The declarative configuration: a TOML file describing interfaces,
//! services, backends (with optional health checks) and datapath settings.
//! Parsing and validation (errors name `file:line:column` and the field),
//! and what the file asks for as a target of the reconciler
//! (crate::reconcile), which takes the difference and applies it.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use toml::Spanned;

use crate::reconcile::{State, SvcState, Target, Want};
use crate::service::{self, FwdMode, Proto, Scheduler, Service, SvcConf};
use crate::settings::{self, Field, Settings};
use crate::xdp::Mode;

// ---------------------------------------------------------------- raw file

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    settings: Option<Spanned<RawSettings>>,
    #[serde(default)]
    interfaces: Vec<Spanned<RawIface>>,
    #[serde(default)]
    services: Vec<Spanned<RawService>>,
    #[serde(default)]
    announce: Option<Spanned<RawAnnounce>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAnnounce {
    interface: Spanned<String>,
    #[serde(default)]
    on_stop: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    max_flows: Option<Spanned<u32>>,
    max_half_open: Option<Spanned<u32>>,
    nat_ports: Option<Spanned<String>>,
    snat: Option<Spanned<Vec<String>>>,
    maglev_size: Option<Spanned<u32>>,
    tcp_timeout: Option<Spanned<u32>>,
    udp_timeout: Option<Spanned<u32>>,
    fin_timeout: Option<Spanned<u32>>,
    handshake_latency: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIface {
    name: Spanned<String>,
    #[serde(default)]
    mode: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    vip: Spanned<String>,
    port: Spanned<u16>,
    #[serde(default)]
    proto: Option<Spanned<String>>,
    #[serde(default)]
    mode: Option<Spanned<String>>,
    #[serde(default)]
    scheduler: Option<Spanned<String>>,
    #[serde(default)]
    affinity: Option<Spanned<String>>,
    #[serde(default)]
    affinity_timeout: Option<Spanned<u32>>,
    #[serde(default)]
    backends: Vec<Spanned<RawBackend>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    addr: Spanned<String>,
    #[serde(default)]
    weight: Option<Spanned<i64>>,
    #[serde(default)]
    check: Option<Spanned<RawCheck>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    kind: Spanned<String>,
    path: Option<Spanned<String>>,
    expect: Option<Spanned<u16>>,
    interval_ms: Option<Spanned<u64>>,
    timeout_ms: Option<Spanned<u64>>,
    rise: Option<Spanned<u32>>,
    fall: Option<Spanned<u32>>,
}

// ---------------------------------------------------------- validated config

/// An interface to attach to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iface {
    /// Its name (in the LB's network namespace).
    pub name: String,
    /// XDP mode.
    pub mode: Mode,
    /// Where it is in the file (`file:line:column`), for errors; empty
    /// when it is not from a file (`lb attach`).
    pub at: String,
}

/// What a health check does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// A TCP connection opens.
    Tcp,
    /// `GET path` answers with status `expect`.
    Http {
        /// Request path.
        path: String,
        /// Expected status code.
        expect: u16,
    },
}

/// A backend's health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// TCP or HTTP.
    pub kind: CheckKind,
    /// Time between checks.
    pub interval: Duration,
    /// Time a check may take.
    pub timeout: Duration,
    /// Successes in a row that bring a down backend back.
    pub rise: u32,
    /// Failures in a row that take an up backend out.
    pub fall: u32,
}

/// A backend as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendCfg {
    /// IP:PORT (port 0: the client's port).
    pub addr: SocketAddr,
    /// Configured weight.
    pub weight: u32,
    /// Optional health check.
    pub check: Option<Check>,
}

/// A service as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceCfg {
    /// VIP:PORT/PROTO.
    pub service: Service,
    /// Forwarding mode and scheduler.
    pub conf: SvcConf,
    /// Its backends, in file order.
    pub backends: Vec<BackendCfg>,
}

/// A whole validated configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Where it was read from.
    pub path: PathBuf,
    /// Datapath settings, if the file has a `[settings]` table (fields not
    /// given take the defaults).
    pub settings: Option<Settings>,
    /// Where `[settings]` is (`file:line:column`), for errors.
    pub settings_at: Option<String>,
    /// Interfaces to attach to.
    pub interfaces: Vec<Iface>,
    /// Services.
    pub services: Vec<ServiceCfg>,
    /// VIP announcement by `lb run` (crate::announce), if `[announce]`.
    pub announce: Option<Announce>,
}

/// `[announce]`: where `lb run` holds the VIPs it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announce {
    /// The interface of the LB's namespace that holds them (e.g. lo).
    pub interface: String,
    /// Keep them when `lb run` stops (the datapath goes on serving).
    pub keep_on_stop: bool,
}

/// Defaults of a health check.
pub const CHECK_INTERVAL_MS: u64 = 1000;
/// Default check timeout.
pub const CHECK_TIMEOUT_MS: u64 = 500;
/// Default rise and fall.
pub const CHECK_RISE_FALL: u32 = 2;

/// Where in a file: line and column (1-based) of a byte offset.
fn line_col(src: &str, pos: usize) -> (usize, usize) {
    let before = &src[..pos.min(src.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

struct Ctx<'a> {
    file: &'a str,
    src: &'a str,
}

impl Ctx<'_> {
    fn at(&self, span: Range<usize>) -> String {
        let (l, c) = line_col(self.src, span.start);
        format!("{}:{l}:{c}", self.file)
    }

    fn err(&self, span: Range<usize>, field: &str, msg: impl fmt::Display) -> anyhow::Error {
        let (l, c) = line_col(self.src, span.start);
        anyhow!("{}:{l}:{c}: {field}: {msg}", self.file)
    }
}

/// Reads and validates `path`. Checks that depend on the host (the NAT port
/// range against the ephemeral ports) use the current network namespace.
pub fn load(path: &Path) -> Result<Config> {
    let src =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&src, path)
}

/// Parses and validates `src`, read from `path` (named in errors).
pub fn parse(src: &str, path: &Path) -> Result<Config> {
    let file = path.display().to_string();
    let cx = Ctx { file: &file, src };
    let raw: RawFile = toml::from_str(src).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        let msg = e.message().trim().to_string();
        let (l, c) = line_col(src, span.start);
        anyhow!("{file}:{l}:{c}: {msg}")
    })?;

    let settings = raw
        .settings
        .as_ref()
        .map(|s| settings_of(&cx, s))
        .transpose()?;

    let mut interfaces = Vec::new();
    for i in &raw.interfaces {
        let name = i.get_ref().name.get_ref().clone();
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
            return Err(cx.err(
                i.get_ref().name.span(),
                "interfaces.name",
                format!("'{name}' is not an interface name"),
            ));
        }
        if interfaces.iter().any(|x: &Iface| x.name == name) {
            return Err(cx.err(
                i.get_ref().name.span(),
                "interfaces.name",
                format!("interface {name} is listed twice"),
            ));
        }
        let mode = match i.get_ref().mode.as_ref() {
            None => Mode::Auto,
            Some(m) => match m.get_ref().as_str() {
                "auto" => Mode::Auto,
                "native" => Mode::Native,
                "skb" => Mode::Skb,
                other => {
                    return Err(cx.err(
                        m.span(),
                        "interfaces.mode",
                        format!("'{other}' is not one of auto, native, skb"),
                    ))
                }
            },
        };
        interfaces.push(Iface {
            name,
            mode,
            at: cx.at(i.get_ref().name.span()),
        });
    }

    let mut services: Vec<ServiceCfg> = Vec::new();
    for s in &raw.services {
        let rs = s.get_ref();
        let vip: IpAddr = rs.vip.get_ref().parse().map_err(|_| {
            cx.err(
                rs.vip.span(),
                "services.vip",
                format!("'{}' is not an IP address", rs.vip.get_ref()),
            )
        })?;
        let proto = match rs.proto.as_ref() {
            None => Proto::Tcp,
            Some(p) => match p.get_ref().as_str() {
                "tcp" => Proto::Tcp,
                "udp" => Proto::Udp,
                other => {
                    return Err(cx.err(
                        p.span(),
                        "services.proto",
                        format!("'{other}' is not tcp or udp"),
                    ))
                }
            },
        };
        let service = Service::new(SocketAddr::new(vip, *rs.port.get_ref()), proto);
        service::check_service(&service)
            .map_err(|e| cx.err(rs.vip.span(), "services.vip", format!("{e:#}")))?;
        let mut conf = SvcConf::default();
        if let Some(m) = &rs.mode {
            conf.mode = m
                .get_ref()
                .parse::<FwdMode>()
                .map_err(|e| cx.err(m.span(), "services.mode", format!("{e:#}")))?;
        }
        if let Some(m) = &rs.scheduler {
            conf.scheduler = m
                .get_ref()
                .parse::<Scheduler>()
                .map_err(|e| cx.err(m.span(), "services.scheduler", format!("{e:#}")))?;
        }
        if let Some(a) = &rs.affinity {
            conf.affinity = a
                .get_ref()
                .parse::<crate::model::Affinity>()
                .map_err(|e| cx.err(a.span(), "services.affinity", format!("{e:#}")))?;
        }
        if let Some(t) = &rs.affinity_timeout {
            conf.affinity_timeout = Some(*t.get_ref());
            crate::model::check_affinity(&conf)
                .map_err(|e| cx.err(t.span(), "services.affinity_timeout", format!("{e:#}")))?;
        }
        if services.iter().any(|x| x.service == service) {
            return Err(cx.err(s.span(), "services", format!("duplicate service {service}")));
        }
        if services.len() >= crate::maps::MAX_SERVICES as usize {
            return Err(cx.err(
                s.span(),
                "services",
                format!("more than {} services", crate::maps::MAX_SERVICES),
            ));
        }
        let mut backends: Vec<BackendCfg> = Vec::new();
        for b in &rs.backends {
            let rb = b.get_ref();
            let addr: SocketAddr = rb.addr.get_ref().parse().map_err(|_| {
                cx.err(
                    rb.addr.span(),
                    "services.backends.addr",
                    format!(
                        "'{}' is not IP:PORT (e.g. 10.0.0.1:80, [fd00::1]:80)",
                        rb.addr.get_ref()
                    ),
                )
            })?;
            service::check_backend(&service, addr)
                .and_then(|_| crate::model::check_mode_backend(&conf, &service, addr))
                .map_err(|e| cx.err(rb.addr.span(), "services.backends.addr", format!("{e:#}")))?;
            if backends.iter().any(|x| x.addr == addr) {
                return Err(cx.err(
                    rb.addr.span(),
                    "services.backends.addr",
                    format!("duplicate backend {addr} in service {service}"),
                ));
            }
            let weight = match rb.weight.as_ref() {
                None => 1,
                Some(w) => service::weight_of(*w.get_ref())
                    .map_err(|e| cx.err(w.span(), "services.backends.weight", format!("{e:#}")))?,
            };
            let check = rb.check.as_ref().map(|c| check_of(&cx, c)).transpose()?;
            if let (Some(c), 0) = (&rb.check, addr.port()) {
                return Err(cx.err(
                    c.span(),
                    "services.backends.check",
                    format!("backend {addr} has port 0 (the client's port): a health check needs a port"),
                ));
            }
            backends.push(BackendCfg {
                addr,
                weight,
                check,
            });
        }
        services.push(ServiceCfg {
            service,
            conf,
            backends,
        });
    }
    let total: usize = services.iter().map(|s| s.backends.len()).sum();
    if total > crate::maps::MAX_BACKENDS as usize {
        bail!(
            "{file}: {total} backends, more than {}",
            crate::maps::MAX_BACKENDS
        );
    }
    let announce = match &raw.announce {
        None => None,
        Some(a) => {
            let a = a.get_ref();
            let name = a.interface.get_ref().clone();
            if name.is_empty() || name.len() > 12 || name.contains(['/', ' ', ':']) {
                return Err(cx.err(
                    a.interface.span(),
                    "announce.interface",
                    format!("'{name}' is not an interface name (at most 12 characters: lb labels its addresses <name>:lb)"),
                ));
            }
            let keep_on_stop = match a.on_stop.as_ref().map(|o| o.get_ref().as_str()) {
                None | Some("withdraw") => false,
                Some("keep") => true,
                Some(other) => {
                    return Err(cx.err(
                        a.on_stop.as_ref().unwrap().span(),
                        "announce.on_stop",
                        format!("'{other}' is not one of withdraw, keep"),
                    ))
                }
            };
            Some(Announce {
                interface: name,
                keep_on_stop,
            })
        }
    };
    Ok(Config {
        path: path.to_path_buf(),
        settings,
        settings_at: raw.settings.as_ref().map(|s| cx.at(s.span())),
        interfaces,
        services,
        announce,
    })
}

/// The `[settings]` table: each given field read (a syntax error names
/// it), then the settings validated once by [`Settings::validate`], whose
/// error names the field that broke a rule: its place in the file, or the
/// table's if the field was left to its default.
fn settings_of(cx: &Ctx, s: &Spanned<RawSettings>) -> Result<Settings> {
    let r = s.get_ref();
    let mut out = Settings::default();
    if let Some(p) = &r.nat_ports {
        out.nat_ports = settings::parse_ports(p.get_ref()).map_err(|e| {
            cx.err(
                p.span(),
                "settings.nat_ports",
                format!("{e:#} (e.g. \"1024-32767,61000-65535\")"),
            )
        })?;
    }
    if let Some(a) = &r.snat {
        out.snat = settings::parse_snat(&a.get_ref().join(","))
            .map_err(|e| cx.err(a.span(), "settings.snat", format!("{e:#}")))?;
    }
    type Set = fn(&mut Settings, u32);
    let numbers: [(Field, &Option<Spanned<u32>>, Set); 6] = [
        (Field::MaglevSize, &r.maglev_size, |s, v| s.maglev_size = v),
        (Field::MaxFlows, &r.max_flows, |s, v| s.max_flows = v),
        (Field::MaxHalfOpen, &r.max_half_open, |s, v| {
            s.max_half_open = v
        }),
        (Field::TcpTimeout, &r.tcp_timeout, |s, v| s.tcp_timeout = v),
        (Field::UdpTimeout, &r.udp_timeout, |s, v| s.udp_timeout = v),
        (Field::FinTimeout, &r.fin_timeout, |s, v| s.fin_timeout = v),
    ];
    for (_, f, set) in &numbers {
        if let Some(t) = f {
            set(&mut out, *t.get_ref());
        }
    }
    if let Some(h) = &r.handshake_latency {
        out.handshake_latency = *h.get_ref();
    }
    out.validate().map_err(|e| {
        let given = match e.field {
            Field::NatPorts => r.nat_ports.as_ref().map(|p| p.span()),
            Field::Snat => r.snat.as_ref().map(|a| a.span()),
            f => numbers
                .iter()
                .find(|(n, _, _)| *n == f)
                .and_then(|(_, v, _)| v.as_ref().map(|v| v.span())),
        };
        let span = given.unwrap_or_else(|| s.span());
        cx.err(span, &format!("settings.{}", e.field.name()), &e.msg)
    })?;
    Ok(out)
}

fn check_of(cx: &Ctx, c: &Spanned<RawCheck>) -> Result<Check> {
    let r = c.get_ref();
    let kind = match r.kind.get_ref().as_str() {
        "tcp" => {
            for (f, name) in [
                (r.path.as_ref().map(|p| p.span()), "path"),
                (r.expect.as_ref().map(|e| e.span()), "expect"),
            ] {
                if let Some(span) = f {
                    return Err(cx.err(
                        span,
                        &format!("services.backends.check.{name}"),
                        "only for kind = \"http\"",
                    ));
                }
            }
            CheckKind::Tcp
        }
        "http" => {
            let path = r
                .path
                .as_ref()
                .map_or("/".to_string(), |p| p.get_ref().clone());
            if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                let span = r.path.as_ref().map_or(c.span(), |p| p.span());
                return Err(cx.err(
                    span,
                    "services.backends.check.path",
                    format!("'{path}' is not an absolute path"),
                ));
            }
            let expect = match &r.expect {
                None => 200,
                Some(e) => {
                    let v = *e.get_ref();
                    if !(100..=599).contains(&v) {
                        return Err(cx.err(
                            e.span(),
                            "services.backends.check.expect",
                            format!("{v} is not an HTTP status"),
                        ));
                    }
                    v
                }
            };
            CheckKind::Http { path, expect }
        }
        other => {
            return Err(cx.err(
                r.kind.span(),
                "services.backends.check.kind",
                format!("'{other}' is not tcp or http"),
            ))
        }
    };
    let ms = |f: &Option<Spanned<u64>>, name: &str, default: u64| -> Result<Duration> {
        match f {
            None => Ok(Duration::from_millis(default)),
            Some(v) => {
                let x = *v.get_ref();
                if !(10..=3_600_000).contains(&x) {
                    return Err(cx.err(
                        v.span(),
                        &format!("services.backends.check.{name}"),
                        format!("{x} ms out of range 10..=3600000"),
                    ));
                }
                Ok(Duration::from_millis(x))
            }
        }
    };
    let interval = ms(&r.interval_ms, "interval_ms", CHECK_INTERVAL_MS)?;
    let timeout = ms(
        &r.timeout_ms,
        "timeout_ms",
        CHECK_TIMEOUT_MS.min(interval.as_millis() as u64),
    )?;
    if timeout > interval {
        let span = r.timeout_ms.as_ref().map_or(c.span(), |t| t.span());
        return Err(cx.err(
            span,
            "services.backends.check.timeout_ms",
            "longer than interval_ms",
        ));
    }
    let count = |f: &Option<Spanned<u32>>, name: &str| -> Result<u32> {
        match f {
            None => Ok(CHECK_RISE_FALL),
            Some(v) => {
                let x = *v.get_ref();
                if !(1..=100).contains(&x) {
                    return Err(cx.err(
                        v.span(),
                        &format!("services.backends.check.{name}"),
                        format!("{x} out of range 1..=100"),
                    ));
                }
                Ok(x)
            }
        }
    };
    Ok(Check {
        kind,
        interval,
        timeout,
        rise: count(&r.rise, "rise")?,
        fall: count(&r.fall, "fall")?,
    })
}

// ----------------------------------------------------------------- target

impl Config {
    /// This node's SNAT addresses (`lb run --snat`, `lb apply --snat`) in
    /// place of the file's `settings.snat`: the nodes of a scale-out run
    /// one file (one Maglev table everywhere), and in full NAT each needs
    /// addresses of its own, since replies must come back to the node that
    /// made the mapping. Without a `[settings]` table: the defaults with
    /// these addresses. Validated as the file's would be.
    pub fn with_snat(mut self, snat: &[IpAddr]) -> Result<Self> {
        let mut s = self.settings.take().unwrap_or_default();
        s.snat = snat.to_vec();
        s.validate().map_err(|e| anyhow!("--snat: {}", e.msg))?;
        self.settings = Some(s);
        Ok(self)
    }

    /// What the file asks of an instance (interfaces attached if they are
    /// not, settings, exactly its services); backends in `out` get weight 0.
    pub fn target(&self, out: &HashSet<(Service, SocketAddr)>) -> Target {
        Target {
            file: Some(self.path.display().to_string()),
            settings: self.settings.clone(),
            settings_at: self.settings_at.clone(),
            interfaces: self.interfaces.clone(),
            reattach: false,
            services: Want::Exactly(self.state(out)),
        }
    }

    /// The services and weights the file asks for; backends in `out` get
    /// weight 0.
    pub fn state(&self, out: &HashSet<(Service, SocketAddr)>) -> State {
        self.services
            .iter()
            .map(|s| {
                let b = s.backends.iter().map(|b| {
                    let w = if out.contains(&(s.service, b.addr)) {
                        0
                    } else {
                        b.weight
                    };
                    (b.addr, w)
                });
                (s.service, SvcState::new(s.conf, b))
            })
            .collect()
    }
}
