//! Waiting for a device login's approval: the client side of RFC 8628's polling. Wait the
//! interval, ask once, and again; a `slow_down` adds 5 seconds to the interval for good;
//! give up once the code has expired (the relay says so first, normally: this bounds the
//! wait if it cannot). The poll itself (one `login/device/poll` request) is the caller's.
//!
//! This module keeps no state and does no IO of its own.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// What a slow-down adds to the interval (RFC 8628, 3.5).
pub const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);

/// One poll's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Poll<T> {
    /// Not decided yet.
    Pending,
    /// Polled too soon: lengthen the interval.
    SlowDown,
    /// Approved.
    Done(T),
}

/// Why the wait ended without a login.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WaitError<E> {
    /// The code's lifetime (and one interval more) passed without an answer.
    #[error(
        "the login code expired before it was approved: run `cloudctl login --relay URL` again"
    )]
    Expired,
    /// A poll failed (denied, expired, the daemon or relay unreachable).
    #[error(transparent)]
    Poll(E),
}

/// Polls every `interval` (longer after each slow-down) until `poll` answers
/// [`Poll::Done`] or fails, or `expires_in` and one interval more have passed.
pub async fn wait_for_approval<T, E, F, Fut>(
    mut interval: Duration,
    expires_in: Duration,
    mut poll: F,
) -> Result<T, WaitError<E>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Poll<T>, E>>,
{
    let deadline = Instant::now() + expires_in;
    loop {
        if Instant::now() >= deadline + interval {
            return Err(WaitError::Expired);
        }
        tokio::time::sleep(interval).await;
        match poll().await.map_err(WaitError::Poll)? {
            Poll::Pending => {}
            Poll::SlowDown => interval += SLOW_DOWN_STEP,
            Poll::Done(done) => return Ok(done),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// Polls come one interval apart, a slow-down lengthens every later interval by 5 s,
    /// and approval ends the wait at once.
    #[tokio::test(start_paused = true)]
    async fn polls_wait_the_interval_and_slow_down_for_good() {
        let start = Instant::now();
        let times = RefCell::new(Vec::new());
        let answers = RefCell::new(vec![
            Poll::Pending,
            Poll::SlowDown,
            Poll::Pending,
            Poll::SlowDown,
            Poll::Done("tokens"),
        ]);
        let done = wait_for_approval(Duration::from_secs(5), Duration::from_secs(600), || async {
            times.borrow_mut().push(start.elapsed().as_secs());
            Ok::<_, ()>(answers.borrow_mut().remove(0))
        })
        .await;
        assert_eq!(done, Ok("tokens"));
        // 5, then 5 (slow down), then 10, then 10 (slow down), then 15.
        assert_eq!(*times.borrow(), [5, 10, 20, 30, 45]);
    }

    /// A code never approved ends the wait once its lifetime and one interval passed; a
    /// failed poll (denied) ends it at once.
    #[tokio::test(start_paused = true)]
    async fn an_unapproved_code_expires_and_a_denial_ends_the_wait() {
        let start = Instant::now();
        let polls = RefCell::new(0);
        let expired = wait_for_approval(Duration::from_secs(5), Duration::from_secs(60), || {
            *polls.borrow_mut() += 1;
            async { Ok::<Poll<()>, ()>(Poll::Pending) }
        })
        .await;
        assert_eq!(expired, Err(WaitError::Expired));
        assert_eq!(start.elapsed(), Duration::from_secs(65));
        assert_eq!(*polls.borrow(), 13);

        let denied = wait_for_approval(Duration::from_secs(5), Duration::from_secs(60), || async {
            Err::<Poll<()>, _>("denied")
        })
        .await;
        assert_eq!(denied, Err(WaitError::Poll("denied")));
    }
}
