//! Loads the Cilium-like fixture (bpf/fixtures/cilium_sockops.bpf.c), pins its map under the
//! lab's own pin directory and attaches sock_ops to the lab's cgroup, sk_msg to the map.

use std::fs;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{Link, MapCore};

#[allow(clippy::all, clippy::pedantic, unsafe_op_in_unsafe_fn)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/cilium_sockops.skel.rs"));
}

use skel::{CiliumSockopsSkel, CiliumSockopsSkelBuilder};

/// The map's name in the object and the file name of its pin.
pub const MAP_NAME: &str = "cilium_sock_ops";

/// Loaded programs, their attachments and the map pin; undone on drop in reverse order.
pub struct Programs {
    skel: Option<CiliumSockopsSkel<'static>>,
    sockops_link: Option<Link>,
    msg_attached: bool,
    pin_dir: PathBuf,
    map_path: PathBuf,
    pinned: bool,
}

impl Programs {
    /// Creates `pin_dir`, loads, pins the map at `pin_dir/cilium_sock_ops`, attaches.
    /// `max_entries` overrides the map's 65535.
    pub fn load(
        pin_dir: &Path,
        cgroup: &fs::File,
        ipv6: bool,
        max_entries: Option<u32>,
    ) -> Result<Programs> {
        fs::create_dir(pin_dir)
            .with_context(|| format!("creating pin directory {}", pin_dir.display()))?;
        let mut progs = Programs {
            skel: None,
            sockops_link: None,
            msg_attached: false,
            pin_dir: pin_dir.to_path_buf(),
            map_path: pin_dir.join(MAP_NAME),
            pinned: false,
        };
        // The skeleton borrows its object storage for its whole life; a lab lives about as
        // long as the process, so the few bytes are leaked rather than made self-referential.
        let storage: &'static mut MaybeUninit<libbpf_rs::OpenObject> =
            Box::leak(Box::new(MaybeUninit::uninit()));
        let mut open = CiliumSockopsSkelBuilder::default()
            .open(storage)
            .context("opening the sockops BPF object")?;
        if let Some(rodata) = open.maps.rodata_data.as_deref_mut() {
            rodata.handle_ipv6 = u8::from(ipv6);
        }
        if let Some(n) = max_entries {
            open.maps
                .cilium_sock_ops
                .set_max_entries(n)
                .context("setting the sockhash's max_entries")?;
        }
        let mut skel = open.load().context(
            "loading the sockops/sk_msg programs (BPF refused: root and a kernel with sockmap support are needed)",
        )?;
        skel.maps
            .cilium_sock_ops
            .pin(&progs.map_path)
            .with_context(|| format!("pinning the map at {}", progs.map_path.display()))?;
        progs.pinned = true;
        let map_fd = skel.maps.cilium_sock_ops.as_fd().as_raw_fd();
        // sk_msg first: a socket takes the map's programs when it joins, not later.
        skel.progs
            .bpf_redir_proxy
            .attach_sockmap(map_fd)
            .context("attaching sk_msg to the sockhash")?;
        progs.msg_attached = true;
        let link = skel
            .progs
            .bpf_sockmap
            .attach_cgroup(cgroup.as_raw_fd())
            .context("attaching sock_ops to the lab cgroup")?;
        progs.sockops_link = Some(link);
        progs.skel = Some(skel);
        Ok(progs)
    }

    pub fn map_path(&self) -> &Path {
        &self.map_path
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The loaded map's kernel id (what `bpftool map show id N` takes).
    pub fn map_id(&self) -> Option<u32> {
        let skel = self.skel.as_ref()?;
        skel.maps.cilium_sock_ops.info().ok().map(|i| i.info.id)
    }
}

impl Drop for Programs {
    fn drop(&mut self) {
        // Detach from the cgroup first so no new socket joins while the rest goes away.
        drop(self.sockops_link.take());
        if let Some(skel) = self.skel.as_ref() {
            if self.msg_attached {
                let prog_fd = skel.progs.bpf_redir_proxy.as_fd().as_raw_fd();
                let map_fd = skel.maps.cilium_sock_ops.as_fd().as_raw_fd();
                // SAFETY: plain syscall wrapper on two fds this struct keeps open.
                unsafe {
                    libbpf_rs::libbpf_sys::bpf_prog_detach2(
                        prog_fd,
                        map_fd,
                        libbpf_rs::libbpf_sys::BPF_SK_MSG_VERDICT,
                    );
                }
            }
        }
        if self.pinned {
            if let Err(e) = fs::remove_file(&self.map_path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    eprintln!("sockmap lab: cannot unpin {}: {e}", self.map_path.display());
                }
            }
        }
        drop(self.skel.take());
        remove_pin_dir(&self.pin_dir);
    }
}

/// Unlinks every pin in the lab's own pin directory, then the directory.
pub fn remove_pin_dir(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = fs::remove_file(e.path());
        }
    }
    if let Err(e) = fs::remove_dir(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            eprintln!("sockmap lab: cannot remove {}: {e}", dir.display());
        }
    }
}
