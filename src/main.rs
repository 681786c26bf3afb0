//! The `sockmap-gc` binary: parses flags, runs the subcommand, maps the outcome to an exit code.

use std::process::ExitCode;

use clap::Parser;
use sockmap_gc::cli::{self, Cli};
use sockmap_gc::config::LogFormat;

fn main() -> ExitCode {
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
