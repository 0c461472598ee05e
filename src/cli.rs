//! Command line: argument parsing and output. The work is done by the
//! library modules; this one only turns results into text or JSON.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::bpffs::{self, PinDir};
use crate::config::Config;
use crate::xdp::Mode;
use crate::{loader, net, netns};

/// An XDP layer-4 load balancer.
#[derive(Debug, Parser)]
#[command(name = "lb", version, about)]
pub struct Cli {
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

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load, attach to IFACE and pin; the program stays after lb exits.
    Attach {
        /// Interface to attach to.
        iface: String,
        /// The LB's address (clients connect to it).
        #[arg(long = "lb", value_name = "IP")]
        lb: Ipv4Addr,
        /// The client whose connections are balanced.
        #[arg(long, value_name = "IP")]
        client: Ipv4Addr,
        /// A backend (repeat for each, up to 16).
        #[arg(long = "backend", value_name = "IP", required = true)]
        backends: Vec<Ipv4Addr>,
        /// Balance only this TCP port (default: every port).
        #[arg(long, value_name = "PORT")]
        port: Option<u16>,
        /// XDP mode.
        #[arg(long, value_enum, default_value_t = Mode::Auto)]
        mode: Mode,
        #[command(flatten)]
        place: Place,
    },
    /// Detach from IFACE and remove the pins; refuses programs lb did not attach.
    Detach {
        /// Interface to detach from.
        iface: String,
        #[command(flatten)]
        place: Place,
    },
    /// Show what is attached where, with the counters.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        place: Place,
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
        #[command(flatten)]
        place: Place,
    },
}

fn prepare(place: &Place) -> Result<(Option<netns::NetnsGuard>, PinDir)> {
    net::require_root()?;
    bpffs::ensure_mounted(&place.pin_dir)?;
    let guard = netns::enter_opt(place.netns.as_deref())?;
    Ok((guard, PinDir::new(&place.pin_dir)))
}

/// Runs a parsed command, printing its result to stdout.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Attach {
            iface,
            lb,
            client,
            backends,
            port,
            mode,
            place,
        } => {
            let cfg = Config {
                lb,
                client,
                backends,
                port,
            };
            cfg.validate()?;
            let (_ns, pins) = prepare(&place)?;
            let a = loader::attach(&iface, &cfg, mode, &pins)?;
            let verb = if a.replaced {
                "replaced the lb program on"
            } else {
                "attached to"
            };
            println!(
                "{verb} {} (ifindex {}): program id {}, {} mode",
                a.iface, a.ifindex, a.prog_id, a.mode
            );
            if a.enabled_forwarding {
                println!(
                    "enabled IPv4 forwarding on {} (bpf_fib_lookup needs it)",
                    a.iface
                );
            }
            println!("pinned link:   {}", a.link_pin);
            println!("pinned stats:  {}", a.stats_pin);
            println!("pinned config: {}", a.config_pin);
            for u in &a.unresolved {
                eprintln!("warning: no MAC known yet for {u}; its packets go to the kernel until it resolves");
            }
        }
        Command::Detach { iface, place } => {
            let (_ns, pins) = prepare(&place)?;
            let removed = loader::detach(&iface, &pins)?;
            println!("detached lb from {iface}");
            for r in removed {
                println!("removed {r}");
            }
        }
        Command::Status { json, place } => {
            let (_ns, pins) = prepare(&place)?;
            let s = loader::status(&pins)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&s).context("encoding JSON")?
                );
            } else {
                print_status(&s);
            }
        }
        Command::PeerPass {
            iface,
            remove,
            mode,
            place,
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

fn print_status(s: &loader::Status) {
    if s.interfaces.is_empty() {
        println!("nothing attached (pin directory {})", s.pin_dir);
    }
    for i in &s.interfaces {
        let c = &i.config;
        let port = c
            .port
            .map_or("every port".to_string(), |p| format!("port {p}"));
        let backends: Vec<String> = c.backends.iter().map(|b| b.to_string()).collect();
        println!(
            "{}: ifindex {}, program id {}, link id {}, {} mode",
            i.iface, i.ifindex, i.prog_id, i.link_id, i.mode
        );
        println!(
            "  lb {}  client {}  backends {}  ({port})",
            c.lb,
            c.client,
            backends.join(", ")
        );
    }
    if !s.counters.is_empty() {
        println!("{:<16} {:>12} {:>14}", "counter", "packets", "bytes");
        for (name, c) in &s.counters {
            println!("{name:<16} {:>12} {:>14}", c.packets, c.bytes);
        }
    }
}
