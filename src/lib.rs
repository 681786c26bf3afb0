//! sockmap-gc: finds and removes stale entries of Cilium's socket-acceleration sockhash.
//!
//! This library is the engine; the `sockmap-gc` binary (`src/main.rs`, `src/cmd/`) puts the
//! command line, the daemon, its config file and its metrics on top of it. The engine is a
//! pipeline, one module a stage: snapshot the map ([`map`], or [`identity`] with the socket
//! behind each entry) → inventory live sockets in every network namespace ([`netns`],
//! [`diag`]; with identity, exact lookups of the tuples that matter, [`lookup`]) → judge
//! ([`verdict`], pure) → guard ([`guard`], pure) → delete ([`sweep`], deciding through
//! [`deletion`], pure) → report ([`report`]). [`observe`] runs one observation through the
//! first stages into the plain data of [`observation`].

mod label;

pub mod deletion;
pub mod diag;
pub mod guard;
pub mod identity;
pub mod key;
pub mod lookup;
pub mod map;
pub mod netns;
pub mod observation;
pub mod observe;
pub mod procnet;
pub mod report;
pub mod sweep;
pub mod verdict;
