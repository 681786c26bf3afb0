//! sockmap-gc: finds and removes stale entries of Cilium's socket-acceleration sockhash.
//!
//! The flow is a pipeline, one module a stage: snapshot the map ([`map`], or [`identity`] with
//! the socket behind each entry) → inventory live sockets ([`socket`]) in every network
//! namespace ([`netns`] finds them and enters each on a worker thread; [`diag`] dumps each
//! one, or, with identity, [`lookup`] asks for the tuples that matter; both speak sock_diag
//! through [`netlink`]) → classify ([`verdict`], pure) → guard ([`guard`], pure) → delete ([`sweep`]) → report
//! ([`report`], [`metrics`]). [`audit`] runs one observation through it; [`cli`] is the
//! command line.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod audit;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod diag;
pub mod guard;
pub mod identity;
pub mod key;
pub mod lookup;
pub mod map;
pub mod metrics;
pub mod netlink;
pub mod netns;
pub mod procnet;
pub mod report;
pub mod socket;
pub mod sweep;
pub mod verdict;
