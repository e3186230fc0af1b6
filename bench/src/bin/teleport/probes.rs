//! The probes of issue 9's points 1 and 3, each on a thread and a connection of its own:
//! `ping` every `ping_interval` (its round trip, point 1) and a message `send` with `wait`
//! every `send_gap` (until the relay took it, point 3), the same while idle and while a
//! push runs. Each sample keeps the moment it started, so a caller keeps only those that
//! fell wholly inside the push.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};

use crate::ipc::Connection;

/// One probe: when it started and how long it took.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: Instant,
    pub took: Duration,
}

impl Sample {
    /// Whether it started at or after `from` and ended by `to`.
    pub fn within(&self, from: Instant, to: Instant) -> bool {
        self.at >= from && self.at + self.took <= to
    }
}

/// What to probe with.
#[derive(Debug, Clone)]
pub struct Plan {
    pub ping_interval: Duration,
    /// The session messages go to, and how many at most.
    pub session: String,
    pub messages: usize,
    pub send_gap: Duration,
    /// Distinguishes this run's texts.
    pub label: &'static str,
}

/// Running probes.
#[derive(Debug)]
pub struct Probes {
    stop: Arc<AtomicBool>,
    pinger: JoinHandle<anyhow::Result<Vec<Sample>>>,
    sender: JoinHandle<anyhow::Result<Vec<Sample>>>,
}

impl Probes {
    /// Connects both probes and starts them.
    pub fn start(socket: &Path, plan: &Plan) -> anyhow::Result<Probes> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut ping = Connection::connect(socket)?;
        let mut send = Connection::connect(socket)?;
        // A first round trip of each before any is measured.
        ping.ping()?;
        let pinger = {
            let (stop, interval) = (Arc::clone(&stop), plan.ping_interval);
            std::thread::Builder::new()
                .name("ping-probe".into())
                .spawn(move || {
                    let mut samples = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let at = Instant::now();
                        let took = ping.ping()?;
                        samples.push(Sample { at, took });
                        std::thread::sleep(interval);
                    }
                    Ok(samples)
                })?
        };
        let sender = {
            let stop = Arc::clone(&stop);
            let plan = plan.clone();
            std::thread::Builder::new()
                .name("send-probe".into())
                .spawn(move || {
                    let mut samples = Vec::new();
                    for n in 0..plan.messages {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let at = Instant::now();
                        let took = send
                            .send_delivered(&plan.session, format!("{} probe {n:04}", plan.label))
                            .with_context(|| format!("message {n}"))?;
                        samples.push(Sample { at, took });
                        std::thread::sleep(plan.send_gap);
                    }
                    Ok(samples)
                })?
        };
        Ok(Probes {
            stop,
            pinger,
            sender,
        })
    }

    /// Whether the sender has sent all its messages.
    pub fn sender_done(&self) -> bool {
        self.sender.is_finished()
    }

    /// Stops both; returns the pings and the messages.
    pub fn stop(self) -> anyhow::Result<(Vec<Sample>, Vec<Sample>)> {
        self.stop.store(true, Ordering::Relaxed);
        let pings = self
            .pinger
            .join()
            .map_err(|_| anyhow!("the ping probe panicked"))??;
        let sends = self
            .sender
            .join()
            .map_err(|_| anyhow!("the send probe panicked"))??;
        Ok((pings, sends))
    }
}

/// Sorted nanoseconds of the samples within [from, to].
pub fn nanos_within(samples: &[Sample], from: Instant, to: Instant) -> Vec<u64> {
    let mut nanos: Vec<u64> = samples
        .iter()
        .filter(|s| s.within(from, to))
        .map(|s| s.took.as_nanos() as u64)
        .collect();
    nanos.sort_unstable();
    nanos
}
