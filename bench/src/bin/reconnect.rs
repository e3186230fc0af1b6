//! `reconnect`: how long the bridge takes to come back after a relay outage (issue 8,
//! point 6).
//!
//! It starts a standalone `cloud-relay serve` on a fixed loopback port and the real
//! `cloudd` in a temp `CLOUDD_HOME`, logged in to it and subscribed to its `relay`
//! notifications (pushed as the bridge's state changes: no polling lag). Then, `--outages`
//! times: it kills the relay (SIGKILL), leaves it down for a duration drawn from
//! [`--min-secs`, `--max-secs`] (stratified, so the durations cover the whole range, in a
//! seeded random order), starts it again on the same port and data directory, and measures
//! from the moment its port accepts a TCP connection (probed every millisecond) to the
//! notification that the bridge is connected. It prints every outage, then the median,
//! p90 and max beside the bridge's backoff cap.
//!
//! Build with `cargo build --workspace` (or `--release`) and run `target/<profile>/reconnect`:
//! it uses the `cloudd`, `cloudctl` and `cloud-relay` beside it.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use cloudd::bridge::backoff;
use cloudd_bench::machine::{describe, loadavg};
use cloudd_bench::stats::percentile_us;
use cloudd_e2e::{Home, JsonClient, Relay};
use serde_json::json;

/// How long any one step (a state change, the relay listening) may take.
const STEP_DEADLINE: Duration = Duration::from_secs(60);

/// Measures the time from a relay accepting connections again to the bridge being connected.
#[derive(Debug, Parser)]
#[command(name = "reconnect")]
struct Args {
    /// How many outages.
    #[arg(long, default_value_t = 20)]
    outages: usize,
    /// The shortest outage, in seconds.
    #[arg(long, default_value_t = 1.0)]
    min_secs: f64,
    /// The longest outage, in seconds.
    #[arg(long, default_value_t = 60.0)]
    max_secs: f64,
    /// Seeds the outages' durations and order.
    #[arg(long, default_value_t = 8)]
    seed: u64,
}

/// A seeded generator (splitmix64): the same outages for the same seed.
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

/// `n` durations, one drawn uniformly from each of `n` equal slices of [min, max], shuffled.
fn outages(n: usize, min: f64, max: f64, rng: &mut Seeded) -> Vec<Duration> {
    let slice = (max - min) / n as f64;
    let mut durations: Vec<Duration> = (0..n)
        .map(|i| Duration::from_secs_f64(min + slice * (i as f64 + rng.unit())))
        .collect();
    for i in (1..n).rev() {
        let j = (rng.unit() * (i + 1) as f64) as usize;
        durations.swap(i, j.min(i));
    }
    durations
}

/// The bridge's states as the daemon pushes them, each with the moment it was read.
struct States(mpsc::Receiver<(Instant, String)>);

impl States {
    /// Subscribes to the daemon's `sessions` topic and reads its `relay` notifications on a
    /// thread of their own, so each is timed as it arrives.
    fn subscribe(home: &Home) -> anyhow::Result<States> {
        let mut client = JsonClient::connect(&home.paths.socket).context("connect to cloudd")?;
        client.hello().context("hello")?;
        let reply = client.call("subscribe", json!({"topics": ["sessions"]}))?;
        if reply.get("result").is_none() {
            bail!("subscribe failed: {reply}");
        }
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || loop {
            match client.recv() {
                Ok(Some(line)) if line["method"] == "relay" => {
                    let state = line["params"]["state"].as_str().unwrap_or("?").to_owned();
                    if tx.send((Instant::now(), state)).is_err() {
                        return;
                    }
                }
                Ok(Some(_)) => {}
                // The client's reads time out when nothing happens for a while: keep reading.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Ok(None) | Err(_) => return,
            }
        });
        Ok(States(rx))
    }

    /// The moment of the next state that satisfies `matches`.
    fn until(&self, what: &str, matches: impl Fn(&str) -> bool) -> anyhow::Result<Instant> {
        let end = Instant::now() + STEP_DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let (at, state) = self
                .0
                .recv_timeout(left)
                .with_context(|| format!("no {what} within {STEP_DEADLINE:?}"))?;
            if matches(&state) {
                return Ok(at);
            }
        }
    }
}

/// Starts the relay again and returns the moment its port first accepted a connection.
fn restart_and_time(relay: &mut Relay) -> anyhow::Result<Instant> {
    relay.spawn();
    let end = Instant::now() + STEP_DEADLINE;
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", relay.port)).is_ok() {
            return Ok(Instant::now());
        }
        if Instant::now() > end {
            bail!("cloud-relay did not listen within {STEP_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.outages == 0 || args.min_secs < 0.0 || args.max_secs < args.min_secs {
        bail!("need at least one outage and 0 <= --min-secs <= --max-secs");
    }
    let load_before = loadavg();
    let mut rng = Seeded(args.seed);
    let durations = outages(args.outages, args.min_secs, args.max_secs, &mut rng);

    // No rate limits: a herd of reconnects must measure the relay, not its limiter.
    let mut relay = Relay::start_with(&["--requests-per-second", "0", "--events-per-second", "0"]);
    let home = Home::new();
    let _daemon = home.spawn_daemon();
    let token = relay.token("bench", "bench");
    home.cloudctl_ok(&["login", "--relay", &relay.url(), "--token", &token]);
    home.wait_connected();
    let states = States::subscribe(&home)?;

    println!(
        "relay {} ({} outages of {}–{} s, seed {}); lag = relay accepting again → bridge connected",
        relay.url(),
        args.outages,
        args.min_secs,
        args.max_secs,
        args.seed
    );
    let mut lags_ns = Vec::new();
    for (n, outage) in durations.iter().enumerate() {
        relay.kill();
        let killed = Instant::now();
        states.until("disconnection", |state| state != "connected")?;
        std::thread::sleep(outage.saturating_sub(killed.elapsed()));
        let accepting = restart_and_time(&mut relay)?;
        let connected = states.until("reconnection", |state| state == "connected")?;
        let lag = connected.saturating_duration_since(accepting);
        println!(
            "outage {:>2}: down {:>6.2} s, reconnected {:>7.1} ms after the relay listened",
            n + 1,
            accepting.duration_since(killed).as_secs_f64(),
            lag.as_secs_f64() * 1000.0
        );
        lags_ns.push(lag.as_nanos() as u64);
    }
    lags_ns.sort_unstable();
    let ms = |p: f64| percentile_us(&lags_ns, p) / 1000.0;
    println!(
        "reconnect lag over {} outages: median {:.0} ms, p90 {:.0} ms, max {:.0} ms; backoff cap {:?} (nothing listening: {:?}–{:?})",
        lags_ns.len(),
        ms(50.0),
        ms(90.0),
        ms(100.0),
        backoff::CAP,
        backoff::QUICK_MIN,
        backoff::QUICK_MAX
    );
    println!("{}", describe(&load_before, &loadavg()));
    Ok(())
}
