//! Command line: argument parsing and output. The work is done by the
//! library modules; this one only turns results into text or JSON.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::bpffs::{self, PinDir};
use crate::lock::{self, InstanceLock};
use crate::maps::Maps;
use crate::model::Affinity;
use crate::reconcile::{self, Applied, Change, Edit, Target};
use crate::service::{self, FwdMode, Proto, Scheduler, Service, SvcConf};
use crate::settings::{self, PortRange, Settings};
use crate::xdp::Mode;
use crate::{config, conntrack, daemon, loader, net, netns, output, stats};

/// An XDP layer-4 load balancer.
#[derive(Debug, Parser)]
#[command(name = "lb", version, about)]
pub struct Cli {
    /// Where the instance lives.
    #[command(flatten)]
    pub place: Place,
    /// Print JSON (README, "JSON output"): what is shown, or what was done.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Where the instance lives.
#[derive(Debug, Args)]
pub struct Place {
    /// Enter only this network namespace (/run/netns/NAME); pins stay in the host's bpffs.
    #[arg(long, value_name = "NAME", global = true)]
    pub netns: Option<String>,
    /// Directory (on bpffs) for the instance's pins.
    #[arg(long, value_name = "DIR", default_value = bpffs::DEFAULT_PIN_DIR, global = true)]
    pub pin_dir: PathBuf,
}

/// Datapath settings of a new instance (defaults in brackets).
#[derive(Debug, Args)]
pub struct SettingsArgs {
    /// NAT source ports towards backends, LO-HI[,LO-HI] [every port from
    /// 1024 outside net.ipv4.ip_local_port_range]; must stay clear of the
    /// host's ephemeral ports.
    #[arg(long, value_name = "LO-HI[,LO-HI]", value_parser = parse_ports)]
    pub nat_ports: Option<Ports>,
    /// Source addresses towards backends, the host's own [the LB's address
    /// on the egress interface]; one on `lo` may use every port from 1024.
    #[arg(long, value_name = "ADDR[,ADDR...]", value_parser = parse_snat)]
    pub snat: Option<Addrs>,
    /// Entries of each Maglev table, a prime [65537].
    #[arg(long, value_name = "N")]
    pub maglev_size: Option<u32>,
    /// Answered connections the connection table holds [1048576].
    #[arg(long, value_name = "N")]
    pub max_flows: Option<u32>,
    /// Half-open connections (not answered yet) the second table holds, so
    /// that a SYN flood cannot evict answered ones [262144].
    #[arg(long, value_name = "N")]
    pub max_half_open: Option<u32>,
    /// Idle TCP timeout, seconds [600].
    #[arg(long, value_name = "S")]
    pub tcp_timeout: Option<u32>,
    /// Idle UDP timeout, seconds [60].
    #[arg(long, value_name = "S")]
    pub udp_timeout: Option<u32>,
    /// Linger after FIN/RST, seconds [10].
    #[arg(long, value_name = "S")]
    pub fin_timeout: Option<u32>,
    /// Measure each backend's handshake latency (SYN to SYN-ACK: a clock
    /// read on each new TCP flow), on or off [on].
    #[arg(long, value_name = "on|off", value_parser = settings::parse_on_off)]
    pub handshake_latency: Option<bool>,
}

impl SettingsArgs {
    /// The settings asked for, on top of `base`; `None` if none was given.
    fn apply(&self, base: Settings) -> Option<Settings> {
        let mut s = base;
        let mut any = false;
        let mut set = |dst: &mut u32, v: Option<u32>| {
            if let Some(v) = v {
                *dst = v;
                any = true;
            }
        };
        set(&mut s.maglev_size, self.maglev_size);
        set(&mut s.max_flows, self.max_flows);
        set(&mut s.max_half_open, self.max_half_open);
        set(&mut s.tcp_timeout, self.tcp_timeout);
        set(&mut s.udp_timeout, self.udp_timeout);
        set(&mut s.fin_timeout, self.fin_timeout);
        if let Some(v) = self.handshake_latency {
            s.handshake_latency = v;
            any = true;
        }
        if let Some(p) = &self.nat_ports {
            s.nat_ports = p.0.clone();
            any = true;
        }
        if let Some(a) = &self.snat {
            s.snat = a.0.clone();
            any = true;
        }
        any.then_some(s)
    }
}

/// NAT port ranges as one argument.
#[derive(Debug, Clone)]
pub struct Ports(pub Vec<PortRange>);

/// Addresses as one argument.
#[derive(Debug, Clone)]
pub struct Addrs(pub Vec<IpAddr>);

fn parse_ports(s: &str) -> Result<Ports, String> {
    settings::parse_ports(s)
        .map(Ports)
        .map_err(|e| format!("{e:#}"))
}

fn parse_snat(s: &str) -> Result<Addrs, String> {
    settings::parse_snat(s)
        .map(Addrs)
        .map_err(|e| format!("{e:#}"))
}

/// A service argument: VIP:PORT and protocol.
#[derive(Debug, Args)]
pub struct SvcArg {
    /// The service, VIP:PORT (port 0: every port; IPv6 as [VIP]:PORT).
    #[arg(value_name = "VIP:PORT")]
    pub vip: SocketAddr,
    /// Protocol.
    #[arg(long, value_enum, default_value_t = Proto::Tcp)]
    pub proto: Proto,
}

impl SvcArg {
    fn service(&self) -> Service {
        Service::new(self.vip, self.proto)
    }
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load, attach to IFACE and pin; the program stays after lb exits.
    Attach {
        /// Interface to attach to.
        iface: String,
        /// XDP mode.
        #[arg(long, value_enum, default_value_t = Mode::Auto)]
        mode: Mode,
        /// One-liner: make a TCP service on this address (the talk's LB).
        #[arg(long = "lb", value_name = "IP", requires = "backends")]
        lb: Option<IpAddr>,
        /// Accepted for compatibility with the talk's CLI: every client is balanced.
        #[arg(long, value_name = "IP", requires = "lb")]
        client: Option<IpAddr>,
        /// One-liner: the service's backends (repeat); they take the client's port.
        #[arg(long = "backend", value_name = "IP", requires = "lb")]
        backends: Vec<IpAddr>,
        /// One-liner: the service's port [every port].
        #[arg(long, value_name = "PORT", requires = "lb", value_parser = clap::value_parser!(u16).range(1..))]
        port: Option<u16>,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// Detach from IFACE and remove the pins; refuses programs lb did not attach.
    Detach {
        /// Interface to detach from.
        iface: String,
    },
    /// Show what is attached where, with settings and counters.
    Status,
    /// Add or remove services.
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Add, remove or re-weight backends.
    #[command(subcommand)]
    Backend(BackendCmd),
    /// List services and their backends.
    List,
    /// List tracked connections (all, or those every filter given matches).
    Conntrack {
        /// Only this client (ADDR or ADDR:PORT; IPv6 with a port: [ADDR]:PORT).
        #[arg(long, value_name = "ADDR[:PORT]", value_parser = parse_vip)]
        client: Option<(IpAddr, Option<u16>)>,
        /// Only connections to this VIP (ADDR or ADDR:PORT).
        #[arg(long, value_name = "ADDR[:PORT]", value_parser = parse_vip)]
        vip: Option<(IpAddr, Option<u16>)>,
        /// Only connections to this backend (ADDR or ADDR:PORT).
        #[arg(long, value_name = "ADDR[:PORT]", value_parser = parse_vip)]
        backend: Option<(IpAddr, Option<u16>)>,
        /// Only connections in this state: half-open, replied, open,
        /// half-closed, closing or expired.
        #[arg(long, value_name = "STATE", value_parser = parse_conn_state)]
        state: Option<&'static str>,
        /// Print how many there are, not the connections.
        #[arg(long)]
        count: bool,
        /// Delete the connections the filters select (at least one filter;
        /// a live connection breaks) and print how many went.
        #[arg(long, conflicts_with = "count")]
        delete: bool,
    },
    /// Traffic per service and backend, and drops and passes by reason.
    Stats {
        /// Print rates every --interval seconds.
        #[arg(long, conflicts_with = "json")]
        watch: bool,
        /// Seconds between --watch reports.
        #[arg(long, default_value_t = 1.0, requires = "watch")]
        interval: f64,
        /// Stop --watch after N reports.
        #[arg(long, value_name = "N", requires = "watch")]
        count: Option<u32>,
    },
    /// Print what the datapath does with each packet, live (one line or
    /// JSON object a packet; until --count, --duration or Ctrl-C).
    Trace {
        /// Only packets to or from this VIP (ADDR or ADDR:PORT).
        #[arg(long, value_name = "ADDR[:PORT]", value_parser = parse_vip)]
        vip: Option<(std::net::IpAddr, Option<u16>)>,
        /// Only packets from or to this client address.
        #[arg(long, value_name = "ADDR")]
        client: Option<std::net::IpAddr>,
        /// Only packets to or from this backend address.
        #[arg(long, value_name = "ADDR")]
        backend: Option<std::net::IpAddr>,
        /// Only packets counted under this counter (see `lb stats`).
        #[arg(long, value_name = "COUNTER")]
        reason: Option<String>,
        /// Only packets with this verdict: pass, drop, tx, redirect, aborted.
        #[arg(long, value_name = "VERDICT")]
        verdict: Option<String>,
        /// Only packets that made (or reopened) a flow.
        #[arg(long)]
        new_flows_only: bool,
        /// Trace one packet in N (the datapath samples).
        #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        sample: u32,
        /// Stop after printing N packets.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// Stop after SECONDS.
        #[arg(long, value_name = "SECONDS")]
        duration: Option<f64>,
    },
    /// Apply a configuration file (see README, "Configuration file"): print
    /// the changes, then make them all or none.
    Apply {
        /// The TOML file.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        /// Print the changes only.
        #[arg(long)]
        dry_run: bool,
        /// This node's SNAT addresses, in place of the file's settings.snat.
        #[arg(long, value_name = "ADDR[,ADDR...]", value_parser = parse_snat)]
        snat: Option<Addrs>,
    },
    /// Run in the foreground: apply FILE, health-check backends, reload on
    /// SIGHUP, stop on SIGTERM (the datapath stays attached).
    Run {
        /// The TOML file.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        /// Serve Prometheus metrics on ADDR (IP:PORT, in the LB's namespace).
        #[arg(long, value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
        /// This node's SNAT addresses, in place of the file's settings.snat
        /// (every node runs the same file; in full NAT each needs its own).
        #[arg(long, value_name = "ADDR[,ADDR...]", value_parser = parse_snat)]
        snat: Option<Addrs>,
    },
    /// On a backend of an IPIP service: attach to IFACE (or --detach) the
    /// XDP program that removes the outer header of IP-in-IP packets and
    /// hands the client's packet to the kernel; --stats: its counters.
    /// Pinned under --pin-dir [/sys/fs/bpf/lb-decap], apart from lb's.
    Decap {
        /// Interface to decapsulate on.
        #[arg(required_unless_present = "stats", conflicts_with = "stats")]
        iface: Option<String>,
        /// XDP mode.
        #[arg(long, value_enum, default_value_t = Mode::Auto)]
        mode: Mode,
        /// Detach from IFACE and remove its pins instead.
        #[arg(long)]
        detach: bool,
        /// Print the counters: decapsulated, passed (not IPIP, fragment,
        /// malformed).
        #[arg(long, conflicts_with = "detach")]
        stats: bool,
    },
    /// Test-topology helper: attach (or --remove) an XDP program that passes
    /// everything, as the peer of a veth needs for XDP_TX in native mode.
    #[command(hide = true)]
    PeerPass {
        /// Interface.
        iface: String,
        /// Remove instead of attach.
        #[arg(long)]
        remove: bool,
        /// XDP mode.
        #[arg(long, value_enum, default_value_t = Mode::Native)]
        mode: Mode,
    },
}

/// `lb service ...`
#[derive(Debug, Subcommand)]
pub enum ServiceCmd {
    /// Add a service (it takes flows once it has backends).
    Add {
        #[command(flatten)]
        svc: SvcArg,
        /// Forwarding mode.
        #[arg(long, value_enum, default_value_t = FwdMode::Nat)]
        mode: FwdMode,
        /// How a backend is picked for a new flow.
        #[arg(long, value_enum, default_value_t = Scheduler::Maglev)]
        scheduler: Scheduler,
        /// client-ip: every connection of a client address to one backend.
        #[arg(long, value_enum, default_value_t = Affinity::None)]
        affinity: Affinity,
        /// With client-ip affinity: seconds a client keeps the backend of
        /// its last new connection, even if the backends change (as IPVS
        /// -p) [none: the hash of the client address alone].
        #[arg(long, value_name = "S")]
        affinity_timeout: Option<u32>,
    },
    /// Remove a service, its backends and their flows.
    Del {
        #[command(flatten)]
        svc: SvcArg,
    },
}

/// `lb backend ...`
#[derive(Debug, Subcommand)]
pub enum BackendCmd {
    /// Add a backend to a service.
    Add {
        #[command(flatten)]
        svc: SvcArg,
        /// The backend, IP:PORT.
        #[arg(value_name = "IP:PORT")]
        addr: SocketAddr,
        /// Weight, 0..=10000 (0: drain).
        #[arg(long, default_value_t = 1)]
        weight: u32,
    },
    /// Remove a backend: no new flows, its flows end.
    Del {
        #[command(flatten)]
        svc: SvcArg,
        /// The backend, IP:PORT.
        #[arg(value_name = "IP:PORT")]
        addr: SocketAddr,
    },
    /// Change a backend's weight (0: drain, existing flows continue).
    Set {
        #[command(flatten)]
        svc: SvcArg,
        /// The backend, IP:PORT.
        #[arg(value_name = "IP:PORT")]
        addr: SocketAddr,
        /// Weight, 0..=10000.
        #[arg(long)]
        weight: u32,
    },
    /// Drain a backend: `backend set --weight 0`.
    Drain {
        #[command(flatten)]
        svc: SvcArg,
        /// The backend, IP:PORT.
        #[arg(value_name = "IP:PORT")]
        addr: SocketAddr,
    },
}

fn prepare(place: &Place) -> Result<(Option<netns::NetnsGuard>, PinDir)> {
    net::require_root()?;
    bpffs::ensure_mounted(&place.pin_dir)?;
    let guard = netns::enter_opt(place.netns.as_deref())?;
    Ok((guard, PinDir::new(&place.pin_dir)))
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(v).context("encoding JSON")?
    );
    Ok(())
}

/// `ADDR` or `ADDR:PORT` (`[v6]:PORT`).
fn parse_vip(s: &str) -> Result<(std::net::IpAddr, Option<u16>), String> {
    if let Ok(a) = s.parse::<std::net::SocketAddr>() {
        return Ok((a.ip(), Some(a.port())));
    }
    s.parse::<std::net::IpAddr>()
        .map(|ip| (ip, None))
        .map_err(|_| format!("'{s}' is not an address or address:port"))
}

fn parse_conn_state(s: &str) -> Result<&'static str, String> {
    conntrack::STATES
        .iter()
        .find(|&&st| st == s)
        .copied()
        .ok_or_else(|| format!("'{s}' is not a state ({})", conntrack::STATES.join(", ")))
}

/// Whether `a` is `want` (an address, and the port if one is given).
fn addr_is(a: &SocketAddr, want: &Option<(IpAddr, Option<u16>)>) -> bool {
    want.is_none_or(|(ip, port)| a.ip() == ip && port.is_none_or(|p| a.port() == p))
}

/// Runs a parsed command, printing its result to stdout.
pub fn run(cli: Cli) -> Result<()> {
    let Cli {
        place,
        json,
        command,
    } = cli;
    let out = Out { json };
    match command {
        Command::Attach {
            iface,
            mode,
            lb,
            client,
            backends,
            port,
            settings,
        } => {
            let one_liner = lb.map(|lb| {
                (
                    Service::new(SocketAddr::new(lb, port.unwrap_or(0)), Proto::Tcp),
                    backends,
                )
            });
            let edits: Vec<Edit> = one_liner
                .iter()
                .map(|(svc, bes)| {
                    Edit::Backends(*svc, bes.iter().map(|b| SocketAddr::new(*b, 0)).collect())
                })
                .collect();
            if let Some((svc, bes)) = &one_liner {
                check_one_liner(svc, client, bes)?;
            }
            for e in &edits {
                e.check()?;
            }
            let (_ns, pins) = prepare(&place)?;
            let _lock = lock(&pins)?;
            let base = loader::instance_settings(&pins)?.unwrap_or_default();
            let target = Target {
                settings: settings.apply(base),
                interfaces: vec![config::Iface {
                    name: iface.clone(),
                    mode,
                    at: String::new(),
                }],
                reattach: true,
                ..Target::edits(edits)
            };
            let plan = reconcile::plan(&target, &pins)?;
            let done = reconcile::apply(&plan, &pins)?;
            if out.json {
                let a = done.attachments.first();
                let mut v = serde_json::to_value(a).context("encoding JSON")?;
                let rest: Vec<Change> = plan
                    .changes
                    .iter()
                    .filter(|c| !matches!(c, Change::Attach(_)))
                    .cloned()
                    .collect();
                if let Some(m) = v.as_object_mut() {
                    m.insert("changes".into(), output::changes(&rest, Some(&done.loaded)));
                }
                return print_json(&v);
            }
            for a in &done.attachments {
                print_attachment(a);
            }
            if let Some((svc, bes)) = one_liner {
                let list: Vec<String> = bes.iter().map(|b| b.to_string()).collect();
                println!("service {svc} -> {}", list.join(", "));
            }
        }
        Command::Detach { iface } => {
            let (_ns, pins) = prepare(&place)?;
            let _lock = lock(&pins)?;
            let mut removed = loader::detach(&iface, &pins)?;
            // The instance is gone with its last interface: its VIPs stop
            // being announced (lb run's [announce]).
            if !pins.map("conntrack").exists() {
                removed.extend(
                    crate::announce::withdraw_all()?
                        .into_iter()
                        .map(|a| format!("announced VIP {a}")),
                );
            }
            if out.json {
                return print_json(&serde_json::json!({"iface": iface, "removed": removed}));
            }
            println!("detached lb from {iface}");
            for r in removed {
                println!("removed {r}");
            }
        }
        Command::Status => {
            let (_ns, pins) = prepare(&place)?;
            let s = loader::status(&pins)?;
            if out.json {
                print_json(&s)?;
            } else {
                print_status(&s);
            }
        }
        Command::Service(cmd) => {
            let edit = match &cmd {
                ServiceCmd::Add {
                    svc,
                    mode,
                    scheduler,
                    affinity,
                    affinity_timeout,
                } => Edit::AddService(
                    svc.service(),
                    SvcConf {
                        mode: *mode,
                        scheduler: *scheduler,
                        affinity: *affinity,
                        affinity_timeout: *affinity_timeout,
                    },
                ),
                ServiceCmd::Del { svc } => Edit::DelService(svc.service()),
            };
            edit.check()?;
            let (_ns, pins) = prepare(&place)?;
            let (changes, done) = edit_instance(&pins, edit.clone())?;
            if out.json {
                return out.changes(&changes, &done);
            }
            match edit {
                Edit::AddService(svc, _) => {
                    let id = done.loaded.services[&svc].id;
                    println!("added service {svc} (id {id})");
                }
                Edit::DelService(svc) => println!("removed service {svc}"),
                _ => unreachable!("a service edit"),
            }
        }
        Command::Backend(cmd) => {
            let edit = match &cmd {
                BackendCmd::Add { svc, addr, weight } => {
                    Edit::AddBackend(svc.service(), *addr, *weight)
                }
                BackendCmd::Del { svc, addr } => Edit::DelBackend(svc.service(), *addr),
                BackendCmd::Set { svc, addr, weight } => {
                    Edit::SetWeight(svc.service(), *addr, *weight)
                }
                BackendCmd::Drain { svc, addr } => Edit::SetWeight(svc.service(), *addr, 0),
            };
            edit.check()?;
            let (_ns, pins) = prepare(&place)?;
            let (changes, done) = edit_instance(&pins, edit.clone())?;
            if out.json {
                return out.changes(&changes, &done);
            }
            match edit {
                Edit::AddBackend(svc, addr, weight) => {
                    let id = done.loaded.backend_id(&svc, addr).unwrap_or_default();
                    println!("added backend {addr} (id {id}, weight {weight}) to {svc}");
                }
                Edit::DelBackend(svc, addr) => {
                    println!("removed backend {addr} from {svc} and ended its flows")
                }
                Edit::SetWeight(svc, addr, weight) => {
                    println!("backend {addr} of {svc} now has weight {weight}")
                }
                _ => unreachable!("a backend edit"),
            }
        }
        Command::Apply {
            file,
            dry_run,
            snat,
        } => {
            let (_ns, pins) = prepare(&place)?;
            let mut cfg = config::load(&file)?;
            if let Some(a) = snat {
                cfg = cfg.with_snat(&a.0)?;
            }
            let target = cfg.target(&Default::default());
            // A dry run reads only: no lock, nothing made.
            let _lock = if dry_run { None } else { Some(lock(&pins)?) };
            let plan = reconcile::plan(&target, &pins)?;
            let done = if !dry_run && !plan.changes.is_empty() {
                Some(reconcile::apply(&plan, &pins)?)
            } else {
                None
            };
            if out.json {
                return print_json(&serde_json::json!({
                    "file": file.display().to_string(),
                    "dry_run": dry_run,
                    "applied": done.is_some(),
                    "changes": output::changes(&plan.changes, done.as_ref().map(|d| &d.loaded)),
                }));
            }
            if plan.changes.is_empty() {
                println!("no changes");
            }
            for c in &plan.changes {
                println!("{c}");
            }
            if done.is_some() {
                println!("applied {} changes", plan.changes.len());
            }
        }
        Command::Run {
            file,
            metrics,
            snat,
        } => {
            if out.json {
                bail!("lb run has no JSON output (it logs to stderr)");
            }
            net::require_root()?;
            bpffs::ensure_mounted(&place.pin_dir)?;
            daemon::run(&daemon::Options {
                file,
                netns: place.netns.clone(),
                pin_dir: place.pin_dir.clone(),
                metrics,
                snat: snat.map(|a| a.0),
            })?;
        }
        Command::List => {
            let (_ns, pins) = prepare(&place)?;
            let list = service::list(&Maps::open(&pins)?)?;
            if out.json {
                print_json(&list)?;
            } else {
                for s in &list {
                    let timeout = s
                        .conf
                        .affinity_timeout
                        .map(|t| format!(" timeout {t}s"))
                        .unwrap_or_default();
                    println!(
                        "{} (id {}, mode {}, scheduler {}, affinity {}{timeout})",
                        s.service, s.id, s.conf.mode, s.conf.scheduler, s.conf.affinity
                    );
                    for b in &s.backends {
                        println!("  {:<21} weight {:<5} id {}", b.shown(), b.weight, b.id);
                    }
                }
            }
        }
        Command::Conntrack {
            client,
            vip,
            backend,
            state,
            count,
            delete,
        } => {
            if delete && client.is_none() && vip.is_none() && backend.is_none() && state.is_none() {
                bail!("--delete needs a filter (--client, --vip, --backend or --state) to say which connections");
            }
            let (_ns, pins) = prepare(&place)?;
            let _lock = if delete { Some(lock(&pins)?) } else { None };
            let m = Maps::open(&pins)?;
            let mut conns = conntrack::list(&m)?;
            conns.retain(|c| {
                addr_is(&c.client, &client)
                    && addr_is(&c.vip, &vip)
                    && addr_is(&c.backend, &backend)
                    && state.is_none_or(|s| c.state == s)
            });
            if delete {
                let entries = conntrack::delete(&m, &conns)?;
                if out.json {
                    print_json(&serde_json::json!({ "deleted": conns.len(), "entries": entries }))?;
                } else {
                    println!("deleted {} connections ({entries} entries)", conns.len());
                }
            } else if count {
                if out.json {
                    print_json(&serde_json::json!({ "count": conns.len() }))?;
                } else {
                    println!("{}", conns.len());
                }
            } else if out.json {
                print_json(&conns)?;
            } else {
                println!(
                    "{:<5} {:<21} {:<21} {:<21} {:<21} {:<8} {:>6} {:>6}",
                    "proto", "client", "vip", "backend", "nat", "state", "age", "idle"
                );
                for c in &conns {
                    println!(
                        "{:<5} {:<21} {:<21} {:<21} {:<21} {:<8} {:>5}s {:>5}s",
                        c.proto,
                        c.client.to_string(),
                        c.vip.to_string(),
                        c.backend.to_string(),
                        c.nat.to_string(),
                        c.state,
                        c.age_s,
                        c.idle_s
                    );
                }
            }
        }
        Command::Stats {
            watch,
            interval,
            count,
        } => {
            let (_ns, pins) = prepare(&place)?;
            if watch {
                if !(0.05..=3600.0).contains(&interval) {
                    bail!("--interval {interval} out of range 0.05..=3600");
                }
                let m = Maps::open(&pins)?;
                let d = std::time::Duration::from_secs_f64(interval);
                return crate::watch::watch(&m, d, count, &mut std::io::stdout());
            }
            let r = stats::report(&Maps::open(&pins)?)?;
            if out.json {
                print_json(&r)?;
            } else {
                print_report(&r);
            }
        }
        Command::Trace {
            vip,
            client,
            backend,
            reason,
            verdict,
            new_flows_only,
            sample,
            count,
            duration,
        } => {
            let duration = match duration {
                Some(d) if !(d > 0.0 && d <= 86_400.0) => {
                    bail!("--duration {d} out of range (0, 86400] seconds")
                }
                d => d.map(std::time::Duration::from_secs_f64),
            };
            let (_ns, pins) = prepare(&place)?;
            let filter = crate::trace::Filter {
                vip,
                client,
                backend,
                reason,
                verdict,
                new_flows_only,
            };
            let bounds = crate::trace::Bounds {
                sample,
                count,
                duration,
            };
            let (_, lost) =
                crate::trace::run(&pins, &filter, bounds, out.json, &mut std::io::stdout())?;
            if lost > 0 {
                eprintln!("lb: {lost} packets not traced: the ring buffer was full (try --sample)");
            }
        }
        Command::Decap {
            iface,
            mode,
            detach,
            stats,
        } => return decap(&place, out, iface, mode, detach, stats),
        Command::PeerPass {
            iface,
            remove,
            mode,
        } => {
            let (_ns, _) = prepare(&place)?;
            if remove {
                loader::pass_detach(&iface, mode)?;
                println!("removed the pass program from {iface}");
            } else {
                let id = loader::pass_attach(&iface, mode)?;
                println!("attached the pass program to {iface}: program id {id}");
            }
        }
    }
    Ok(())
}

/// `lb decap`: attach, detach or show the counters of the decapsulation
/// program. Its pins default to their own directory, not lb's.
fn decap(
    place: &Place,
    out: Out,
    iface: Option<String>,
    mode: Mode,
    detach: bool,
    stats: bool,
) -> Result<()> {
    let dir = if place.pin_dir == std::path::Path::new(bpffs::DEFAULT_PIN_DIR) {
        PathBuf::from(crate::decap::DEFAULT_PIN_DIR)
    } else {
        place.pin_dir.clone()
    };
    net::require_root()?;
    bpffs::ensure_mounted(&dir)?;
    let _ns = netns::enter_opt(place.netns.as_deref())?;
    let pins = PinDir::new(&dir);
    if stats {
        let c = crate::decap::stats(&pins)?;
        if out.json {
            return print_json(
                &serde_json::json!({"pin_dir": dir.display().to_string(), "counters": crate::output::Counters(&c)}),
            );
        }
        print_counters(&c);
        return Ok(());
    }
    let iface = iface.expect("clap requires IFACE without --stats");
    if detach {
        let removed = crate::decap::detach(&iface, &pins)?;
        if out.json {
            return print_json(&serde_json::json!({"iface": iface, "removed": removed}));
        }
        println!("detached lb decap from {iface}");
        for r in removed {
            println!("removed {r}");
        }
        return Ok(());
    }
    let a = crate::decap::attach(&iface, mode, &pins)?;
    if out.json {
        return print_json(&a);
    }
    let verb = if a.replaced {
        "replaced the decap program on"
    } else {
        "decapsulating IP-in-IP on"
    };
    println!(
        "{verb} {} (ifindex {}): program id {}, {} mode",
        a.iface, a.ifindex, a.prog_id, a.mode
    );
    println!("pinned under {}: link {}", dir.display(), a.link_pin);
    Ok(())
}

/// How to print.
struct Out {
    json: bool,
}

impl Out {
    /// `{"changes": [...]}`, with the ids given.
    fn changes(&self, changes: &[Change], done: &Applied) -> Result<()> {
        print_json(&serde_json::json!({
            "changes": output::changes(changes, Some(&done.loaded)),
        }))
    }
}

fn print_attachment(a: &loader::Attachment) {
    let verb = if a.replaced {
        "replaced the lb program on"
    } else {
        "attached to"
    };
    println!(
        "{verb} {} (ifindex {}): program id {}, {} mode",
        a.iface, a.ifindex, a.prog_id, a.mode
    );
    for s in &a.sysctls {
        println!("set {s}");
    }
    let kept = if a.reused_maps {
        " (existing maps and flows kept)"
    } else {
        ""
    };
    println!("pinned under {}{kept}: link {}", a.pin_dir, a.link_pin);
}

/// What the one-liner's edit cannot say: a backend twice, the LB's address
/// as a backend, a client of the other family ([`Edit::check`] checks the
/// service's and backends' addresses).
fn check_one_liner(svc: &Service, client: Option<IpAddr>, backends: &[IpAddr]) -> Result<()> {
    if let Some(c) = client.filter(|c| c.is_ipv6() != svc.vip.is_ipv6()) {
        bail!(
            "--client {c} and --lb {} are of two families: a service's clients are of its own",
            svc.vip
        );
    }
    let mut seen = std::collections::HashSet::new();
    for b in backends {
        if !seen.insert(b) {
            bail!("backend {b} is given twice");
        }
        if *b == svc.vip {
            bail!("backend {b} is also the LB address");
        }
    }
    Ok(())
}

/// Takes the lock of the instance at `pins` for a command that changes it;
/// says so on stderr if it has to wait.
fn lock(pins: &PinDir) -> Result<InstanceLock> {
    InstanceLock::acquire(pins, lock::wait_from_env(), |l| eprintln!("lb: {l}"))
}

/// One edit of the services of the instance at `pins`, under its lock:
/// the changes made, and what is loaded after.
fn edit_instance(pins: &PinDir, edit: Edit) -> Result<(Vec<Change>, Applied)> {
    let _lock = lock(pins)?;
    let plan = reconcile::plan(&Target::edits(vec![edit]), pins)?;
    let done = reconcile::apply(&plan, pins)?;
    Ok((plan.changes, done))
}

fn print_status(s: &loader::Status) {
    if s.interfaces.is_empty() {
        println!("nothing attached (pin directory {})", s.pin_dir);
    }
    for i in &s.interfaces {
        println!(
            "{}: ifindex {}, program id {}, link id {}, {} mode",
            i.iface, i.ifindex, i.prog_id, i.link_id, i.mode
        );
    }
    if let Some(st) = &s.settings {
        println!(
            "settings: NAT ports {}, Maglev size {}, max flows {} (half-open {}), timeouts tcp {}s udp {}s fin {}s, handshake latency {}",
            settings::ports_string(&st.nat_ports), st.maglev_size, st.max_flows, st.max_half_open, st.tcp_timeout, st.udp_timeout, st.fin_timeout, settings::on_off(st.handshake_latency)
        );
        for a in &s.snat {
            println!("snat: {} ({})", a.addr, a.ports);
        }
    }
    for svc in &s.services {
        let b: Vec<String> = svc
            .backends
            .iter()
            .map(|b| format!("{} (w{})", b.shown(), b.weight))
            .collect();
        println!("service {} -> {}", svc.service, b.join(", "));
    }
    print_counters(&s.counters);
}

fn print_counters(c: &[(String, stats::Counter)]) {
    // The column as wide as the longest name.
    let w = c.iter().map(|(n, _)| n.len()).max().unwrap_or(0).max(16);
    if !c.is_empty() {
        println!("{:<w$} {:>12} {:>14}", "counter", "packets", "bytes");
        for (name, c) in c {
            println!("{name:<w$} {:>12} {:>14}", c.packets, c.bytes);
        }
    }
}

fn print_report(r: &stats::Report) {
    println!(
        "{:<28} {:>10} {:>12} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7}",
        "service / backend",
        "packets",
        "bytes",
        "new",
        "active",
        "handshk",
        "mean_ms",
        "p50_ms",
        "p99_ms",
        "resets",
        "unansw"
    );
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.3}", v * 1e3));
    for s in &r.services {
        let t = &s.traffic;
        println!(
            "{:<28} {:>10} {:>12} {:>9} {:>8}",
            s.service.to_string(),
            t.packets,
            t.bytes,
            t.new_flows,
            t.active_flows
        );
        for b in &s.backends {
            let t = &b.traffic;
            let h = &b.handshake;
            println!(
                "  {:<26} {:>10} {:>12} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7}",
                b.backend.shown(),
                t.packets,
                t.bytes,
                t.new_flows,
                t.active_flows,
                h.count(),
                ms(h.mean_s()),
                ms(h.quantile_s(0.5)),
                ms(h.quantile_s(0.99)),
                b.resets,
                b.unanswered_syns
            );
        }
    }
    print_counters(&r.counters);
    print_tables(&r.tables);
}

/// One line: each table's entries of its capacity (IPv6 ones only if used).
fn print_tables(tables: &[conntrack::TableUse]) {
    let shown: Vec<String> = tables
        .iter()
        .filter(|t| !t.table.ends_with('6') || t.entries > 0)
        .map(|t| {
            let pct = 100.0 * t.entries as f64 / t.capacity.max(1) as f64;
            format!("{} {}/{} ({pct:.1}%)", t.table, t.entries, t.capacity)
        })
        .collect();
    if !shown.is_empty() {
        println!("tables: {}", shown.join(", "));
    }
}
