//! sockmap-gc: finds and removes stale entries of Cilium's socket-acceleration sockhash.
//!
//! This library is the engine; the `sockmap-gc` binary (`src/main.rs`, `src/cmd/`) puts the
//! command line, the daemon, its config file and its metrics on top of it. The engine is a
//! pipeline, one module a stage: snapshot the map ([`map`], or [`identity`] with the socket
//! behind each entry) → inventory live sockets ([`socket`]) in every network namespace
//! ([`netns`] finds them and enters each on a worker thread; [`diag`] dumps each one, or, with
//! identity, [`lookup`] asks for the tuples that matter; both speak sock_diag through
//! [`netlink`]) → judge ([`verdict`], pure) → name who keeps each stale entry ([`holder`],
//! only when there are stale entries) → guard ([`guard`], pure) → delete ([`sweep`],
//! deciding through [`deletion`], pure) → report ([`report`]). [`observe`] runs one
//! observation through the first stages into the plain data of [`observation`]; [`pass`] is
//! the daemon's continuous pass, one iterator read judged and deleted through the same guards.

#![deny(clippy::undocumented_unsafe_blocks)]

mod helper_thread;
mod label;

pub mod clock;
pub mod deletion;
pub mod diag;
pub mod events;
pub mod guard;
pub mod holder;
pub mod identity;
pub mod ifaddr;
pub mod key;
pub mod lookup;
pub mod map;
pub mod netlink;
pub mod netns;
pub mod observation;
pub mod observe;
pub mod pass;
pub mod procnet;
pub mod react;
pub mod report;
pub mod socket;
pub mod sweep;
pub mod verdict;
