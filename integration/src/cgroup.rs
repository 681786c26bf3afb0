//! The lab's cgroup v2 directory: the sock_ops program's scope and home of every peer process.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::sys;

/// A cgroup directory the lab made; on drop its processes are killed and it is removed.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    dir: File,
}

impl Cgroup {
    pub fn create(path: &Path) -> Result<Cgroup> {
        fs::create_dir(path).with_context(|| format!("creating cgroup {}", path.display()))?;
        let dir = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Cgroup {
            path: path.to_path_buf(),
            dir,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory fd that sock_ops programs attach to.
    pub fn dir(&self) -> &File {
        &self.dir
    }

    /// `cgroup.procs` opened for writing: a child writes "0" to it to join.
    pub fn procs_for_join(&self) -> Result<File> {
        procs_for_join(&self.path)
    }

    pub fn kill_all(&self) {
        kill_all(&self.path);
    }
}

/// `cgroup.procs` of the cgroup at `path`, opened for writing.
pub fn procs_for_join(path: &Path) -> Result<File> {
    let p = path.join("cgroup.procs");
    OpenOptions::new()
        .write(true)
        .open(&p)
        .with_context(|| format!("opening {}", p.display()))
}

/// Process ids in the cgroup at `path` (empty when it is gone).
pub fn procs(path: &Path) -> Vec<i32> {
    fs::read_to_string(path.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Kills every process in the cgroup (`cgroup.kill`, Linux 5.14+; SIGKILL one by one before)
/// and waits up to 3 s for it to empty.
pub fn kill_all(path: &Path) {
    if !sys::exists(path) {
        return;
    }
    let killed = OpenOptions::new()
        .write(true)
        .open(path.join("cgroup.kill"))
        .and_then(|mut f| f.write_all(b"1"))
        .is_ok();
    if !killed {
        for pid in procs_below(path) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    sys::wait_until(Duration::from_secs(3), || procs_below(path).is_empty());
}

/// Process ids in the cgroup at `path` and every cgroup below it.
fn procs_below(path: &Path) -> Vec<i32> {
    let mut all = procs(path);
    for child in children(path) {
        all.extend(procs_below(&child));
    }
    all
}

/// The cgroups directly below `path` (its subdirectories).
fn children(path: &Path) -> Vec<PathBuf> {
    fs::read_dir(path)
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Kills the cgroup's processes and removes the directory and the cgroups below it (which
/// the lab made: a pod's kubelet-like tree), retrying while the processes exit.
pub fn remove(path: &Path) -> Result<()> {
    if !sys::exists(path) {
        return Ok(());
    }
    kill_all(path);
    for child in children(path) {
        remove(&child)?;
    }
    let mut last = None;
    let gone = sys::wait_until(Duration::from_secs(3), || match fs::remove_dir(path) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => {
            last = Some(e);
            false
        }
    });
    if !gone {
        if let Some(e) = last {
            return Err(e).with_context(|| format!("removing cgroup {}", path.display()));
        }
    }
    Ok(())
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = remove(&self.path) {
            eprintln!("sockmap lab: {e:#}");
        }
    }
}
