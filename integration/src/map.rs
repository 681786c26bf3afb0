//! Reading and editing the lab's pinned sockhash from userspace, and the bpftool equivalents
//! (the manual remedy the product replaces).

use std::path::Path;

use std::process::Command;

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapHandle};
use sockmap_gc::key::{RawKey, SockKey};

use crate::sys;

/// Opens a pinned map (what the product does with `--map PATH`).
pub fn open_pinned(path: &Path) -> Result<MapHandle> {
    MapHandle::from_pinned_path(path)
        .with_context(|| format!("opening pinned map {}", path.display()))
}

/// Every key currently in the map, raw.
pub fn raw_keys(map: &MapHandle) -> Vec<RawKey> {
    map.keys()
        .filter_map(|k| RawKey::try_from(k.as_slice()).ok())
        .collect()
}

/// Every key, decoded; a key that does not decode is an error (the fixture writes none).
pub fn keys(map: &MapHandle) -> Result<Vec<SockKey>> {
    raw_keys(map)
        .iter()
        .map(|raw| SockKey::decode(raw).with_context(|| format!("decoding {raw:?}")))
        .collect()
}

/// Deletes one entry by its key bytes.
pub fn delete(map: &MapHandle, key: &SockKey) -> Result<()> {
    map.delete(&key.encode().0)
        .with_context(|| format!("deleting {key}"))
}

/// The key as `bpftool ... key hex` takes it: 44 space-separated bytes.
pub fn bpftool_hex(key: &SockKey) -> String {
    key.encode().to_bpftool_hex()
}

/// The command line an operator would type to delete `key` from the map pinned at `path`.
pub fn bpftool_delete_command(path: &Path, key: &SockKey) -> String {
    format!(
        "bpftool map delete pinned {} key hex {}",
        path.display(),
        bpftool_hex(key)
    )
}

/// Runs `bpftool map delete pinned PATH key hex ...`.
pub fn bpftool_delete(path: &Path, key: &SockKey) -> Result<()> {
    let hex = bpftool_hex(key);
    sys::output(
        Command::new("bpftool")
            .args(["map", "delete", "pinned"])
            .arg(path)
            .args(["key", "hex"])
            .args(hex.split(' ')),
    )
    .context("bpftool map delete (Debian package bpftool)")?;
    Ok(())
}
