//! Latency samples and their percentiles.
//!
//! Samples are round-trip times in nanoseconds, one per request, pooled over every client
//! and every round of a scenario. Percentiles use the nearest-rank method on the sorted
//! pool, so a reported figure is always one that was measured.

use std::time::Duration;

/// The round trips of one scenario, pooled over its clients and rounds.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    /// Round-trip times in nanoseconds (sorted once [`Samples::finish`] ran).
    nanos: Vec<u64>,
    /// Wall time of the measured phases, summed over rounds (for throughput).
    wall: Duration,
    /// Whether `nanos` is sorted.
    sorted: bool,
}

impl Samples {
    /// Adds one round's samples and the wall time that round's measured phase took.
    pub fn add_round(&mut self, nanos: Vec<u64>, wall: Duration) {
        self.nanos.extend(nanos);
        self.wall += wall;
        self.sorted = false;
    }

    /// Sorts the pool; call before asking for percentiles.
    pub fn finish(&mut self) {
        if !self.sorted {
            self.nanos.sort_unstable();
            self.sorted = true;
        }
    }

    /// Whether nothing was measured.
    pub fn is_empty(&self) -> bool {
        self.nanos.is_empty()
    }

    /// How many round trips were measured.
    pub fn len(&self) -> usize {
        self.nanos.len()
    }

    /// The `p`-th percentile (0 < p ≤ 100) in microseconds, by nearest rank.
    pub fn percentile_us(&self, p: f64) -> f64 {
        assert!(self.sorted, "percentile of unsorted samples");
        percentile_us(&self.nanos, p)
    }

    /// Completed round trips per second over the measured phases, all clients together.
    pub fn throughput(&self) -> f64 {
        if self.wall.is_zero() {
            return f64::NAN;
        }
        self.nanos.len() as f64 / self.wall.as_secs_f64()
    }
}

/// The `p`-th percentile (0 < p ≤ 100) of sorted nanoseconds, in microseconds, by nearest
/// rank; NaN when there are none.
pub fn percentile_us(sorted_nanos: &[u64], p: f64) -> f64 {
    if sorted_nanos.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted_nanos.len() as f64).ceil() as usize;
    sorted_nanos[rank.clamp(1, sorted_nanos.len()) - 1] as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut samples = Samples::default();
        samples.add_round(
            (1..=100).rev().map(|n| n * 1000).collect(),
            Duration::from_secs(1),
        );
        samples.finish();
        assert_eq!(samples.percentile_us(50.0), 50.0);
        assert_eq!(samples.percentile_us(99.0), 99.0);
        assert_eq!(samples.percentile_us(100.0), 100.0);
        assert_eq!(samples.throughput(), 100.0);
    }
}
