//! sockmap-gc: finds and removes stale entries of Cilium's socket-acceleration sockhash.
//!
//! The flow is a pipeline, one module a stage: snapshot the map ([`map`]) → inventory live
//! sockets in every network namespace ([`netns`], [`diag`]) → classify ([`verdict`], pure)
//! → report ([`report`]). [`audit`] runs one observation through it; [`cli`] is the
//! command line.

pub mod audit;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod diag;
pub mod guard;
pub mod identity;
pub mod key;
pub mod map;
pub mod metrics;
pub mod netns;
pub mod procnet;
pub mod report;
pub mod sweep;
pub mod verdict;
