//! The kernel's own account of what BPF programs cost: run time and runs per program, counted while a `BPF_ENABLE_STATS` descriptor is held.

use std::os::fd::{FromRawFd, OwnedFd};

use anyhow::{bail, Result};
use libbpf_rs::query::ProgInfoIter;

/// Run-time statistics are on while this lives (the kernel counts only then; closing the
/// descriptor turns them off again unless someone else holds one).
pub struct StatsOn {
    _fd: OwnedFd,
}

impl StatsOn {
    pub fn new() -> Result<StatsOn> {
        // SAFETY: a plain syscall wrapper; it returns a new descriptor or a negative errno.
        let fd = unsafe { libbpf_sys::bpf_enable_stats(libbpf_sys::BPF_STATS_RUN_TIME) };
        if fd < 0 {
            bail!(
                "BPF_ENABLE_STATS failed: {}",
                std::io::Error::from_raw_os_error(-fd)
            );
        }
        // SAFETY: `fd` was just returned to us and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(StatsOn { _fd: fd })
    }
}

/// Run time and runs of every loaded program called `name`, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProgCost {
    pub run_time_ns: u64,
    pub runs: u64,
}

impl ProgCost {
    pub fn since(self, earlier: ProgCost) -> ProgCost {
        ProgCost {
            run_time_ns: self.run_time_ns.saturating_sub(earlier.run_time_ns),
            runs: self.runs.saturating_sub(earlier.runs),
        }
    }
}

pub fn prog_cost(name: &str) -> ProgCost {
    ProgInfoIter::default()
        .filter(|p| p.name == name)
        .fold(ProgCost::default(), |sum, p| ProgCost {
            run_time_ns: sum.run_time_ns + p.run_time_ns,
            runs: sum.runs + p.run_cnt,
        })
}
