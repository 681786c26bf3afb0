//! The binary's side of sockmap-gc, on top of the engine (the `sockmap_gc` library): the
//! command line ([`cli`]), the daemon ([`daemon`]) with its config file ([`config`]) and
//! its Prometheus metrics ([`metrics`]).

pub mod cli;
pub mod config;
pub mod daemon;
pub mod metrics;
