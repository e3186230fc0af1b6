//! Rate limits: how fast one API key may call the relay. Two token buckets per key (every
//! access token exchanged from a key shares its key's buckets): one for requests (HTTP
//! requests, and the session requests a daemon makes on its bridge), one for the journaled
//! events a daemon streams on its bridge.
//!
//! A bucket holds at most `burst` tokens and gains `per_second` of them every second; a
//! request or an event takes one. An empty bucket says how long until the next token (HTTP
//! answers 429 with that as `Retry-After`) and until it is full again (a bridge asks its
//! daemon to pause that long, so the resend after the pause comes as a burst the bucket
//! takes whole instead of one event per pause).
//!
//! Time is tokio's clock, so the buckets are tested with a paused one. This module keeps
//! counts only: it never sees a token, and it never sleeps or answers anyone.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The default request rate of `cloud-relay serve`: per second, and the burst.
pub const DEFAULT_REQUESTS: Rate = Rate {
    per_second: 20,
    burst: 100,
};

/// The default journaled event rate of `cloud-relay serve`: per second, and the burst.
pub const DEFAULT_EVENTS: Rate = Rate {
    per_second: 200,
    burst: 1000,
};

/// Past this many keys with a bucket, full buckets (which are as good as new ones) are
/// forgotten, so the table does not grow with every key ever seen.
const PRUNE_ABOVE: usize = 4096;

/// A sustained rate with a burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Tokens gained per second (at least 1).
    pub per_second: u32,
    /// The most tokens a bucket holds (at least 1).
    pub burst: u32,
}

/// The relay's limits: `None` is unlimited (the embedded relay, which serves one user on
/// loopback).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// HTTP requests and bridge session requests, per API key.
    pub requests: Option<Rate>,
    /// Journaled bridge events, per API key.
    pub events: Option<Rate>,
}

impl Limits {
    /// No limits at all.
    pub const OFF: Limits = Limits {
        requests: None,
        events: None,
    };
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            requests: Some(DEFAULT_REQUESTS),
            events: Some(DEFAULT_EVENTS),
        }
    }
}

/// Over the limit: how long until the bucket has a token, and until it is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// Until one token is back.
    pub next_token: Duration,
    /// Until the bucket is full again.
    pub full: Duration,
}

/// One bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Its rate.
    rate: Rate,
    /// Tokens held at `updated` (fractional: refills are continuous).
    tokens: f64,
    /// When `tokens` was last brought up to date.
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: Rate, now: Instant) -> TokenBucket {
        TokenBucket {
            rate,
            tokens: f64::from(rate.burst.max(1)),
            updated: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        let burst = f64::from(self.rate.burst.max(1));
        self.tokens = (self.tokens + elapsed * f64::from(self.rate.per_second.max(1))).min(burst);
        self.updated = now;
    }

    /// Takes one token, or says how long until there is one.
    pub fn take(&mut self, now: Instant) -> Result<(), Limited> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        let per_second = f64::from(self.rate.per_second.max(1));
        let burst = f64::from(self.rate.burst.max(1));
        Err(Limited {
            next_token: Duration::from_secs_f64((1.0 - self.tokens) / per_second),
            full: Duration::from_secs_f64((burst - self.tokens) / per_second),
        })
    }

    /// Whether the bucket is full (as good as a new one).
    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= f64::from(self.rate.burst.max(1))
    }
}

/// The buckets of one kind, by API key.
#[derive(Debug)]
pub struct Limiter {
    /// The rate of every bucket (none: unlimited).
    rate: Option<Rate>,
    /// By key hash.
    buckets: Mutex<HashMap<String, TokenBucket>>,
}

impl Limiter {
    /// A limiter at `rate` (none: never limits).
    pub fn new(rate: Option<Rate>) -> Limiter {
        Limiter {
            rate,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token from `key`'s bucket, or says how long until there is one.
    pub fn take(&self, key: &str) -> Result<(), Limited> {
        let Some(rate) = self.rate else {
            return Ok(());
        };
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("limiter lock poisoned");
        if let Some(bucket) = buckets.get_mut(key) {
            return bucket.take(now);
        }
        if buckets.len() >= PRUNE_ABOVE {
            buckets.retain(|_, bucket| !bucket.is_full(now));
        }
        let mut bucket = TokenBucket::new(rate, now);
        let taken = bucket.take(now);
        buckets.insert(key.to_owned(), bucket);
        taken
    }
}

/// Both limiters of a relay.
#[derive(Debug)]
pub struct Limiters {
    /// HTTP requests and bridge session requests.
    pub requests: Limiter,
    /// Journaled bridge events.
    pub events: Limiter,
}

impl Limiters {
    /// The limiters for `limits`.
    pub fn new(limits: Limits) -> Limiters {
        Limiters {
            requests: Limiter::new(limits.requests),
            events: Limiter::new(limits.events),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: Rate = Rate {
        per_second: 50,
        burst: 50,
    };

    #[tokio::test(start_paused = true)]
    async fn a_full_bucket_takes_its_burst_then_refuses() {
        let mut bucket = TokenBucket::new(RATE, Instant::now());
        for _ in 0..50 {
            bucket.take(Instant::now()).unwrap();
        }
        let limited = bucket.take(Instant::now()).unwrap_err();
        assert_eq!(limited.next_token, Duration::from_millis(20));
        assert_eq!(limited.full, Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_come_back_at_the_rate_and_never_beyond_the_burst() {
        let mut bucket = TokenBucket::new(RATE, Instant::now());
        for _ in 0..50 {
            bucket.take(Instant::now()).unwrap();
        }
        // 100 ms at 50 per second: 5 tokens.
        tokio::time::advance(Duration::from_millis(100)).await;
        for _ in 0..5 {
            bucket.take(Instant::now()).unwrap();
        }
        assert!(bucket.take(Instant::now()).is_err());
        // An hour idle fills the bucket to its burst, no more.
        tokio::time::advance(Duration::from_secs(3600)).await;
        let mut taken = 0;
        while bucket.take(Instant::now()).is_ok() {
            taken += 1;
        }
        assert_eq!(taken, 50);
    }

    #[tokio::test(start_paused = true)]
    async fn over_any_window_a_bucket_admits_at_most_burst_plus_rate_times_the_window() {
        let mut bucket = TokenBucket::new(RATE, Instant::now());
        let start = Instant::now();
        let mut admitted = 0u32;
        // Someone trying every millisecond for ten seconds.
        for _ in 0..10_000 {
            if bucket.take(Instant::now()).is_ok() {
                admitted += 1;
            }
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        let seconds = Instant::now().duration_since(start).as_secs_f64();
        assert!(
            f64::from(admitted) <= 50.0 + 50.0 * seconds + 1.0,
            "{admitted}"
        );
        assert!(admitted >= 540, "{admitted}");
    }

    #[tokio::test(start_paused = true)]
    async fn each_key_has_its_own_bucket_and_no_limit_is_no_limit() {
        let limiter = Limiter::new(Some(Rate {
            per_second: 1,
            burst: 2,
        }));
        limiter.take("a").unwrap();
        limiter.take("a").unwrap();
        let limited = limiter.take("a").unwrap_err();
        assert_eq!(limited.next_token, Duration::from_secs(1));
        limiter.take("b").unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        limiter.take("a").unwrap();

        let unlimited = Limiter::new(None);
        for _ in 0..100_000 {
            unlimited.take("a").unwrap();
        }
    }
}
