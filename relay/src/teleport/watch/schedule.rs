//! When a workspace watch captures: a trailing debounce of the workspace's events, capped
//! so a steady stream of writes still makes versions, at most one capture per
//! [`MIN_INTERVAL`], periodic captures while the watcher is degraded, and a back-off after
//! a failed capture.
//!
//! Every capture scans the whole workspace through the session's index (only what changed
//! is read), so there is no list of changed paths to keep: an event, a lost event (an
//! overflow) and a newly watched directory all just make a capture due.
//!
//! Pure state on tokio's clock ([`Instant`]): the watch's task feeds it what happened and
//! asks what is due; tests drive it on a paused clock. This module must never touch the
//! file system or the snapshot store, and never sleeps itself.

use std::time::Duration;

use tokio::time::Instant;

/// The trailing debounce: a capture starts once the workspace was quiet this long. An
/// agent's edit is a burst of events within a millisecond or two (write, close, rename);
/// 20 ms takes a multi-file edit of one tool call as one version and keeps an edit's way
/// back to the developer short (the daemon pushes local edits after 15 ms).
pub const DEBOUNCE: Duration = Duration::from_millis(20);

/// The longest a change waits under a steady stream of events (a formatter rewriting a
/// tree, a code generator): the debounce is trailing, but not forever.
pub const MAX_DELAY: Duration = Duration::from_millis(500);

/// The least time between the end of one capture and the start of the next: at most about
/// four versions a second per session, so an agent that writes every few milliseconds
/// makes a handful of versions and log entries, not thousands, and a workspace's scans
/// take at most a fraction of one core however long the stream lasts.
pub const MIN_INTERVAL: Duration = Duration::from_millis(250);

/// How often a degraded watch (the inotify watch limit reached, no watcher at all)
/// captures anyway: the workspace is never silently stale.
pub const PERIODIC: Duration = Duration::from_secs(2);

/// The first wait after a failed capture; it doubles up to [`RETRY_MAX`].
pub const RETRY_MIN: Duration = Duration::from_secs(1);
/// The longest wait after failed captures.
pub const RETRY_MAX: Duration = Duration::from_secs(30);

/// How long a new watch waits before its first capture (of what changed while nobody
/// watched), unless an event comes first. A watch starts when a version was just written
/// into the workspace, and every file written less than the index's racy slack
/// ([`cloud_tree::index::RACY_SLACK_NS`], 2 s) before a scan is hashed by that scan *and*
/// stays racy for the next: a capture at once hashed the whole freshly written workspace
/// (200 MB after a first push) twice, the first time while the push was still finishing.
/// After the slack it is hashed once, and later captures read only what changed.
pub const FIRST_CAPTURE: Duration = Duration::from_millis(2_500);

const _: () = assert!(FIRST_CAPTURE.as_nanos() > cloud_tree::index::RACY_SLACK_NS as u128);

/// A workspace watch's schedule.
#[derive(Debug)]
pub struct Schedule {
    /// Something changed since the last capture began.
    dirty: bool,
    /// The trailing debounce's end.
    quiet_at: Option<Instant>,
    /// When the pending change began (for [`MAX_DELAY`]).
    first_at: Option<Instant>,
    /// No capture before this ([`MIN_INTERVAL`] after the last, or a retry's back-off).
    not_before: Option<Instant>,
    /// The next periodic capture, while degraded.
    periodic_at: Option<Instant>,
    /// The wait after the next failure.
    retry_delay: Duration,
}

impl Schedule {
    /// A new watch's schedule: a capture is due after [`FIRST_CAPTURE`] (what changed while
    /// nobody watched), or [`DEBOUNCE`] after an event if one comes sooner. (The pending
    /// change counts as beginning then, so [`MAX_DELAY`] does not bring it forward.)
    pub fn new(now: Instant) -> Schedule {
        Schedule {
            dirty: true,
            quiet_at: Some(now + FIRST_CAPTURE),
            first_at: Some(now + FIRST_CAPTURE),
            not_before: None,
            periodic_at: None,
            retry_delay: RETRY_MIN,
        }
    }

    /// Something in the workspace changed (or may have: events were lost, a directory
    /// was watched only after things were made in it).
    pub fn changed(&mut self, now: Instant) {
        self.dirty = true;
        self.quiet_at = Some(now + DEBOUNCE);
        self.first_at.get_or_insert(now);
    }

    /// The watcher lost events for good (the watch limit) or recovered: while degraded, a
    /// capture is due every [`PERIODIC`].
    pub fn set_degraded(&mut self, degraded: bool, now: Instant) {
        match (degraded, self.periodic_at) {
            (true, None) => self.periodic_at = Some(now + PERIODIC),
            (false, Some(_)) => self.periodic_at = None,
            _ => {}
        }
    }

    /// When the next capture is due (`None`: only an event can make one due).
    pub fn deadline(&self) -> Option<Instant> {
        let batch = if self.dirty {
            match (self.quiet_at, self.first_at) {
                (Some(quiet), Some(first)) => Some(quiet.min(first + MAX_DELAY)),
                (quiet, _) => quiet,
            }
        } else {
            None
        };
        let at = batch.into_iter().chain(self.periodic_at).min()?;
        Some(self.not_before.map_or(at, |not_before| at.max(not_before)))
    }

    /// Whether a capture is due at `now`; if so, it is taken (the caller captures now and
    /// reports with [`Schedule::captured`]).
    pub fn take(&mut self, now: Instant) -> bool {
        if self.deadline().is_none_or(|at| at > now) {
            return false;
        }
        self.dirty = false;
        self.quiet_at = None;
        self.first_at = None;
        if self.periodic_at.is_some() {
            self.periodic_at = Some(now + PERIODIC);
        }
        true
    }

    /// The capture taken ended at `now`: the next one waits [`MIN_INTERVAL`], or after a
    /// failure is due again after the back-off.
    pub fn captured(&mut self, ok: bool, now: Instant) {
        if ok {
            self.retry_delay = RETRY_MIN;
            self.not_before = Some(now + MIN_INTERVAL);
        } else {
            self.dirty = true;
            self.quiet_at = Some(now);
            self.first_at.get_or_insert(now);
            self.not_before = Some(now + self.retry_delay);
            self.retry_delay = (self.retry_delay * 2).min(RETRY_MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sleeps (on the paused clock) until the deadline, and says whether a capture was
    /// due then, with how long it waited.
    async fn run_to_deadline(schedule: &mut Schedule) -> (Duration, bool) {
        let start = Instant::now();
        let deadline = schedule.deadline().expect("something is scheduled");
        tokio::time::sleep_until(deadline).await;
        (start.elapsed(), schedule.take(Instant::now()))
    }

    /// A schedule past its first capture, and past [`MIN_INTERVAL`] since.
    async fn started() -> Schedule {
        let mut schedule = Schedule::new(Instant::now());
        let (waited, due) = run_to_deadline(&mut schedule).await;
        assert_eq!((waited, due), (FIRST_CAPTURE, true), "a first capture");
        schedule.captured(true, Instant::now());
        assert_eq!(schedule.deadline(), None, "then nothing until an event");
        tokio::time::advance(MIN_INTERVAL).await;
        schedule
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_capture_waits_out_the_racy_slack_unless_an_event_comes() {
        let mut schedule = Schedule::new(Instant::now());
        tokio::time::advance(FIRST_CAPTURE - Duration::from_millis(1)).await;
        assert!(!schedule.take(Instant::now()), "not before FIRST_CAPTURE");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(schedule.take(Instant::now()), "due at FIRST_CAPTURE");

        let mut schedule = Schedule::new(Instant::now());
        tokio::time::advance(Duration::from_millis(100)).await;
        schedule.changed(Instant::now());
        let (waited, due) = run_to_deadline(&mut schedule).await;
        assert_eq!(
            (waited, due),
            (DEBOUNCE, true),
            "an event goes after the debounce"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_events_is_one_capture_debounce_after_the_last() {
        let mut schedule = started().await;
        let start = Instant::now();
        schedule.changed(Instant::now());
        for _ in 0..3 {
            tokio::time::advance(Duration::from_millis(10)).await;
            assert!(!schedule.take(Instant::now()), "not quiet yet");
            schedule.changed(Instant::now());
        }
        let (waited, due) = run_to_deadline(&mut schedule).await;
        assert!(due);
        assert_eq!(waited, DEBOUNCE, "trailing: DEBOUNCE after the last event");
        assert_eq!(start.elapsed(), Duration::from_millis(30) + DEBOUNCE);
        schedule.captured(true, Instant::now());
        assert_eq!(schedule.deadline(), None, "nothing left");
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_stream_makes_a_capture_every_max_delay_never_more_often_than_the_cap() {
        let mut schedule = started().await;
        let start = Instant::now();
        let mut captures = Vec::new();
        // An event every 5 ms for 3 s, each capture taking 40 ms.
        while start.elapsed() < Duration::from_secs(3) {
            schedule.changed(Instant::now());
            tokio::time::advance(Duration::from_millis(5)).await;
            if schedule.take(Instant::now()) {
                captures.push(start.elapsed());
                tokio::time::advance(Duration::from_millis(40)).await;
                schedule.captured(true, Instant::now());
            }
        }
        assert_eq!(captures[0], MAX_DELAY, "the first waits at most MAX_DELAY");
        for pair in captures.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(gap >= MIN_INTERVAL, "{captures:?}");
            assert!(gap <= MAX_DELAY + Duration::from_millis(45), "{captures:?}");
        }
        assert!(captures.len() >= 5, "{captures:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn sparse_edits_are_capped_at_one_capture_per_min_interval() {
        let mut schedule = started().await;
        let start = Instant::now();
        let mut captures = Vec::new();
        // One edit every 50 ms (quiet in between, so each would be its own capture).
        for _ in 0..40 {
            schedule.changed(Instant::now());
            for _ in 0..50 {
                tokio::time::advance(Duration::from_millis(1)).await;
                if schedule.take(Instant::now()) {
                    captures.push(start.elapsed());
                    schedule.captured(true, Instant::now());
                }
            }
        }
        assert_eq!(
            captures[0], DEBOUNCE,
            "an edit after a quiet spell goes at once"
        );
        for pair in captures.windows(2) {
            assert!(pair[1] - pair[0] >= MIN_INTERVAL, "{captures:?}");
        }
        // 2 s of edits: about one capture per MIN_INTERVAL, not forty.
        assert!((7..=9).contains(&captures.len()), "{captures:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_degraded_watch_captures_every_period_until_it_recovers() {
        let mut schedule = started().await;
        let start = Instant::now();
        schedule.set_degraded(true, Instant::now());
        let mut at = Vec::new();
        for _ in 0..3 {
            let (_, due) = run_to_deadline(&mut schedule).await;
            assert!(due);
            schedule.captured(true, Instant::now());
            at.push(start.elapsed());
        }
        assert_eq!(at, [1, 2, 3].map(|n| PERIODIC * n));
        // An event in between still goes after the debounce, and the period restarts.
        tokio::time::advance(Duration::from_millis(500)).await;
        schedule.changed(Instant::now());
        let (waited, due) = run_to_deadline(&mut schedule).await;
        assert_eq!((waited, due), (DEBOUNCE, true));
        schedule.captured(true, Instant::now());
        let (waited, due) = run_to_deadline(&mut schedule).await;
        assert_eq!((waited, due), (PERIODIC, true));
        schedule.captured(true, Instant::now());
        schedule.set_degraded(false, Instant::now());
        assert_eq!(schedule.deadline(), None, "recovered: no periodic captures");
    }

    #[tokio::test(start_paused = true)]
    async fn failed_captures_are_retried_with_a_back_off() {
        let mut schedule = started().await;
        schedule.changed(Instant::now());
        let (_, due) = run_to_deadline(&mut schedule).await;
        assert!(due);
        let mut waits = Vec::new();
        for _ in 0..7 {
            schedule.captured(false, Instant::now());
            // Events meanwhile do not hurry the retry.
            schedule.changed(Instant::now());
            let (waited, due) = run_to_deadline(&mut schedule).await;
            assert!(due);
            waits.push(waited.as_secs());
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        schedule.captured(true, Instant::now());
        schedule.changed(Instant::now());
        schedule.captured(false, Instant::now());
        let (waited, _) = run_to_deadline(&mut schedule).await;
        assert_eq!(waited, RETRY_MIN, "a success resets the back-off");
    }
}
