//! The `sockmap-gc` binary: parses flags, runs the subcommand, maps the outcome to an exit code.

use std::process::ExitCode;

use clap::Parser;
use sockmap_gc::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match cli::run(cli) {
        Ok(outcome) => ExitCode::from(outcome.code()),
        Err(e) => {
            eprintln!("sockmap-gc: {e:#}");
            ExitCode::from(2)
        }
    }
}
