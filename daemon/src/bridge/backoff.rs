//! Reconnect delays: exponential backoff with full jitter (a uniformly random delay between
//! zero and an exponentially growing ceiling), so many daemons that lost the same relay do
//! not come back in lockstep.

use std::time::Duration;

/// The first ceiling.
pub const BASE: Duration = Duration::from_millis(250);
/// The largest ceiling.
pub const CAP: Duration = Duration::from_secs(30);

/// The state of a run of failed attempts.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// Failed attempts since the last success.
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

    /// The ceiling of the next delay.
    pub fn ceiling(&self) -> Duration {
        BASE.saturating_mul(1u32 << self.attempt.min(16)).min(CAP)
    }

    /// The delay before the next attempt: uniform in [0, ceiling], from `unit`, a random
    /// number in [0, 1).
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let delay = self.ceiling().mul_f64(unit.clamp(0.0, 1.0));
        self.attempt = self.attempt.saturating_add(1);
        delay
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

    #[test]
    fn ceilings_double_up_to_the_cap_and_reset() {
        let mut backoff = Backoff::new();
        let ceilings: Vec<u64> = (0..10)
            .map(|_| {
                let ceiling = backoff.ceiling();
                assert_eq!(backoff.next_delay(1.0), ceiling);
                ceiling.as_millis() as u64
            })
            .collect();
        assert_eq!(
            ceilings,
            [250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        assert_eq!(
            backoff.next_delay(0.0),
            Duration::ZERO,
            "full jitter reaches zero"
        );
        backoff.reset();
        assert_eq!(backoff.ceiling(), BASE);
    }

    /// The paused clock shows what a relay that refuses every attempt sees in ten minutes:
    /// a few dozen attempts, not a storm.
    #[tokio::test(start_paused = true)]
    async fn a_failing_relay_sees_few_attempts() {
        let start = tokio::time::Instant::now();
        let mut backoff = Backoff::new();
        let mut n_attempts = 0;
        while start.elapsed() < Duration::from_secs(600) {
            n_attempts += 1;
            tokio::time::sleep(backoff.next_delay(random_unit())).await;
        }
        // With a 30 s cap and uniform jitter the mean delay settles at 15 s: ~40 attempts.
        assert!(
            (20..=120).contains(&n_attempts),
            "{n_attempts} attempts in 10 minutes"
        );
    }
}
