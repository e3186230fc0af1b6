//! When a watch acts: the trailing debounce of file-system events, the full rescans
//! (start, overflow, reconnect, failure, and every [`PERIODIC_RESCAN`] while the watcher is
//! degraded), the pulls of the session's new versions, and the back-off after a failure.
//!
//! Pure state on tokio's clock ([`Instant`]): the watch's task feeds it what happened and
//! asks it what is due ([`Schedule::next`]) and until when to sleep
//! ([`Schedule::deadline`]); tests drive it on a paused clock.
//!
//! This module must never touch the file system or the relay, and never sleeps itself.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use cloud_protocol::teleport::RelPath;
use tokio::time::Instant;

/// The trailing debounce: changes are pushed once no event came for this long (an
/// editor's save is a burst of a few events within a millisecond or two; 15 ms keeps a
/// one-file edit's propagation well under the 30 ms it is allowed).
pub const DEBOUNCE: Duration = Duration::from_millis(15);
const _: () = assert!(DEBOUNCE.as_millis() >= 10 && DEBOUNCE.as_millis() <= 20);

/// The longest a change waits under a steady stream of events (a build writing for
/// seconds): the debounce is trailing, but not forever.
pub const MAX_DELAY: Duration = Duration::from_millis(500);

/// How often a degraded watcher (the watch limit is reached, no watcher could start)
/// rescans the whole worktree through the index instead.
pub const PERIODIC_RESCAN: Duration = Duration::from_secs(2);

/// More changed paths than this in one batch are rescanned as a whole worktree instead
/// (bounded memory; a full rescan through the index is as cheap by then).
pub const MAX_PATHS: usize = 16_384;

/// How many unpushed paths `pending` counts one by one (beyond: it says at least this).
pub const MAX_PENDING: usize = 65_536;

/// The first wait after a failed push or pull; it doubles up to [`RETRY_MAX`].
pub const RETRY_MIN: Duration = Duration::from_secs(1);
/// The longest wait between two attempts.
pub const RETRY_MAX: Duration = Duration::from_secs(30);

/// What a watch does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due {
    /// Pull the session's newer version.
    Pull,
    /// Rescan the whole worktree through the index, then push.
    Full,
    /// Rescan these paths, then push.
    Paths(Vec<RelPath>),
}

/// A watch's schedule.
#[derive(Debug)]
pub struct Schedule {
    /// Paths changed since the last batch.
    paths: BTreeSet<RelPath>,
    /// A full rescan is asked for (start, overflow, reconnect, a failure).
    full: bool,
    /// A pull is asked for (the session announced a version this side lacks).
    pull: bool,
    /// When the current batch is due: the trailing debounce's end.
    quiet_at: Option<Instant>,
    /// When the current batch began (for [`MAX_DELAY`]).
    first_at: Option<Instant>,
    /// Whether the relay is connected: nothing is due while it is not.
    connected: bool,
    /// The next periodic full rescan, while the watcher is degraded.
    periodic_at: Option<Instant>,
    /// No attempt before this, after a failure.
    retry_at: Option<Instant>,
    /// The wait after the next failure.
    retry_delay: Duration,
    /// Paths changed and not pushed yet (what `teleport status` shows as pending).
    unpushed: HashSet<RelPath>,
    /// Set when `unpushed` stopped counting at [`MAX_PENDING`].
    unpushed_overflowed: bool,
}

impl Schedule {
    /// A new watch's schedule: a full rescan and a pull are due as soon as the relay is
    /// connected (what changed while nobody watched).
    pub fn new(now: Instant, connected: bool) -> Schedule {
        Schedule {
            paths: BTreeSet::new(),
            full: true,
            pull: true,
            quiet_at: Some(now),
            first_at: Some(now),
            connected,
            periodic_at: None,
            retry_at: None,
            retry_delay: RETRY_MIN,
            unpushed: HashSet::new(),
            unpushed_overflowed: false,
        }
    }

    fn touch(&mut self, now: Instant) {
        self.quiet_at = Some(now + DEBOUNCE);
        self.first_at.get_or_insert(now);
    }

    /// The watcher saw `paths` change. While the relay is unreachable they are only
    /// counted: a full rescan at reconnect finds them again (events are not replayed).
    pub fn changed(&mut self, paths: impl IntoIterator<Item = RelPath>, now: Instant) {
        for path in paths {
            if self.unpushed.len() < MAX_PENDING {
                self.unpushed.insert(path.clone());
            } else if !self.unpushed.contains(&path) {
                self.unpushed_overflowed = true;
            }
            if self.connected && !self.full {
                self.paths.insert(path);
            }
        }
        if !self.connected {
            return;
        }
        if self.paths.len() > MAX_PATHS {
            self.paths.clear();
            self.full = true;
        }
        self.touch(now);
    }

    /// Events were lost (the kernel's queue or ours overflowed, a rescan flag): the whole
    /// worktree is rescanned, after the same debounce (an overflow comes in a burst).
    pub fn overflowed(&mut self, now: Instant) {
        self.paths.clear();
        self.full = true;
        self.touch(now);
    }

    /// The relay connection went up or down. Up again: a full rescan (what changed while
    /// it was down) and a pull (what the session did meanwhile), at once.
    pub fn set_connected(&mut self, connected: bool, now: Instant) {
        if connected == self.connected {
            return;
        }
        self.connected = connected;
        self.paths.clear();
        if connected {
            self.full = true;
            self.pull = true;
            self.quiet_at = Some(now);
            self.first_at = Some(now);
            self.retry_at = None;
            self.retry_delay = RETRY_MIN;
        } else {
            // Found again by the rescan at reconnect.
            self.full = true;
            self.quiet_at = None;
            self.first_at = None;
        }
    }

    /// The session has a version this side lacks.
    pub fn remote_changed(&mut self) {
        self.pull = true;
    }

    /// The watcher lost events for good (the watch limit) or recovered: while degraded, a
    /// full rescan is due every [`PERIODIC_RESCAN`].
    pub fn set_degraded(&mut self, degraded: bool, now: Instant) {
        match (degraded, self.periodic_at) {
            (true, None) => self.periodic_at = Some(now + PERIODIC_RESCAN),
            (false, Some(_)) => self.periodic_at = None,
            _ => {}
        }
    }

    /// Whether the watcher is degraded (periodic rescans are scheduled).
    pub fn degraded(&self) -> bool {
        self.periodic_at.is_some()
    }

    /// When the current batch is due, if there is one.
    fn batch_due_at(&self) -> Option<Instant> {
        if self.paths.is_empty() && !self.full {
            return None;
        }
        let quiet = self.quiet_at?;
        Some(match self.first_at {
            Some(first) => quiet.min(first + MAX_DELAY),
            None => quiet,
        })
    }

    /// What is due at `now`, if anything (one thing at a time: a pull first, then the
    /// batch, then a periodic rescan).
    pub fn next(&mut self, now: Instant) -> Option<Due> {
        if !self.connected || self.retry_at.is_some_and(|at| at > now) {
            return None;
        }
        self.retry_at = None;
        if self.pull {
            self.pull = false;
            return Some(Due::Pull);
        }
        if self.batch_due_at().is_some_and(|at| at <= now) {
            self.quiet_at = None;
            self.first_at = None;
            if std::mem::take(&mut self.full) {
                self.paths.clear();
                self.push_periodic(now);
                return Some(Due::Full);
            }
            return Some(Due::Paths(
                std::mem::take(&mut self.paths).into_iter().collect(),
            ));
        }
        if self.periodic_at.is_some_and(|at| at <= now) {
            self.push_periodic(now);
            return Some(Due::Full);
        }
        None
    }

    /// A full rescan ran (or is about to): the next periodic one is a period later.
    fn push_periodic(&mut self, now: Instant) {
        if self.periodic_at.is_some() {
            self.periodic_at = Some(now + PERIODIC_RESCAN);
        }
    }

    /// When something may next be due (`None`: only an outside event can make it so).
    pub fn deadline(&self) -> Option<Instant> {
        if !self.connected {
            return None;
        }
        if let Some(retry) = self.retry_at {
            return Some(retry);
        }
        if self.pull {
            return Some(Instant::now());
        }
        [self.batch_due_at(), self.periodic_at]
            .into_iter()
            .flatten()
            .min()
    }

    /// A push went through: what was pending is in the session.
    pub fn pushed(&mut self) {
        self.unpushed.clear();
        self.unpushed_overflowed = false;
        self.retry_delay = RETRY_MIN;
    }

    /// A pull went through.
    pub fn pulled(&mut self) {
        self.retry_delay = RETRY_MIN;
    }

    /// What was due failed (`Due::Pull`: the pull; else the push): it is tried again after
    /// a back-off, the push as a full rescan (what it had found is still in the index, and
    /// a full rescan through the index costs only stats).
    pub fn failed(&mut self, due: &Due, now: Instant) {
        match due {
            Due::Pull => self.pull = true,
            Due::Full | Due::Paths(_) => {
                self.paths.clear();
                self.full = true;
                self.quiet_at = Some(now);
                self.first_at.get_or_insert(now);
            }
        }
        self.retry_at = Some(now + self.retry_delay);
        self.retry_delay = (self.retry_delay * 2).min(RETRY_MAX);
    }

    /// Paths changed and not yet pushed, and whether there are more than that.
    pub fn pending(&self) -> (u64, bool) {
        (self.unpushed.len() as u64, self.unpushed_overflowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    /// Sleeps (on the paused clock) until the schedule's deadline, and returns what is due
    /// then, with how long it took.
    async fn run_to_deadline(schedule: &mut Schedule) -> (Duration, Option<Due>) {
        let start = Instant::now();
        let deadline = schedule.deadline().expect("something is scheduled");
        tokio::time::sleep_until(deadline).await;
        (start.elapsed(), schedule.next(Instant::now()))
    }

    /// A schedule past its start (the first full rescan and pull done).
    fn started() -> Schedule {
        let mut schedule = Schedule::new(Instant::now(), true);
        assert_eq!(schedule.next(Instant::now()), Some(Due::Pull));
        assert_eq!(schedule.next(Instant::now()), Some(Due::Full));
        assert_eq!(schedule.next(Instant::now()), None);
        assert_eq!(schedule.deadline(), None);
        schedule
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_events_is_one_batch_debounce_after_the_last() {
        let mut schedule = started();
        let start = Instant::now();
        schedule.changed([p("a")], Instant::now());
        // Events keep coming every 10 ms: the batch waits for them.
        for name in ["b", "c", "a"] {
            tokio::time::advance(Duration::from_millis(10)).await;
            assert_eq!(schedule.next(Instant::now()), None, "not quiet yet");
            schedule.changed([p(name)], Instant::now());
        }
        let (waited, due) = run_to_deadline(&mut schedule).await;
        assert_eq!(waited, DEBOUNCE, "trailing: DEBOUNCE after the last event");
        assert_eq!(start.elapsed(), Duration::from_millis(30) + DEBOUNCE);
        assert_eq!(due, Some(Due::Paths(vec![p("a"), p("b"), p("c")])));
        assert_eq!(schedule.deadline(), None, "nothing left");
        // Still pending until the push went through.
        assert_eq!(schedule.pending(), (3, false));
        schedule.pushed();
        assert_eq!(schedule.pending(), (0, false));
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_stream_still_flushes_after_the_max_delay() {
        let mut schedule = started();
        let start = Instant::now();
        let mut flushed = None;
        for n in 0..200 {
            schedule.changed([p(&format!("f{n}"))], Instant::now());
            tokio::time::advance(Duration::from_millis(5)).await;
            if let Some(due) = schedule.next(Instant::now()) {
                flushed = Some((start.elapsed(), due));
                break;
            }
        }
        let (after, due) = flushed.expect("the stream was flushed");
        assert_eq!(after, MAX_DELAY);
        assert!(matches!(due, Due::Paths(paths) if paths.len() == 100));
    }

    #[tokio::test(start_paused = true)]
    async fn an_overflow_is_a_full_rescan_that_swallows_the_paths() {
        let mut schedule = started();
        schedule.changed([p("a"), p("b")], Instant::now());
        schedule.overflowed(Instant::now());
        schedule.changed([p("c")], Instant::now());
        let (waited, due) = run_to_deadline(&mut schedule).await;
        assert_eq!(waited, DEBOUNCE);
        assert_eq!(due, Some(Due::Full));
        assert_eq!(schedule.next(Instant::now()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn too_many_paths_become_a_full_rescan() {
        let mut schedule = started();
        schedule.changed((0..=MAX_PATHS).map(|n| p(&format!("f{n}"))), Instant::now());
        let (_, due) = run_to_deadline(&mut schedule).await;
        assert_eq!(due, Some(Due::Full));
    }

    #[tokio::test(start_paused = true)]
    async fn degraded_watches_rescan_every_period_and_stop_when_recovered() {
        let mut schedule = started();
        let start = Instant::now();
        schedule.set_degraded(true, Instant::now());
        let mut at = Vec::new();
        for _ in 0..3 {
            let (_, due) = run_to_deadline(&mut schedule).await;
            assert_eq!(due, Some(Due::Full));
            at.push(start.elapsed());
        }
        assert_eq!(
            at,
            [1, 2, 3].map(|n| PERIODIC_RESCAN * n),
            "one full rescan per period"
        );
        // An event's batch in between is itself a full rescan, which restarts the period.
        tokio::time::advance(Duration::from_millis(500)).await;
        schedule.overflowed(Instant::now());
        let (waited, due) = run_to_deadline(&mut schedule).await;
        assert_eq!((waited, due), (DEBOUNCE, Some(Due::Full)));
        let (waited, due) = run_to_deadline(&mut schedule).await;
        assert_eq!((waited, due), (PERIODIC_RESCAN, Some(Due::Full)));
        schedule.set_degraded(false, Instant::now());
        assert_eq!(
            schedule.deadline(),
            None,
            "recovered: no more periodic rescans"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn offline_changes_are_counted_and_found_by_a_full_rescan_at_reconnect() {
        let mut schedule = started();
        schedule.set_degraded(true, Instant::now());
        schedule.set_connected(false, Instant::now());
        schedule.changed([p("a"), p("b")], Instant::now());
        schedule.remote_changed();
        assert_eq!(schedule.deadline(), None, "nothing is due while offline");
        tokio::time::advance(PERIODIC_RESCAN * 3).await;
        assert_eq!(schedule.next(Instant::now()), None);
        assert_eq!(schedule.pending(), (2, false));
        schedule.set_connected(true, Instant::now());
        assert_eq!(schedule.next(Instant::now()), Some(Due::Pull));
        // Not the paths seen offline: a full rescan.
        assert_eq!(schedule.next(Instant::now()), Some(Due::Full));
        assert_eq!(schedule.next(Instant::now()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_and_retry_as_full_rescans() {
        let mut schedule = started();
        let mut waits = Vec::new();
        schedule.changed([p("a")], Instant::now());
        let (_, mut due) = run_to_deadline(&mut schedule).await;
        for _ in 0..7 {
            let due_now = due.expect("something was due");
            schedule.failed(&due_now, Instant::now());
            let (waited, next) = run_to_deadline(&mut schedule).await;
            assert_eq!(next, Some(Due::Full));
            waits.push(waited.as_secs());
            due = next;
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        schedule.pushed();
        schedule.failed(&Due::Pull, Instant::now());
        let (waited, next) = run_to_deadline(&mut schedule).await;
        assert_eq!((waited, next), (RETRY_MIN, Some(Due::Pull)));
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_due_before_the_relay_first_connects() {
        let mut schedule = Schedule::new(Instant::now(), false);
        assert_eq!(schedule.deadline(), None);
        assert_eq!(schedule.next(Instant::now()), None);
        tokio::time::advance(Duration::from_secs(60)).await;
        schedule.set_connected(true, Instant::now());
        assert_eq!(schedule.next(Instant::now()), Some(Due::Pull));
        assert_eq!(schedule.next(Instant::now()), Some(Due::Full));
    }
}
