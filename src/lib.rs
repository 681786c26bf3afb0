//! sockmap-gc: finds and removes stale entries of Cilium's socket-acceleration sockhash.
//!
//! The flow is a pipeline, one module a stage: snapshot the map ([`map`]) → inventory live
//! sockets in every network namespace ([`netns`], [`diag`]) → classify ([`verdict`], pure) →
//! report.

pub mod diag;
pub mod key;
pub mod map;
pub mod netns;
pub mod verdict;
