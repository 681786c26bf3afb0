//! `sockmap-gc daemon` under measurement: started from a config text with its log in a file,
//! its CPU time and memory read from `/proc`, stopped with SIGTERM.

use std::fmt::Write as _;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sockmap_gc_lab::sys;

/// The shipped daemon config, as built into this binary.
pub const SHIPPED: &str = include_str!("../../../../config/sockmap-gc.toml");

/// Whether `config` sets `key`.
pub fn has_key(config: &str, key: &str) -> bool {
    config.lines().any(|l| is_key_line(l, key))
}

/// `config` with each of `set`'s keys given its value (TOML text), in place where the key is
/// set, appended where it is not.
pub fn with_keys(config: &str, set: &[(&str, String)]) -> String {
    let mut out = String::new();
    for line in config.lines() {
        match set.iter().find(|(k, _)| is_key_line(line, k)) {
            Some((k, v)) => {
                let _ = writeln!(out, "{k} = {v}");
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    for (k, v) in set.iter().filter(|(k, _)| !has_key(config, k)) {
        let _ = writeln!(out, "{k} = {v}");
    }
    out
}

fn is_key_line(line: &str, key: &str) -> bool {
    line.strip_prefix(key)
        .is_some_and(|rest| rest.trim_start().starts_with('='))
}

/// A running daemon; killed on drop.
pub struct DaemonProc {
    child: Child,
    log: PathBuf,
}

impl DaemonProc {
    /// Writes `config` to `scratch/LABEL.toml` and starts the daemon on it (log in
    /// `scratch/LABEL.log`, `env` added), waiting for its start line.
    pub fn start(
        product: &Path,
        config: &str,
        scratch: &Path,
        label: &str,
        env: &[(&str, &str)],
    ) -> Result<DaemonProc> {
        let path = scratch.join(format!("{label}.toml"));
        let log = scratch.join(format!("{label}.log"));
        std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
        let stderr = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(product);
        cmd.arg("daemon")
            .arg("--config")
            .arg(&path)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        // SAFETY: prctl, sigemptyset and sigprocmask are async-signal-safe, and nothing else
        // runs between fork and exec. The daemon dies with the bench, and gets SIGTERM and
        // SIGINT unblocked: the bench blocks them for its own handler (interrupt.rs), and a
        // child inherits the mask.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let mut none = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
                if libc::sigemptyset(none.as_mut_ptr()) != 0
                    || libc::sigprocmask(libc::SIG_SETMASK, none.as_ptr(), std::ptr::null_mut())
                        != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} daemon", product.display()))?;
        let daemon = DaemonProc { child, log };
        if !daemon.wait_log(Duration::from_secs(10), "daemon started") {
            bail!("the daemon did not start:\n{}", daemon.log_text());
        }
        Ok(daemon)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to `timeout` for `needle` in the log.
    pub fn wait_log(&self, timeout: Duration, needle: &str) -> bool {
        sys::wait_until(timeout, || self.log_text().contains(needle))
    }

    /// utime + stime so far, every thread's (live and exited) included.
    pub fn cpu(&self) -> Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .context("reading the daemon's /proc/PID/stat")?;
        cpu_of_stat(&stat).context("parsing the daemon's /proc/PID/stat")
    }

    /// A `kB` field of its `/proc/PID/status` (`VmRSS`, `VmHWM`).
    pub fn status_kib(&self, field: &str) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .context("reading the daemon's /proc/PID/status")?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {field} in the daemon's /proc/PID/status"))
    }

    /// SIGTERM, and the exit (killed after 5 s); returns the whole log.
    pub fn stop(mut self) -> Result<String> {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).context("pid")?);
        let _ = kill(pid, Signal::SIGTERM);
        let exited = sys::wait_until(Duration::from_secs(5), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        if !exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
            bail!("the daemon ignored SIGTERM:\n{}", self.log_text());
        }
        Ok(self.log_text())
    }
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// utime + stime (fields 14 and 15, in clock ticks) of a `/proc/PID/stat` line. The command
/// name (field 2) may hold spaces and parentheses: fields are counted after its last `)`.
pub fn cpu_of_stat(stat: &str) -> Option<Duration> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = u64::try_from(ticks).ok().filter(|&t| t > 0)?;
    Some(Duration::from_secs_f64(
        (utime + stime) as f64 / ticks as f64,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_read_after_the_command_name() {
        let stat = "4242 (sock map) gc)) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 100 1000 200 18446744073709551615";
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let cpu = cpu_of_stat(stat).expect("parses");
        assert!((cpu.as_secs_f64() - 300.0 / ticks).abs() < 1e-9);
        assert_eq!(cpu_of_stat("garbage"), None);
    }

    #[test]
    fn keys_are_set_in_place_or_appended_and_comments_left_alone() {
        let text = with_keys(
            "# dry_run = true\ndry_run = true\nmap = \"\"\n",
            &[("dry_run", "false".into()), ("trail", "\"\"".into())],
        );
        assert_eq!(
            text,
            "# dry_run = true\ndry_run = false\nmap = \"\"\ntrail = \"\"\n"
        );
        assert!(has_key(SHIPPED, "dry_run"));
        assert!(!has_key(SHIPPED, "dry_run_x"));
    }
}
