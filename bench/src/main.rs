//! `cloudd-bench`: the local socket's round-trip latency and the idle daemon's memory,
//! measured beside a raw Unix-socket baseline in the same run.
//!
//! It starts the real `cloudd` (built beside this binary: `cargo build --release
//! --workspace`) in a temp `CLOUDD_HOME`, and two echo servers ([`echo`]) in the same temp
//! dir. Then, in rounds, it runs every scenario: `ping` and `status`, with one client and
//! with `--clients` concurrent clients, over
//!
//! - the binary encoding through `cloudctl`'s `Client` (what `cloudctl` does),
//! - the binary encoding on a blocking socket (the same bytes without the client's tokio
//!   runtime: it tells the client's cost apart from the daemon's),
//! - the JSON-RPC encoding on a blocking socket (what an editor does),
//! - and, for each encoding and request, the echo servers with the same request and reply
//!   sizes.
//!
//! One-client scenarios run in each `--placements` ([`affinity`]): unpinned, both ends on
//! one core, and the two ends on two cores (the daemon's threads, the echo server's
//! connection thread and the client thread are pinned with `sched_setaffinity`). The
//! concurrent scenarios run unpinned.
//!
//! Each round runs the scenarios one after another in that interleaved order, so slow
//! phases of a noisy machine spread over all of them; samples are pooled over rounds.
//! Finally it prints a Markdown table of p50/p99 and the ratio to the threaded echo, the
//! daemon's RSS after start and after the load, and whether the targets hold.

mod affinity;
mod echo;
mod load;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use cloudd_e2e::{Home, JsonClient};
use serde_json::json;

use affinity::Placement;
use cloudd_bench::machine::{describe, loadavg};
use cloudd_bench::stats::Samples;
use load::{Blocking, Req, Target};

/// The latency target: the daemon's p50 within this factor of the raw echo's.
const LATENCY_TARGET_RATIO: f64 = 2.0;

/// The memory target for the idle daemon.
const RSS_TARGET_KIB: u64 = 16 * 1024;

/// Measures cloudd's local-socket round trips beside a raw Unix-socket echo, and its RSS.
#[derive(Debug, Parser)]
#[command(name = "cloudd-bench")]
struct Args {
    /// Measured round trips per scenario and round with one client.
    #[arg(long, default_value_t = 3000)]
    iterations: usize,
    /// Measured round trips per client, scenario and round with concurrent clients.
    #[arg(long, default_value_t = 300)]
    concurrent_iterations: usize,
    /// Unmeasured round trips before each one-client scenario.
    #[arg(long, default_value_t = 500)]
    warmup: usize,
    /// Unmeasured round trips per client before each concurrent scenario.
    #[arg(long, default_value_t = 50)]
    concurrent_warmup: usize,
    /// Placements of the one-client scenarios (concurrent ones are always unpinned).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_values_t = [Placement::Unpinned, Placement::SameCore, Placement::CrossCore]
    )]
    placements: Vec<Placement>,
    /// Concurrent clients, each on its own connection and thread.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Rounds over all scenarios; samples are pooled over rounds. Many short rounds spread
    /// the machine's slow spells evenly over the scenarios.
    #[arg(long, default_value_t = 6)]
    rounds: usize,
}

/// An encoding of the daemon's protocol, which fixes the baseline's message sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Encoding {
    /// u32-LE length + postcard frames.
    Binary,
    /// Newline-delimited JSON-RPC 2.0.
    Json,
}

/// Who serves a scenario, and how the client talks to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// Echo, a blocking thread per connection, with `Encoding`'s sizes: the baseline.
    EchoThreads(Encoding),
    /// Echo, one current-thread tokio runtime, with `Encoding`'s sizes.
    EchoTokio(Encoding),
    /// The daemon through `cloudctl`'s client.
    Cloudctl,
    /// The daemon, binary frames on a blocking socket.
    Binary,
    /// The daemon, JSON-RPC on a blocking socket.
    Json,
}

impl Kind {
    /// Every kind, in the order of the table: each encoding's baselines before it.
    const ALL: [Kind; 7] = [
        Kind::EchoThreads(Encoding::Binary),
        Kind::EchoTokio(Encoding::Binary),
        Kind::Cloudctl,
        Kind::Binary,
        Kind::EchoThreads(Encoding::Json),
        Kind::EchoTokio(Encoding::Json),
        Kind::Json,
    ];

    fn position(kind: Kind) -> usize {
        Kind::ALL
            .iter()
            .position(|&k| k == kind)
            .expect("every kind is in ALL")
    }

    fn encoding(self) -> Encoding {
        match self {
            Kind::EchoThreads(encoding) | Kind::EchoTokio(encoding) => encoding,
            Kind::Cloudctl | Kind::Binary => Encoding::Binary,
            Kind::Json => Encoding::Json,
        }
    }

    fn is_daemon(self) -> bool {
        matches!(self, Kind::Cloudctl | Kind::Binary | Kind::Json)
    }

    fn label(self) -> &'static str {
        match self {
            Kind::EchoThreads(_) => "raw echo, thread per connection (baseline)",
            Kind::EchoTokio(_) => "raw echo, tokio current-thread",
            Kind::Cloudctl => "cloudd binary, cloudctl Client",
            Kind::Binary => "cloudd binary, blocking socket",
            Kind::Json => "cloudd JSON-RPC, blocking socket",
        }
    }
}

/// One row of the table: clients, placement, request, and the index of the kind in
/// [`Kind::ALL`] (so rows sort in table order).
type Key = (usize, Placement, Req, usize);

/// Request and reply sizes, in bytes, of one encoding and request.
type Sizes = BTreeMap<(Encoding, Req), (usize, usize)>;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.iterations == 0
        || args.concurrent_iterations == 0
        || args.rounds == 0
        || args.clients == 0
    {
        bail!("--iterations, --concurrent-iterations, --rounds and --clients must be at least 1");
    }
    affinity::init().context("read this process's CPU affinity")?;
    let mut placements = args.placements.clone();
    placements.sort();
    placements.dedup();
    for placement in &placements {
        if !placement.possible() {
            bail!(
                "placement {} needs more CPUs than this process may use ({:?})",
                placement.label(),
                affinity::allowed()
            );
        }
    }
    let load_before = loadavg();

    let home = Home::new();
    let daemon = home.spawn_daemon();
    let pid = daemon.pid();
    eprintln!("cloudd pid {pid}, socket {}", home.paths.socket.display());
    std::thread::sleep(Duration::from_millis(300));
    let rss_started = memory(pid)?;

    let echo_threads = home.path().join("echo-threads.sock");
    let echo_tokio = home.path().join("echo-tokio.sock");
    echo::spawn_threaded(&echo_threads).context("start the threaded echo server")?;
    echo::spawn_tokio(&echo_tokio).context("start the tokio echo server")?;

    let sizes = probe_sizes(&home.paths.socket, &args)?;

    let began = Instant::now();
    let mut results: BTreeMap<Key, Samples> = BTreeMap::new();
    let mut groups: Vec<(usize, Placement)> = placements.iter().map(|&p| (1, p)).collect();
    if args.clients > 1 {
        groups.push((args.clients, Placement::Unpinned));
    }
    for round in 1..=args.rounds {
        for &(clients, placement) in &groups {
            let (warmup, iterations) = if clients == 1 {
                (args.warmup, args.iterations)
            } else {
                (args.concurrent_warmup, args.concurrent_iterations)
            };
            let server_cpu = placement.server_cpu();
            affinity::pin_process(pid, server_cpu).context("pin the daemon")?;
            for req in [Req::Ping, Req::Status] {
                for (position, kind) in Kind::ALL.into_iter().enumerate() {
                    let (request_len, response_len) = sizes[&(kind.encoding(), req)];
                    let target = match kind {
                        Kind::EchoThreads(_) => Target::Echo {
                            socket: echo_threads.clone(),
                            request_len,
                            response_len,
                            server_cpu,
                        },
                        Kind::EchoTokio(_) => Target::Echo {
                            socket: echo_tokio.clone(),
                            request_len,
                            response_len,
                            server_cpu,
                        },
                        Kind::Cloudctl => Target::Cloudctl {
                            paths: home.paths.clone(),
                            req,
                        },
                        Kind::Binary => Target::Binary {
                            socket: home.paths.socket.clone(),
                            req,
                        },
                        Kind::Json => Target::Json {
                            socket: home.paths.socket.clone(),
                            req,
                        },
                    };
                    let what = || {
                        format!(
                            "{:>2} clients {:<10} {:<6} {}",
                            clients,
                            placement.label(),
                            req.name(),
                            kind.label()
                        )
                    };
                    let run =
                        load::run(&target, clients, placement.client_cpu(), warmup, iterations)
                            .with_context(what)?;
                    eprintln!(
                        "round {round}/{}: {:<80} {:>8.1} ms",
                        args.rounds,
                        what(),
                        run.wall.as_secs_f64() * 1000.0
                    );
                    results
                        .entry((clients, placement, req, position))
                        .or_default()
                        .add_round(run.nanos, run.wall);
                }
            }
        }
    }
    affinity::pin_process(pid, None).context("unpin the daemon")?;
    let load_elapsed = began.elapsed();
    for samples in results.values_mut() {
        samples.finish();
    }

    wait_for_idle(&home.paths.socket)?;
    std::thread::sleep(Duration::from_millis(500));
    let rss_after = memory(pid)?;
    let load_after = loadavg();

    print_report(&Report {
        args: &args,
        sizes: &sizes,
        results: &results,
        rss_started,
        rss_after,
        load_before,
        load_after,
        load_elapsed,
    });
    drop(daemon);
    Ok(())
}

/// Measures the request and reply sizes of each encoding and request with a real daemon,
/// using the ids a one-client run's measured phase is in the middle of.
fn probe_sizes(socket: &Path, args: &Args) -> anyhow::Result<Sizes> {
    let socket: PathBuf = socket.to_owned();
    let id = 1 + args.warmup as u64 + args.iterations as u64 / 2;
    let mut sizes = Sizes::new();
    for req in [Req::Ping, Req::Status] {
        for encoding in [Encoding::Binary, Encoding::Json] {
            let mut connection = match encoding {
                Encoding::Binary => Blocking::binary(&socket, req)?,
                Encoding::Json => Blocking::json(&socket, req)?,
            };
            connection.set_next_id(id);
            let (_, request_len, response_len) = connection.round_trip_sized()?;
            sizes.insert((encoding, req), (request_len, response_len));
        }
    }
    Ok(sizes)
}

/// Waits until the daemon counts one client: the one asking.
fn wait_for_idle(socket: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut client = JsonClient::connect(socket)?;
        client.hello()?;
        let reply = client.call("status", json!(null))?;
        if reply["result"]["clients"] == 1 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the daemon still counts clients after the load: {reply}");
        }
        drop(client);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A process's resident memory, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy)]
struct Memory {
    /// VmRSS, KiB.
    rss_kib: u64,
    /// VmHWM (peak RSS), KiB.
    hwm_kib: u64,
}

fn memory(pid: u32) -> anyhow::Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        let kib = line.trim().trim_end_matches("kB").trim();
        kib.parse().with_context(|| format!("bad {name} {line:?}"))
    };
    Ok(Memory {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
    })
}

/// Everything the report shows.
struct Report<'a> {
    args: &'a Args,
    sizes: &'a Sizes,
    results: &'a BTreeMap<Key, Samples>,
    rss_started: Memory,
    rss_after: Memory,
    load_before: String,
    load_after: String,
    load_elapsed: Duration,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn print_report(report: &Report<'_>) {
    let args = report.args;
    println!("# cloudd local socket benchmark");
    println!();
    println!("{}", describe(&report.load_before, &report.load_after));
    println!(
        "settings: --iterations {} --concurrent-iterations {} --warmup {} --concurrent-warmup {} --clients {} --rounds {} ({:.1} s of load)",
        args.iterations,
        args.concurrent_iterations,
        args.warmup,
        args.concurrent_warmup,
        args.clients,
        args.rounds,
        report.load_elapsed.as_secs_f64()
    );
    println!(
        "daemon: cloudd on its current-thread tokio runtime; clients: one OS thread and one connection each, \
         closed loop (one request in flight per client)"
    );
    let cpus_allowed = affinity::allowed();
    println!(
        "placement (1 client): unpinned = scheduler's choice; same core = client and server on CPU {}; \
         cross core = client on CPU {}, server on CPU {}; {} clients: unpinned",
        cpus_allowed.first().map_or("-".into(), |c| c.to_string()),
        cpus_allowed.first().map_or("-".into(), |c| c.to_string()),
        cpus_allowed.get(1).map_or("-".into(), |c| c.to_string()),
        args.clients
    );
    println!(
        "baseline: raw Unix-socket echo with the same request/reply sizes, a blocking std thread per connection; \
         also shown: the same echo on one current-thread tokio runtime"
    );
    println!();
    println!(
        "| clients | placement | request | server / client | bytes req/reply | samples | p50 µs | p99 µs | p50 ÷ echo p50 | p50 ÷ tokio echo p50 | req/s |"
    );
    println!("|--:|---|---|---|--:|--:|--:|--:|--:|--:|--:|");
    let mut verdicts = Vec::new();
    for (&(clients, placement, req, position), samples) in report.results {
        let kind = Kind::ALL[position];
        let (request_len, response_len) = report.sizes[&(kind.encoding(), req)];
        let baseline = &report.results[&(
            clients,
            placement,
            req,
            Kind::position(Kind::EchoThreads(kind.encoding())),
        )];
        let tokio_echo = &report.results[&(
            clients,
            placement,
            req,
            Kind::position(Kind::EchoTokio(kind.encoding())),
        )];
        let p50 = samples.percentile_us(50.0);
        let ratio = p50 / baseline.percentile_us(50.0);
        let tokio_ratio = p50 / tokio_echo.percentile_us(50.0);
        println!(
            "| {clients} | {} | {} | {} | {request_len}/{response_len} | {} | {p50:.1} | {:.1} | {ratio:.2} | {tokio_ratio:.2} | {:.0} |",
            placement.label(),
            req.name(),
            kind.label(),
            samples.len(),
            samples.percentile_us(99.0),
            samples.throughput()
        );
        if kind.is_daemon() {
            verdicts.push((clients, placement, req, kind, ratio));
        }
    }
    println!();
    println!(
        "daemon RSS after start: {:.1} MiB (peak {:.1} MiB)",
        mib(report.rss_started.rss_kib),
        mib(report.rss_started.hwm_kib)
    );
    println!(
        "daemon RSS after the load, clients gone: {:.1} MiB (peak during the run {:.1} MiB)",
        mib(report.rss_after.rss_kib),
        mib(report.rss_after.hwm_kib)
    );
    println!();
    println!(
        "targets: p50 ≤ {LATENCY_TARGET_RATIO}× the raw echo p50; idle RSS ≤ {} MiB",
        RSS_TARGET_KIB / 1024
    );
    for (clients, placement, req, kind, ratio) in verdicts {
        let verdict = if ratio <= LATENCY_TARGET_RATIO {
            "holds"
        } else {
            "MISSED"
        };
        println!(
            "  {verdict:<6}  {:<34} {:<6} {clients:>2} clients, {:<10}: {ratio:.2}×",
            kind.label(),
            req.name(),
            placement.label()
        );
    }
    for (when, memory) in [
        ("after start", report.rss_started),
        ("after load", report.rss_after),
    ] {
        let verdict = if memory.rss_kib <= RSS_TARGET_KIB {
            "holds"
        } else {
            "MISSED"
        };
        println!(
            "  {verdict:<6}  idle RSS {when}: {:.1} MiB",
            mib(memory.rss_kib)
        );
    }
}
