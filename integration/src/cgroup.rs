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
        let p = self.path.join("cgroup.procs");
        OpenOptions::new()
            .write(true)
            .open(&p)
            .with_context(|| format!("opening {}", p.display()))
    }

    pub fn kill_all(&self) {
        kill_all(&self.path);
    }
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
        for pid in procs(path) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    sys::wait_until(Duration::from_secs(3), || procs(path).is_empty());
}

/// Kills the cgroup's processes and removes the directory (retrying while they exit).
pub fn remove(path: &Path) -> Result<()> {
    if !sys::exists(path) {
        return Ok(());
    }
    kill_all(path);
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
