//! What the benchmark programs share: latency percentiles ([`stats`]) and a description
//! of the machine a run was made on ([`machine`]), so every report states both the same way.

pub mod machine;
pub mod stats;

/// The `cloud-relay serve` arguments of the relay a benchmark measures: no rate limits
/// (they would measure the limiter, not the bridge), and an agent that reads everything
/// and says nothing (no agent turns, no captures). `--agent-command` takes every argument
/// after it, so it goes last.
pub const QUIET_AGENT: &[&str] = &[
    "--requests-per-second",
    "0",
    "--events-per-second",
    "0",
    "--agent-command",
    "sh",
    "-c",
    "cat >/dev/null",
];
