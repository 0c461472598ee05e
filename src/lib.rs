//! lb: an XDP layer-4 load balancer. The library behind the `lb` command;
//! the tests use it directly.

pub mod announce;
pub mod bpffs;
pub mod cli;
pub mod clock;
pub mod config;
pub mod conntrack;
pub mod daemon;
pub mod health;
pub mod loader;
pub mod lock;
pub mod maglev;
pub mod maps;
pub mod metrics;
pub mod model;
pub mod net;
pub mod netns;
pub mod output;
pub mod reconcile;
pub mod sched;
pub mod service;
pub mod settings;
pub mod skel;
pub mod stats;
pub mod trace;
pub mod watch;
pub mod xdp;
