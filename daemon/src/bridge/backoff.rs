//! Reconnect delays, on two schedules chosen by how far the failed attempt got:
//!
//! - **Nothing listened** (the TCP connection was refused): the relay process is simply not
//!   there (restarting, or down), and a refused connection costs it nothing. The bridge
//!   tries again after a short jittered delay, uniform in [[`QUICK_MIN`], [`QUICK_MAX`]],
//!   which does not grow: however long the outage, the bridge is back within about
//!   [`QUICK_MAX`] of the relay listening again.
//! - **Anything else** (timeouts, TLS or HTTP failures such as a proxy's 5xx, a registration
//!   refused for now, a connection lost): something answered and failed, and may be
//!   overloaded. Exponential backoff with full jitter (a uniformly random delay between
//!   zero and a ceiling doubling from [`BASE`] to [`CAP`]), so a failing relay sees few
//!   attempts and daemons that lost the same relay do not come back in lockstep.
//!
//! The herd that a relay back from a long outage meets is spread over [`QUICK_MAX`]; the
//! daemons whose registration it cannot take in time fall onto the exponential schedule,
//! which spreads them further. Quick failures leave the exponential ceiling where it was:
//! only a registered connection resets it.
//!
//! This module computes delays; it never sleeps or connects (the bridge does).

use std::time::Duration;

/// The first ceiling of the exponential schedule.
pub const BASE: Duration = Duration::from_millis(250);
/// The largest ceiling of the exponential schedule: the longest the bridge ever waits.
pub const CAP: Duration = Duration::from_secs(10);
/// The shortest delay after an attempt that found nothing listening.
pub const QUICK_MIN: Duration = Duration::from_millis(250);
/// The longest delay after an attempt that found nothing listening.
pub const QUICK_MAX: Duration = Duration::from_secs(1);

/// How far a failed attempt got, which picks the schedule of the next delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The TCP connection was refused: nothing listens at the relay's address.
    NothingListening,
    /// Anything else: something answered (or did not answer in time) and failed.
    Failed,
}

/// The state of a run of failed attempts.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// Failed attempts on the exponential schedule since the last success.
    attempt: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    /// A fresh run.
    pub fn new() -> Backoff {
        Backoff { attempt: 0 }
    }

    /// A connection succeeded: the next failure starts from the base again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The ceiling of the next delay on the exponential schedule.
    pub fn ceiling(&self) -> Duration {
        BASE.saturating_mul(1u32 << self.attempt.min(16)).min(CAP)
    }

    /// The delay before the next attempt after `failure`, from `unit`, a random number in
    /// [0, 1): uniform in [`QUICK_MIN`, `QUICK_MAX`] when nothing listened, else uniform
    /// in [0, ceiling] (and the ceiling doubles).
    pub fn next_delay(&mut self, failure: Failure, unit: f64) -> Duration {
        let unit = unit.clamp(0.0, 1.0);
        match failure {
            Failure::NothingListening => QUICK_MIN + (QUICK_MAX - QUICK_MIN).mul_f64(unit),
            Failure::Failed => {
                let delay = self.ceiling().mul_f64(unit);
                self.attempt = self.attempt.saturating_add(1);
                delay
            }
        }
    }
}

/// A random number in [0, 1) from the OS.
pub fn random_unit() -> f64 {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the OS random source works");
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    /// A small seeded generator (splitmix64), so the simulated outages are the same every run.
    struct Seeded(u64);

    impl Seeded {
        fn unit(&mut self) -> f64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    #[test]
    fn ceilings_double_up_to_the_cap_and_reset() {
        let mut backoff = Backoff::new();
        let ceilings: Vec<u64> = (0..8)
            .map(|_| {
                let ceiling = backoff.ceiling();
                assert_eq!(backoff.next_delay(Failure::Failed, 1.0), ceiling);
                ceiling.as_millis() as u64
            })
            .collect();
        assert_eq!(ceilings, [250, 500, 1000, 2000, 4000, 8000, 10000, 10000]);
        assert_eq!(
            backoff.next_delay(Failure::Failed, 0.0),
            Duration::ZERO,
            "full jitter reaches zero"
        );
        backoff.reset();
        assert_eq!(backoff.ceiling(), BASE);
    }

    #[test]
    fn nothing_listening_retries_on_a_short_schedule_that_never_grows() {
        let mut backoff = Backoff::new();
        backoff.next_delay(Failure::Failed, 1.0);
        backoff.next_delay(Failure::Failed, 1.0);
        let ceiling = backoff.ceiling();
        assert_eq!(
            backoff.next_delay(Failure::NothingListening, 0.0),
            QUICK_MIN
        );
        assert_eq!(
            backoff.next_delay(Failure::NothingListening, 1.0),
            QUICK_MAX
        );
        for _ in 0..1000 {
            let delay = backoff.next_delay(Failure::NothingListening, random_unit());
            assert!((QUICK_MIN..=QUICK_MAX).contains(&delay), "{delay:?}");
        }
        assert_eq!(
            backoff.ceiling(),
            ceiling,
            "refused connections leave the exponential schedule where it was"
        );
    }

    /// The bridge's loop, on the paused clock, against a relay process that is gone for
    /// `outage` and then listens again: every attempt before that is refused. Returns how
    /// long after the relay listens again the bridge's next attempt comes.
    async fn reconnect_lag(outage: Duration, rng: &mut Seeded) -> Duration {
        let down = Instant::now();
        let mut backoff = Backoff::new();
        // The connection just broke: the first attempt comes after the exponential base.
        let mut delay = backoff.next_delay(Failure::Failed, rng.unit());
        loop {
            tokio::time::sleep(delay).await;
            if down.elapsed() >= outage {
                return down.elapsed() - outage;
            }
            delay = backoff.next_delay(Failure::NothingListening, rng.unit());
        }
    }

    /// The measurement, with the real schedule on the paused clock: over 20 seeded
    /// outages of 1–60 s, the bridge tries again within a second of the relay listening
    /// (the benchmark `reconnect` measures the same with real processes).
    #[tokio::test(start_paused = true)]
    async fn a_relay_back_after_any_outage_is_tried_within_a_second() {
        let mut rng = Seeded(8);
        let mut lags = Vec::new();
        for _ in 0..20 {
            let outage = Duration::from_secs(1) + Duration::from_secs(59).mul_f64(rng.unit());
            lags.push(reconnect_lag(outage, &mut rng).await);
        }
        lags.sort();
        assert!(lags[lags.len() - 1] <= QUICK_MAX, "{lags:?}");
        assert!(
            lags[lags.len() / 2] < Duration::from_millis(600),
            "{lags:?}"
        );
    }

    /// A relay that answers and fails every attempt for ten minutes sees about a hundred
    /// attempts (the mean delay settles at half the cap), not a storm; a port where nothing
    /// listens is knocked on about twice a second.
    #[tokio::test(start_paused = true)]
    async fn a_failing_relay_sees_few_attempts() {
        for (failure, expected) in [
            (Failure::Failed, 80..=200),
            (Failure::NothingListening, 800..=2400),
        ] {
            let start = Instant::now();
            let mut backoff = Backoff::new();
            let mut n_attempts = 0;
            while start.elapsed() < Duration::from_secs(600) {
                n_attempts += 1;
                tokio::time::sleep(backoff.next_delay(failure, random_unit())).await;
            }
            assert!(
                expected.contains(&n_attempts),
                "{failure:?}: {n_attempts} attempts in 10 minutes"
            );
        }
    }
}
