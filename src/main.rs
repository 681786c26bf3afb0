//! The `sockmap-gc` binary: parses flags, runs the subcommand, maps the outcome to an exit code.
//! The command line, the daemon, its config and its metrics live in [`cmd`]; the engine is
//! the `sockmap_gc` library.

#![deny(clippy::undocumented_unsafe_blocks)]

mod cmd;

use std::process::ExitCode;

use clap::Parser;
use cmd::cli::{self, Cli};
use cmd::config::LogFormat;

fn main() -> ExitCode {
    one_malloc_arena();
    let cli = Cli::parse();
    // The daemon picks its log format from its config file and sets logging up itself.
    if !matches!(cli.command, cli::Command::Daemon(_)) {
        LogFormat::Plain.install();
    }
    match cli::run(cli) {
        Ok(outcome) => ExitCode::from(outcome.code()),
        Err(e) => {
            eprintln!("sockmap-gc: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Keeps freed memory from staying resident. glibc gives every thread that allocates its
/// own arena, whose freed pages stay with the process (the namespace workers are short-lived
/// threads), and after the first large block is freed it serves later large blocks from the
/// heap, which it seldom gives back. A full map's tables are a few large blocks allocated and
/// freed once per observation: with one arena and large blocks always mapped and unmapped,
/// a sweep's peak RSS fell by about a fifth. Allocation is not where the time goes.
#[cfg(target_env = "gnu")]
fn one_malloc_arena() {
    // SAFETY: mallopt only changes the allocator's settings; it runs first in main, before
    // any other thread exists. A refusal (0) leaves the default, which is only costlier.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

#[cfg(not(target_env = "gnu"))]
fn one_malloc_arena() {}
