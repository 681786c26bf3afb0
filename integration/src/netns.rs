//! Named network namespaces the lab creates (`ip netns add`), removed again on drop.

use std::fs;
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::Result;

use crate::sys;

/// Where `ip netns` keeps its bind mounts.
pub const NETNS_DIR: &str = "/run/netns";

// The first `ip netns add` on a host sets up /run/netns as a shared mount; two doing it at
// once can stack mounts, so one process creates namespaces one at a time.
static IP_NETNS_LOCK: Mutex<()> = Mutex::new(());

/// A named network namespace with `lo` up; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn create(name: &str) -> Result<Netns> {
        {
            let _guard = IP_NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            sys::ip(&["netns", "add", name])?;
        }
        let ns = Netns {
            name: name.to_string(),
        };
        sys::ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`, openable for `setns`.
    pub fn path(&self) -> PathBuf {
        path_of(&self.name)
    }
}

pub fn path_of(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

/// Deletes the named namespace if it exists (it is ours by name).
pub fn delete(name: &str) -> Result<()> {
    if !sys::exists(&path_of(name)) {
        return Ok(());
    }
    let _guard = IP_NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    sys::ip(&["netns", "del", name])
}

/// Names in /run/netns, for finding leftovers.
pub fn list() -> Vec<String> {
    fs::read_dir(NETNS_DIR)
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = delete(&self.name) {
            eprintln!("sockmap lab: cannot delete netns {}: {e:#}", self.name);
        }
    }
}
