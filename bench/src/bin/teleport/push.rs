//! `cloudctl --json teleport push ROOT --session S`, timed from the spawn to its exit, with
//! its progress lines timestamped as they arrive (cloudctl writes a line per progress
//! step; its stdout is line-buffered), so a report can say where the time went.

use std::io::BufRead as _;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use cloud_protocol::ipc::TeleportOutcome;
use cloudd_e2e::Home;
use serde_json::Value;

/// One push as cloudctl showed it.
#[derive(Debug, Clone)]
pub struct Pushed {
    /// From the spawn to the exit.
    pub wall: Duration,
    pub outcome: TeleportOutcome,
    /// Each progress phase (`scan`, `upload`, `commit`, `done`): first and last seen, from
    /// the spawn.
    pub phases: Vec<(String, Duration, Duration)>,
}

impl Pushed {
    /// When `phase` was first seen.
    pub fn first(&self, phase: &str) -> Option<Duration> {
        self.phases
            .iter()
            .find(|(p, _, _)| p == phase)
            .map(|(_, first, _)| *first)
    }

    /// From the first `commit` step to the first `done`: the relay's commit (which writes
    /// the version into the workspace) and its answer.
    pub fn commit(&self) -> Option<Duration> {
        Some(self.first("done")?.saturating_sub(self.first("commit")?))
    }

    /// The phases as `scan 0.32–0.91, upload 1.64–5.67, …, exit 8.36 s`.
    pub fn describe(&self) -> String {
        let mut text: Vec<String> = self
            .phases
            .iter()
            .map(|(phase, first, last)| {
                if last > first {
                    format!(
                        "{phase} {:.2}–{:.2}",
                        first.as_secs_f64(),
                        last.as_secs_f64()
                    )
                } else {
                    format!("{phase} {:.2}", first.as_secs_f64())
                }
            })
            .collect();
        text.push(format!("exit {:.2} s", self.wall.as_secs_f64()));
        text.join(", ")
    }
}

/// Runs the push and waits for it.
pub fn push(home: &Home, root: &Path, session: &str) -> anyhow::Result<Pushed> {
    let root = root.to_str().context("a UTF-8 root")?;
    let began = Instant::now();
    let mut child = home
        .cloudctl_command()
        .args(["--json", "teleport", "push", root, "--session", session])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn cloudctl")?;
    let stdout = child.stdout.take().context("cloudctl's stdout")?;
    let mut phases: Vec<(String, Duration, Duration)> = Vec::new();
    let mut outcome = None;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        let at = began.elapsed();
        let value: Value =
            serde_json::from_str(&line).with_context(|| format!("cloudctl printed {line:?}"))?;
        if let Some(phase) = value["progress"]["phase"].as_str() {
            match phases.last_mut() {
                Some((last, _, seen)) if last == phase => *seen = at,
                _ => phases.push((phase.to_owned(), at, at)),
            }
        } else {
            outcome = Some(serde_json::from_value::<TeleportOutcome>(value)?);
        }
    }
    let output = child.wait_with_output()?;
    let wall = began.elapsed();
    if !output.status.success() {
        bail!(
            "cloudctl teleport push failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(Pushed {
        wall,
        outcome: outcome.context("cloudctl printed no outcome")?,
        phases,
    })
}
