//! Ctrl-C and SIGTERM for the lab's binaries: the lab is torn down, never left behind.

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::{SigSet, Signal};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether a signal asked the run to stop.
pub fn is_interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// An error once a signal asked the run to stop, so long steps end early.
pub fn check() -> Result<()> {
    if is_interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// On SIGINT/SIGTERM: flag, kill lab `id`'s peers so every wait ends, and let main tear the
/// lab down through its guards; if main is still stuck after `grace`, remove the lab by name
/// and exit. Call before any other thread starts.
pub fn install(id: String, grace: Duration) -> Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    // Blocked before any thread starts, so only the waiter below receives them.
    set.thread_block().context("blocking SIGINT/SIGTERM")?;
    thread::spawn(move || {
        if set.wait().is_ok() {
            eprintln!("\nsignal received: tearing the lab down");
            INTERRUPTED.store(true, Ordering::SeqCst);
            crate::kill_peers(&id);
            thread::sleep(grace);
            let _ = crate::remove_leftovers(&id);
            std::process::exit(130);
        }
    });
    Ok(())
}
