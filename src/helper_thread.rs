//! A helper thread that may be refused: its work then runs on the calling thread.

use std::thread::{Builder, Scope, ScopedJoinHandle};

/// Starts `work` on a scoped thread named `name`, or `None` when the kernel refuses a thread (a
/// pids limit, memory), where `std::thread::scope`'s own `spawn` would panic. The caller then
/// does the work itself.
pub(crate) fn spawn<'scope, T: Send + 'scope>(
    scope: &'scope Scope<'scope, '_>,
    name: &str,
    work: impl FnOnce() -> T + Send + 'scope,
) -> Option<ScopedJoinHandle<'scope, T>> {
    Builder::new()
        .name(name.into())
        .spawn_scoped(scope, work)
        .map_err(|e| tracing::debug!(error = %e, "no {name} thread: its work runs here"))
        .ok()
}
