//! The delete phase's decisions, pure: where a planned entry goes (in-kernel
//! compare-and-delete, or a re-check and a delete by key), when a batch or an inventory is
//! due, how each path settles an entry, and what is left behind. [`crate::sweep`] carries
//! them out against the map.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use crate::identity::{CadOutcome, IdentityError};
use crate::label::labels;
use crate::map::DeleteOutcome;

labels! {
    /// What became of a stale entry the sweep acted on: the `outcome` of the metrics, the
    /// report and the trail.
    pub enum Outcome {
        Deleted => "deleted",
        AlreadyGone => "already-gone",
        /// Kept: it was not stale (or not the judged socket's) any more.
        Spared => "spared",
        Failed => "failed",
    }
}

labels! {
    /// Why a confirmed stale entry was kept after all.
    pub enum SpareReason {
        /// The re-check just before the delete found a live owner.
        NoLongerStale => "no-longer-stale",
        /// The entry holds another socket than the one judged.
        HoldsAnotherSocket => "holds-another-socket",
        /// The judged socket has the key's ends now (it reconnected to the key's tuple).
        NotStaleNow => "not-stale-now",
    }
}

/// Why a delete failed; the entry is still in the map.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeleteError {
    /// The delete by key.
    #[error("{0}")]
    ByKey(Arc<io::Error>),
    /// The delete inside compare-and-delete.
    #[error("{}", io::Error::from_raw_os_error(*errno))]
    Kernel { errno: i32 },
    #[error("not deleted: the held socket could not be read again")]
    CannotReread,
    /// The compare-and-delete pass as a whole.
    #[error(transparent)]
    CompareAndDelete(Arc<IdentityError>),
}

/// How one entry ended.
#[derive(Debug, Clone)]
pub enum Settled {
    Deleted,
    AlreadyGone,
    Spared(SpareReason),
    Failed(DeleteError),
}

impl Settled {
    pub fn outcome(&self) -> Outcome {
        match self {
            Settled::Deleted => Outcome::Deleted,
            Settled::AlreadyGone => Outcome::AlreadyGone,
            Settled::Spared(_) => Outcome::Spared,
            Settled::Failed(_) => Outcome::Failed,
        }
    }

    /// The trail's `outcome`: the outcome, and for a spared entry why (`spared-REASON`).
    /// `None`: not written to the trail (an entry the re-check found live was never acted on
    /// in the map).
    pub fn trail_label(&self) -> Option<String> {
        match self {
            Settled::Spared(SpareReason::NoLongerStale) => None,
            Settled::Spared(why) => Some(format!("{}-{why}", Outcome::Spared)),
            other => Some(other.outcome().to_string()),
        }
    }
}

/// Where a planned entry goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Judged on the socket it holds (closed, or other ends): facts that do not change for
    /// that socket, so it is queued for compare-and-delete, which deletes only while the
    /// entry still holds it. No socket inventory can add to that.
    CompareAndDelete { cookie: u64 },
    /// Judged on tuples: judged again against a fresh inventory, then deleted by key.
    Recheck,
}

/// Routes an entry: `held_cookie` is the cookie of the socket it was judged on, if any.
pub fn route(held_cookie: Option<u64>, identity_active: bool) -> Route {
    match held_cookie {
        Some(cookie) if identity_active => Route::CompareAndDelete { cookie },
        _ => Route::Recheck,
    }
}

/// Whether the queued compare-and-delete targets are to go now: a full pass (`batch`, the
/// targets map's size), or the oldest has waited `max_delay`.
pub fn batch_due(
    queued: usize,
    batch: usize,
    oldest_waited: Duration,
    max_delay: Duration,
) -> bool {
    queued >= batch || oldest_waited >= max_delay
}

/// Whether the re-check needs a new inventory: none yet (`age` is `None`), or it is older
/// than `max_age`.
pub fn inventory_due(age: Option<Duration>, max_age: Duration) -> bool {
    age.is_none_or(|age| age > max_age)
}

/// What to do with one entry next.
#[derive(Debug, Clone)]
pub enum Step {
    DeleteByKey,
    Settle(Settled),
}

/// After the re-check judged the entry again.
pub fn after_recheck(still_stale: bool) -> Step {
    if still_stale {
        Step::DeleteByKey
    } else {
        Step::Settle(Settled::Spared(SpareReason::NoLongerStale))
    }
}

/// What the compare-and-delete program reported for one target.
pub fn after_compare_and_delete(outcome: CadOutcome) -> Settled {
    match outcome {
        CadOutcome::Deleted => Settled::Deleted,
        CadOutcome::Gone => Settled::AlreadyGone,
        CadOutcome::CookieChanged => Settled::Spared(SpareReason::HoldsAnotherSocket),
        CadOutcome::NotStale => Settled::Spared(SpareReason::NotStaleNow),
        CadOutcome::Failed(errno) => Settled::Failed(DeleteError::Kernel { errno }),
    }
}

/// Compare-and-delete refused: compared in userspace instead, by the kernel program's rule.
/// `judged` is the cookie the entry was judged on (`None`: whichever socket it holds);
/// `now`, what a fresh read of the map finds: the held socket's cookie, and whether it is
/// still stale (closed, or other ends than the key's); `None`: gone.
pub fn after_reread(judged: Option<u64>, now: Option<(u64, bool)>) -> Step {
    match now {
        None => Step::Settle(Settled::AlreadyGone),
        Some((c, _)) if judged.is_some_and(|j| j != c) => {
            Step::Settle(Settled::Spared(SpareReason::HoldsAnotherSocket))
        }
        Some((_, true)) => Step::DeleteByKey,
        Some((_, false)) => Step::Settle(Settled::Spared(SpareReason::NotStaleNow)),
    }
}

/// A delete by key.
pub fn after_delete(result: io::Result<DeleteOutcome>) -> Settled {
    match result {
        Ok(DeleteOutcome::Deleted) => Settled::Deleted,
        Ok(DeleteOutcome::AlreadyGone) => Settled::AlreadyGone,
        Err(e) => Settled::Failed(DeleteError::ByKey(Arc::new(e))),
    }
}

/// Stale entries still in the map after a sweep: the stale ones neither deleted nor found
/// gone.
pub fn left_behind(stale: usize, deleted: usize, already_gone: usize) -> usize {
    stale.saturating_sub(deleted + already_gone)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn routes() {
        let cases = [
            (Some(7), true, Route::CompareAndDelete { cookie: 7 }),
            (Some(7), false, Route::Recheck),
            (None, true, Route::Recheck),
            (None, false, Route::Recheck),
        ];
        for (cookie, active, want) in cases {
            assert_eq!(route(cookie, active), want, "{cookie:?} {active}");
        }
    }

    #[test]
    fn batches_go_when_full_or_old() {
        let cases = [
            (0, 8192, MS(0), false),
            (8191, 8192, MS(249), false),
            (8192, 8192, MS(0), true),
            (1, 8192, MS(250), true),
            (1, 1, MS(0), true),
        ];
        for (queued, batch, waited, want) in cases {
            assert_eq!(
                batch_due(queued, batch, waited, MS(250)),
                want,
                "{queued} of {batch} after {waited:?}"
            );
        }
    }

    #[test]
    fn inventories_are_refreshed_when_missing_or_old() {
        let cases = [
            (None, true),
            (Some(MS(0)), false),
            (Some(MS(1000)), false),
            (Some(MS(1001)), true),
        ];
        for (age, want) in cases {
            assert_eq!(inventory_due(age, MS(1000)), want, "{age:?}");
        }
    }

    fn settled_as(step: Step) -> Option<Outcome> {
        match step {
            Step::DeleteByKey => None,
            Step::Settle(s) => Some(s.outcome()),
        }
    }

    #[test]
    fn the_recheck_deletes_only_what_is_still_stale() {
        assert_eq!(settled_as(after_recheck(true)), None);
        assert_eq!(settled_as(after_recheck(false)), Some(Outcome::Spared));
    }

    #[test]
    fn compare_and_delete_outcomes_settle() {
        let cases = [
            (CadOutcome::Deleted, Outcome::Deleted, Some("deleted")),
            (CadOutcome::Gone, Outcome::AlreadyGone, Some("already-gone")),
            (
                CadOutcome::CookieChanged,
                Outcome::Spared,
                Some("spared-holds-another-socket"),
            ),
            (
                CadOutcome::NotStale,
                Outcome::Spared,
                Some("spared-not-stale-now"),
            ),
            (
                CadOutcome::Failed(libc::ENOENT),
                Outcome::Failed,
                Some("failed"),
            ),
        ];
        for (cad, outcome, trail) in cases {
            let s = after_compare_and_delete(cad);
            assert_eq!(s.outcome(), outcome, "{cad:?}");
            assert_eq!(s.trail_label().as_deref(), trail, "{cad:?}");
        }
    }

    #[test]
    fn the_userspace_fallback_deletes_only_the_judged_socket_still_stale() {
        // (judged cookie, (cookie now, still stale), settled as; None: deleted by key)
        let cases = [
            (Some(5), None, Some(Outcome::AlreadyGone)),
            (Some(5), Some((5, true)), None),
            (Some(5), Some((5, false)), Some(Outcome::Spared)),
            (Some(5), Some((6, true)), Some(Outcome::Spared)),
            (Some(5), Some((6, false)), Some(Outcome::Spared)),
            // Whichever socket (a collision): judged on staleness alone.
            (None, Some((6, true)), None),
            (None, Some((6, false)), Some(Outcome::Spared)),
            (None, None, Some(Outcome::AlreadyGone)),
        ];
        for (judged, now, want) in cases {
            assert_eq!(settled_as(after_reread(judged, now)), want, "{now:?}");
        }
    }

    #[test]
    fn deletes_by_key_settle() {
        let cases = [
            (Ok(DeleteOutcome::Deleted), Outcome::Deleted),
            (Ok(DeleteOutcome::AlreadyGone), Outcome::AlreadyGone),
            (
                Err(io::Error::from_raw_os_error(libc::EPERM)),
                Outcome::Failed,
            ),
        ];
        for (result, want) in cases {
            assert_eq!(after_delete(result).outcome(), want);
        }
    }

    #[test]
    fn spares_of_the_recheck_stay_out_of_the_trail() {
        let cases = [
            (Settled::Spared(SpareReason::NoLongerStale), None),
            (Settled::Failed(DeleteError::CannotReread), Some("failed")),
        ];
        for (s, want) in cases {
            assert_eq!(s.trail_label().as_deref(), want, "{s:?}");
        }
    }

    #[test]
    fn left_behind_counts_what_is_still_in_the_map() {
        // (stale, deleted, already gone, left behind)
        let cases = [
            (0, 0, 0, 0),
            (10, 10, 0, 0),
            (10, 7, 3, 0),
            (10, 4, 1, 5),
            (10, 0, 0, 10),
        ];
        for (stale, deleted, gone, want) in cases {
            assert_eq!(
                left_behind(stale, deleted, gone),
                want,
                "{stale} {deleted} {gone}"
            );
        }
    }
}
