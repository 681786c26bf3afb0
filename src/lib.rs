//! sockmap-gc: finds and removes stale entries of Cilium's socket-acceleration sockhash.
//!
//! The flow is a pipeline, one module a stage: snapshot the map ([`map`], or [`identity`] with
//! the socket behind each entry) → inventory live sockets in every network namespace
//! ([`netns`], [`diag`]; with identity, exact lookups of the tuples that matter, [`lookup`])
//! → classify ([`verdict`], pure) → guard ([`guard`], pure) → delete ([`sweep`]) → report
//! ([`report`], [`metrics`]). [`audit`] runs one observation through it; [`cli`] is the
//! command line.

pub mod audit;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod diag;
pub mod events;
pub mod guard;
pub mod identity;
pub mod key;
pub mod lookup;
pub mod map;
pub mod metrics;
pub mod netns;
pub mod procnet;
pub mod react;
pub mod report;
pub mod sweep;
pub mod verdict;
