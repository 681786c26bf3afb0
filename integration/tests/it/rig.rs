//! The daemon as the soak and fault tests drive it: a scratch directory for its config and
//! trail, the process with its log collected line by line, sweeps counted from its summary
//! lines, and the trail read back. `daemon.rs` wraps this harness with a metrics listener;
//! the soak and fault tests need none, so many daemons can run at once.

use std::fmt::Display;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sockmap_gc_lab::{sys, Lab};

use crate::support::{evidence, lab, product};

/// A directory for one test's config and trail, removed afterwards.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(id: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("sockmap-gc-{id}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    pub fn trail(&self) -> PathBuf {
        self.path("trail.jsonl")
    }

    /// Writes the config for `map`: no metrics listener, the trail here, `extra` lines last.
    pub fn config(&self, map: &Path, extra: &str) -> PathBuf {
        let path = self.path("sockmap-gc.toml");
        let text = format!(
            "map = \"{}\"\nmetrics_listen = \"\"\ntrail = \"{}\"\n{extra}\n",
            map.display(),
            self.trail().display()
        );
        std::fs::write(&path, text).expect("write config");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A one-pod lab and a scratch directory, both named from the test's `id`; in this order, so
/// that the lab goes first.
pub fn lab_and_scratch(id: &str) -> (Scratch, Lab) {
    let scratch = Scratch::new(id);
    (scratch, lab(id, 1))
}

/// One line of the trail.
#[derive(Debug, Clone)]
pub struct TrailLine {
    pub key: String,
    pub map_id: u64,
    pub outcome: String,
    pub reason: String,
}

pub fn read_trail(path: &Path) -> Vec<TrailLine> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("trail line not JSON ({e}): {l}"));
            let text = |k: &str| v[k].as_str().unwrap_or_default().to_string();
            TrailLine {
                key: text("key"),
                map_id: v["map_id"].as_u64().unwrap_or_default(),
                outcome: text("outcome"),
                reason: text("reason"),
            }
        })
        .collect()
}

/// A running `sockmap-gc daemon`; killed on drop if still running, its log shown on a panic.
pub struct Daemon {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    /// Outside systemd: no `NOTIFY_SOCKET` or `WATCHDOG_USEC` from the test's environment.
    pub fn start(config: &Path) -> Daemon {
        let mut cmd = Command::new(product());
        cmd.env_remove("NOTIFY_SOCKET").env_remove("WATCHDOG_USEC");
        Daemon::start_with(&mut cmd, config)
    }

    /// Starts `cmd` (the product, or a wrapper ending in it) as a daemon, with the
    /// environment `cmd` was given.
    pub fn start_with(cmd: &mut Command, config: &Path) -> Daemon {
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec. A
        // test process that dies (killed, or a panic past the drop) takes its daemon along.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .arg("daemon")
            .arg("--config")
            .arg(config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the daemon");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        let daemon = Daemon { child, lines };
        daemon
            .wait_line(Duration::from_secs(10), |l| l.contains("daemon started"))
            .unwrap_or_else(|| panic!("the daemon never started:\n{}", daemon.log()));
        daemon
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The lines logged so far (the reader thread appends while this is held).
    fn lines(&self) -> MutexGuard<'_, Vec<String>> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn log(&self) -> String {
        self.lines().join("\n")
    }

    pub fn count(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.lines().iter().filter(|l| pred(l)).count()
    }

    pub fn wait_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let mut found = None;
        sys::wait_until(timeout, || {
            found = self.lines().iter().find(|l| pred(l)).cloned();
            found.is_some()
        });
        found
    }

    /// Waits for the line containing `line`, and returns what follows `after` in it up to the
    /// first character `end` accepts (the address in `serving metrics on http://...`, say).
    pub fn wait_value(
        &self,
        timeout: Duration,
        line: &str,
        after: &str,
        end: fn(char) -> bool,
    ) -> String {
        let found = self
            .wait_line(timeout, |l| l.contains(line))
            .unwrap_or_else(|| panic!("no line with {line:?}:\n{}", self.log()));
        found
            .split(after)
            .nth(1)
            .and_then(|rest| rest.split(end).next())
            .unwrap_or_else(|| panic!("no {after:?} in {found:?}"))
            .to_string()
    }

    /// Sweeps finished so far: one summary line each (`sweep ok:`, `sweep held:`, ...,
    /// `sweep failed:`).
    pub fn sweeps(&self) -> usize {
        self.count(is_summary)
    }

    /// Sweeps finished with this result (`ok`, `held`, `interrupted`, `error`, `failed`).
    pub fn sweeps_with(&self, result: &str) -> usize {
        let needle = format!("sweep {result}:");
        self.count(|l| l.contains(&needle))
    }

    /// Waits for `n` more sweeps than now; returns how many there are then.
    pub fn wait_more_sweeps(&self, n: usize, timeout: Duration) -> usize {
        let want = self.sweeps() + n;
        self.wait_sweeps_counted(want, timeout, || self.sweeps())
    }

    /// Waits until `count` (from the log, or from the metrics) says `want` sweeps; returns
    /// its last answer, failing with the log if it stays short.
    pub fn wait_sweeps_counted<N: PartialOrd + Copy + Default + Display>(
        &self,
        want: N,
        timeout: Duration,
        mut count: impl FnMut() -> N,
    ) -> N {
        let mut got = N::default();
        sys::wait_until(timeout, || {
            got = count();
            got >= want
        });
        assert!(
            got >= want,
            "only {got} sweeps, wanted {want}, within {timeout:?}:\n{}",
            self.log()
        );
        got
    }

    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).expect("signal the daemon");
    }

    /// SIGTERM; waits at most 5 s for the exit. Returns the status, how long it took and
    /// the whole log.
    pub fn terminate(mut self) -> (ExitStatus, Duration, String) {
        let sent = Instant::now();
        self.signal(Signal::SIGTERM);
        let mut status = None;
        sys::wait_until(Duration::from_secs(5), || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        let took = sent.elapsed();
        let status = status.unwrap_or_else(|| panic!("no exit 5 s after SIGTERM:\n{}", self.log()));
        // The reader thread may still hold the last lines for a moment.
        std::thread::sleep(Duration::from_millis(50));
        (status, took, self.log())
    }
}

pub fn is_summary(line: &str) -> bool {
    [
        "sweep ok:",
        "sweep held:",
        "sweep interrupted:",
        "sweep error:",
        "sweep failed:",
    ]
    .iter()
    .any(|s| line.contains(s))
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            evidence(&format!("daemon log:\n{}", self.log()));
        }
    }
}
