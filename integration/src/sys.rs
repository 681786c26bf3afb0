//! Small host helpers: mount table, cgroup v2 and bpffs discovery, `ip` invocations, waits.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Where bpffs is expected; the product reads pins from here too.
pub const BPFFS: &str = "/sys/fs/bpf";

/// One line of /proc/self/mounts: (mount point, file system type).
fn mounts() -> Result<Vec<(String, String)>> {
    let text = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _source = fields.next()?;
            let point = fields.next()?;
            let fstype = fields.next()?;
            // The kernel escapes spaces in mount points as \040.
            Some((point.replace("\\040", " "), fstype.to_string()))
        })
        .collect())
}

/// The cgroup v2 mount point: /sys/fs/cgroup on unified hosts, /sys/fs/cgroup/unified on
/// hybrid ones, whatever the mount table says elsewhere.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let all = mounts()?;
    let v2: Vec<&String> = all
        .iter()
        .filter(|(_, t)| t == "cgroup2")
        .map(|(p, _)| p)
        .collect();
    if let Some(p) = v2.iter().find(|p| p.as_str() == "/sys/fs/cgroup") {
        return Ok(PathBuf::from(p.as_str()));
    }
    match v2.first() {
        Some(p) => Ok(PathBuf::from(p.as_str())),
        None => bail!("no cgroup2 file system is mounted (see /proc/self/mounts); sock_ops programs attach to a cgroup v2 directory"),
    }
}

static BPFFS_LOCK: Mutex<()> = Mutex::new(());

/// Mounts bpffs at /sys/fs/bpf unless a bpf file system is already there. Left mounted: it is
/// the host's standard place for pins, not a lab resource.
pub fn ensure_bpffs() -> Result<()> {
    // Parallel labs in one process must not stack two mounts.
    let _guard = BPFFS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if mounts()?.iter().any(|(p, t)| p == BPFFS && t == "bpf") {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mount -t bpf bpf {BPFFS}"))?;
    Ok(())
}

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    output(Command::new("ip").args(args)).context("`ip` (Debian package iproute2)")?;
    Ok(())
}

/// Runs `cmd` with no stdin; its stdout, or an error with its exit status and stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Fails loudly unless this process may use BPF and namespaces (the lab needs root).
pub fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the sockmap lab needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_BPF): run the tests as root");
    }
    Ok(())
}

/// Whether `path` exists without following a final symlink.
pub fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// The running kernel's (major, minor) release.
pub fn kernel_release() -> Result<(u32, u32)> {
    let release =
        fs::read_to_string("/proc/sys/kernel/osrelease").context("reading the kernel release")?;
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse().unwrap_or(0));
    Ok((parts.next().unwrap_or(0), parts.next().unwrap_or(0)))
}

/// Whether a reset socket stays in the map while its application keeps the fd: since Linux
/// 5.16 (commit b8b8315e39ff, also in 5.14.y/5.15.y stable). Before, its unhash removed it,
/// and the natural stale entry did not arise.
pub fn keeps_reset_sockets() -> Result<bool> {
    Ok(kernel_release()? >= (5, 16))
}
