//! The daemon's own health figures, kept in memory since it started: counters (events
//! queued, delivered, refused, sent again; connections registered; slow-downs), the
//! send→delivered latency as a histogram with fixed buckets, and whether (and until when)
//! the relay asks this daemon to slow down. `cloudctl metrics` shows them
//! ([`Metrics::snapshot`]); with `telemetry = true` in config.toml, and only then, the
//! bridge sends their increments as anonymous aggregates ([`Metrics::telemetry_report`]).
//!
//! Atomics, one mutex for the send times of events not yet acknowledged (bounded by
//! [`MAX_TIMED`]); no metrics crate. This module keeps counts only: it never sees a
//! token, a session id, a path or an event's content, and it never does IO.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cloud_protocol::bridge::{TelemetryReport, TELEMETRY_LATENCY_BUCKETS_MS as BOUNDS_MS};
use cloud_protocol::ipc::Histogram;
use tokio::time::Instant;

/// The most unacknowledged events whose send time is kept for the latency histogram: past
/// it (a relay away for long, a deep journal) new events are delivered uncounted by the
/// histogram rather than the daemon's memory growing with the journal.
pub const MAX_TIMED: usize = 100_000;

/// The counters, in [`TelemetryReport`]'s order.
#[derive(Debug, Clone, Copy)]
enum Counter {
    Sends,
    Deliveries,
    Refusals,
    Retries,
    Reconnects,
    SlowDowns,
}

/// The daemon's figures.
#[derive(Debug, Default)]
pub struct Metrics {
    /// See [`Counter`].
    counters: [AtomicU64; 6],
    /// Latencies per bucket of [`BOUNDS_MS`], and one above the last.
    latency: [AtomicU64; BOUNDS_MS.len() + 1],
    /// The latencies' sum and largest, in milliseconds.
    latency_sum_ms: AtomicU64,
    latency_max_ms: AtomicU64,
    /// When each unacknowledged event (by journal seq) was queued.
    queued_at: Mutex<BTreeMap<u64, Instant>>,
    /// Until when the relay asked this daemon to slow down, in ms since the Unix epoch
    /// (0: it did not, or that time has passed).
    rate_limited_until_ms: AtomicU64,
    /// Whether the user opted in to telemetry (`telemetry = true`).
    telemetry: AtomicBool,
    /// The counters and buckets as the last telemetry report left them.
    reported: Mutex<TelemetryReport>,
}

impl Metrics {
    fn add(&self, counter: Counter, n: u64) {
        self.counters[counter as usize].fetch_add(n, Ordering::Relaxed);
    }

    fn get(&self, counter: Counter) -> u64 {
        self.counters[counter as usize].load(Ordering::Relaxed)
    }

    /// A client queued journal event `seq`.
    pub fn queued(&self, seq: u64) {
        self.add(Counter::Sends, 1);
        let mut queued_at = self.queued_at.lock().expect("metrics lock poisoned");
        if queued_at.len() < MAX_TIMED {
            queued_at.insert(seq, Instant::now());
        }
    }

    /// The relay acknowledged everything up to `seq`, of which `n_delivered` events were
    /// delivered (not refused); `refused` says which seqs were refused (not timed).
    pub fn acknowledged(&self, seq: u64, n_delivered: u64, refused: impl Fn(u64) -> bool) {
        self.add(Counter::Deliveries, n_delivered);
        let done = {
            let mut queued_at = self.queued_at.lock().expect("metrics lock poisoned");
            let rest = queued_at.split_off(&(seq + 1));
            std::mem::replace(&mut *queued_at, rest)
        };
        let now = Instant::now();
        for (seq, at) in done {
            if !refused(seq) {
                self.observe(now.saturating_duration_since(at));
            }
        }
    }

    /// Records one send→delivered latency.
    fn observe(&self, latency: Duration) {
        let ms = latency.as_millis().min(u128::from(u64::MAX)) as u64;
        let bucket = BOUNDS_MS
            .iter()
            .position(|bound| ms <= *bound)
            .unwrap_or(BOUNDS_MS.len());
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_ms.fetch_add(ms, Ordering::Relaxed);
        self.latency_max_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// An event was refused (by the relay, or by the daemon for another relay).
    pub fn refused(&self) {
        self.add(Counter::Refusals, 1);
    }

    /// `n` journal events were sent to the relay again.
    pub fn retried(&self, n: u64) {
        self.add(Counter::Retries, n);
    }

    /// A connection to the relay registered.
    pub fn reconnected(&self) {
        self.add(Counter::Reconnects, 1);
    }

    /// The relay asked to slow down for `delay`.
    pub fn slowed_down(&self, delay: Duration) -> SystemTime {
        self.add(Counter::SlowDowns, 1);
        let until = SystemTime::now() + delay;
        let ms = until
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        self.rate_limited_until_ms.fetch_max(ms, Ordering::Relaxed);
        until
    }

    /// Until when the relay asks this daemon to slow down, if that is still ahead.
    pub fn rate_limited_until_ms(&self) -> Option<u64> {
        let until = self.rate_limited_until_ms.load(Ordering::Relaxed);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        (until > now).then_some(until)
    }

    /// Sets whether the user opted in to telemetry.
    pub fn set_telemetry(&self, enabled: bool) {
        self.telemetry.store(enabled, Ordering::Relaxed);
    }

    /// Whether the user opted in to telemetry.
    pub fn telemetry(&self) -> bool {
        self.telemetry.load(Ordering::Relaxed)
    }

    /// The counters as a report (totals since the daemon started).
    fn totals(&self) -> TelemetryReport {
        TelemetryReport {
            sends: self.get(Counter::Sends),
            deliveries: self.get(Counter::Deliveries),
            refusals: self.get(Counter::Refusals),
            retries: self.get(Counter::Retries),
            reconnects: self.get(Counter::Reconnects),
            slow_downs: self.get(Counter::SlowDowns),
            latency_buckets: self
                .latency
                .iter()
                .map(|count| count.load(Ordering::Relaxed))
                .collect(),
        }
    }

    /// What changed since the previous report (counts only), and marks it reported.
    pub fn telemetry_report(&self) -> TelemetryReport {
        let totals = self.totals();
        let mut reported = self.reported.lock().expect("metrics lock poisoned");
        let since = |now: u64, then: u64| now.saturating_sub(then);
        let report = TelemetryReport {
            sends: since(totals.sends, reported.sends),
            deliveries: since(totals.deliveries, reported.deliveries),
            refusals: since(totals.refusals, reported.refusals),
            retries: since(totals.retries, reported.retries),
            reconnects: since(totals.reconnects, reported.reconnects),
            slow_downs: since(totals.slow_downs, reported.slow_downs),
            latency_buckets: totals
                .latency_buckets
                .iter()
                .enumerate()
                .map(|(n, now)| since(*now, reported.latency_buckets.get(n).copied().unwrap_or(0)))
                .collect(),
        };
        *reported = totals;
        report
    }

    /// The figures as `metrics` answers them, with the gauges read by the caller.
    pub fn snapshot(
        &self,
        uptime_ms: u64,
        journal_depth: u64,
        clients: u32,
    ) -> cloud_protocol::ipc::Metrics {
        let totals = self.totals();
        cloud_protocol::ipc::Metrics {
            uptime_ms,
            sends: totals.sends,
            deliveries: totals.deliveries,
            refusals: totals.refusals,
            retries: totals.retries,
            reconnects: totals.reconnects,
            slow_downs: totals.slow_downs,
            journal_depth,
            clients,
            latency: histogram(
                &totals.latency_buckets,
                self.latency_sum_ms.load(Ordering::Relaxed),
                self.latency_max_ms.load(Ordering::Relaxed),
            ),
            rate_limited_until_ms: self.rate_limited_until_ms(),
            telemetry: self.telemetry(),
        }
    }
}

/// The histogram of `counts` (per bucket of [`BOUNDS_MS`], one more above), with its
/// percentiles as bucket bounds (`max_ms` for the bucket above the last bound).
fn histogram(counts: &[u64], sum_ms: u64, max_ms: u64) -> Histogram {
    let count: u64 = counts.iter().sum();
    let percentile = |q: f64| {
        if count == 0 {
            return None;
        }
        let rank = ((count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (n, bucket) in counts.iter().enumerate() {
            seen += bucket;
            if seen >= rank {
                return Some(
                    BOUNDS_MS
                        .get(n)
                        .copied()
                        .unwrap_or(max_ms)
                        .min(max_ms.max(1)),
                );
            }
        }
        Some(max_ms)
    };
    Histogram {
        bounds_ms: BOUNDS_MS.to_vec(),
        counts: counts.to_vec(),
        count,
        sum_ms,
        p50_ms: percentile(0.50),
        p99_ms: percentile(0.99),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn latencies_land_in_their_buckets_and_percentiles_follow() {
        let metrics = Metrics::default();
        for seq in 1..=100 {
            metrics.queued(seq);
        }
        tokio::time::advance(Duration::from_millis(3)).await;
        // 1..=98 delivered after 3 ms, 99 refused, 100 after 700 ms.
        metrics.acknowledged(99, 98, |seq| seq == 99);
        tokio::time::advance(Duration::from_millis(697)).await;
        metrics.acknowledged(100, 1, |_| false);
        let snapshot = metrics.snapshot(0, 0, 1);
        assert_eq!((snapshot.sends, snapshot.deliveries), (100, 99));
        assert_eq!(snapshot.latency.count, 99);
        assert_eq!(snapshot.latency.counts[2], 98, "{:?}", snapshot.latency);
        assert_eq!(snapshot.latency.p50_ms, Some(5));
        // In the 1 s bucket, and never above the largest latency seen.
        assert_eq!(snapshot.latency.p99_ms, Some(700));
        assert_eq!(snapshot.latency.counts[9], 1);
        assert_eq!(snapshot.latency.sum_ms, 98 * 3 + 700);
    }

    #[test]
    fn telemetry_reports_carry_what_changed_since_the_last_one() {
        let metrics = Metrics::default();
        metrics.queued(1);
        metrics.queued(2);
        assert_eq!(metrics.telemetry_report().sends, 2);
        metrics.queued(3);
        let report = metrics.telemetry_report();
        assert_eq!(report.sends, 1);
        assert_eq!(report.latency_buckets.len(), BOUNDS_MS.len() + 1);
        assert_eq!(metrics.telemetry_report().sends, 0);
    }
}
