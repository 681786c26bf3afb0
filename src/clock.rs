//! The kernel's clocks, read with `clock_gettime`: CLOCK_MONOTONIC, the event programs' clock.
//!
//! Also a thread's own CPU time, what the continuous pass's budget counts.

use std::time::Duration;

/// CLOCK_MONOTONIC now, the clock of [`crate::events::Event`]'s `at`: now minus `at` is how
/// long ago the kernel saw it.
pub fn monotonic_now() -> Duration {
    now(libc::CLOCK_MONOTONIC)
}

/// The calling thread's CPU time so far (user and system).
pub fn thread_cpu_time() -> Duration {
    now(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// `clock`'s time now; zero if the kernel cannot read it.
fn now(clock: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer to a local.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_clocks_move() {
        let (wall, cpu) = (monotonic_now(), thread_cpu_time());
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(monotonic_now() > wall);
        assert!(thread_cpu_time() > cpu);
    }
}
