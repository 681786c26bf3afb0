//! Integration tests on the real kernel (run as root): one test binary, one module per area.

mod audit;
mod daemon;
mod identity;
mod inventory;
mod lab;
mod package;
mod stuck;
mod support;
mod sweep;
