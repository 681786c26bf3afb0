//! Integration tests on the real kernel (run as root): one test binary, one module per area.

#![deny(clippy::undocumented_unsafe_blocks)]

mod alerts;
mod audit;
mod bench_smoke;
mod daemon;
mod events;
mod faults;
mod holders;
mod identity;
mod image;
mod inventory;
mod lab;
mod listener;
mod package;
mod rig;
mod soak;
mod stuck;
mod support;
mod sweep;
