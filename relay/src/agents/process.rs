//! Agent processes: starting one from the command its session's provider built, feeding
//! its stdin, reading its stdout and stderr, signalling its process group, and stopping it.
//!
//! Each agent runs in its own process group, so stopping it (SIGTERM to the group, then
//! SIGKILL after [`STOP_GRACE`]) also reaches whatever it started in that group. Its stdout
//! lines and its exit go to the core as [`AgentReport`]s tagged with a generation number,
//! so reports from an agent the core already stopped are recognised and dropped.
//!
//! This module never touches the store or a session's status: it reports, the core
//! decides. It never blocks the core either: stdin writes go through an unbounded channel
//! drained by a writer task, because the core must not wait on a slow agent.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::Command as ProcessCommand;
use tokio::sync::{mpsc, watch};
use tokio_util::task::TaskTracker;

/// How long a stopped agent gets to exit after SIGTERM before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(2);

/// The longest agent output line kept; a longer one is reported as truncated, because a
/// log entry must fit in one bridge message.
pub const MAX_AGENT_LINE: usize = 4 * 1024 * 1024;

/// What an agent's tasks tell the core.
#[derive(Debug)]
pub enum AgentReport {
    /// One line of the agent's stdout.
    Line {
        /// The session.
        session: String,
        /// Which agent of the session.
        generation: u64,
        /// The line, without its newline.
        line: String,
        /// Whether the line was longer than [`MAX_AGENT_LINE`] and was cut.
        truncated: bool,
    },
    /// The agent exited (its stdout is closed and every line was reported).
    Exited {
        /// The session.
        session: String,
        /// Which agent of the session.
        generation: u64,
        /// Its exit status and last stderr line, in words.
        reason: String,
    },
}

/// The agent could not be started.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configured command is empty.
    #[error("no agent command is configured")]
    NoCommand,
    /// The process could not be spawned.
    #[error("cannot start the agent `{program}`: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
}

/// A running agent, held by the core.
#[derive(Debug)]
pub struct AgentHandle {
    /// Distinguishes this agent's reports from an earlier one's.
    pub generation: u64,
    /// Bytes for its stdin (whole lines, each ending in a newline); dropping the sender
    /// closes its stdin.
    stdin: mpsc::UnboundedSender<Vec<u8>>,
    /// Its pid, which is also its process group id.
    pid: Option<u32>,
    /// Becomes true once the process has been reaped.
    exited: watch::Receiver<bool>,
}

impl AgentHandle {
    /// A sender for the agent's stdin, for writes made after the store is flushed: whole
    /// lines, each ending in a newline. Lines for a dead agent are dropped: its exit is
    /// reported separately.
    pub fn stdin(&self) -> mpsc::UnboundedSender<Vec<u8>> {
        self.stdin.clone()
    }

    /// Its pid, which is also its process group id (none if the platform gave none).
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Whether the process has been reaped.
    pub fn has_exited(&self) -> bool {
        *self.exited.borrow()
    }

    /// Stops the agent: closes its stdin, sends SIGTERM to its process group, and SIGKILL
    /// after [`STOP_GRACE`]. The returned future ends when the process has exited.
    pub fn stop(self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let AgentHandle {
            stdin,
            pid,
            mut exited,
            ..
        } = self;
        drop(stdin);
        let already_exited = *exited.borrow();
        if !already_exited {
            signal_group(pid, Signal::Terminate);
            // A paused (SIGSTOPped) agent acts on SIGTERM only once it runs again.
            signal_group(pid, Signal::Continue);
        }
        async move {
            let gone = tokio::time::timeout(STOP_GRACE, exited.wait_for(|e| *e))
                .await
                .is_ok();
            if !gone {
                signal_group(pid, Signal::Kill);
                let _ = exited.wait_for(|e| *e).await;
            }
        }
    }
}

/// A signal for an agent's whole process group.
#[derive(Debug, Clone, Copy)]
pub enum Signal {
    /// SIGTERM: exit.
    Terminate,
    /// SIGKILL.
    Kill,
    /// SIGSTOP: pause.
    Stop,
    /// SIGCONT: go on.
    Continue,
}

/// Sends `signal` to the process group `pid` leads (nothing without a pid).
#[cfg(unix)]
pub fn signal_group(pid: Option<u32>, signal: Signal) {
    let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) else {
        return;
    };
    let number = match signal {
        Signal::Terminate => libc::SIGTERM,
        Signal::Kill => libc::SIGKILL,
        Signal::Stop => libc::SIGSTOP,
        Signal::Continue => libc::SIGCONT,
    };
    // SAFETY: killpg only sends a signal; the group is the agent's own (it was started as
    // a group leader), and a group that no longer exists yields ESRCH, which is harmless.
    unsafe {
        libc::killpg(pid, number);
    }
}

/// Sends `signal` to the process group `pid` leads (nothing without a pid).
#[cfg(not(unix))]
pub fn signal_group(_pid: Option<u32>, _signal: Signal) {}

/// Starts an agent for `session` from `process` (the program, its arguments, working
/// directory and confinement, as the session's provider built it; see
/// [`crate::providers::Provider::command`]) and the tasks that serve it. The agent gets
/// piped stdio and a process group of its own. `program` names it in errors.
/// `core` is the core's command channel (any command type an [`AgentReport`] converts
/// into, so this module needs nothing of the core's).
pub fn spawn<C>(
    mut process: ProcessCommand,
    program: &str,
    session: &str,
    generation: u64,
    core: mpsc::Sender<C>,
    tracker: &TaskTracker,
) -> Result<AgentHandle, AgentError>
where
    C: From<AgentReport> + Send + 'static,
{
    process
        .env("CLOUD_SESSION_ID", session)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(false);
    #[cfg(unix)]
    process.process_group(0);
    let mut child = process.spawn().map_err(|source| AgentError::Spawn {
        program: program.to_owned(),
        source,
    })?;
    let pid = child.id();
    let (stdin_sender, mut stdin_receiver) = mpsc::unbounded_channel::<Vec<u8>>();
    let (exited_sender, exited) = watch::channel(false);

    if let Some(mut stdin) = child.stdin.take() {
        tracker.spawn(async move {
            while let Some(mut buffer) = stdin_receiver.recv().await {
                // Gather whatever else is ready so a burst costs one write.
                while let Ok(more) = stdin_receiver.try_recv() {
                    buffer.extend_from_slice(&more);
                }
                if stdin.write_all(&buffer).await.is_err() || stdin.flush().await.is_err() {
                    break;
                }
            }
        });
    }

    let last_stderr_line: Arc<Mutex<Option<String>>> = Arc::default();
    let stderr_task = child.stderr.take().map(|stderr| {
        let last = last_stderr_line.clone();
        let session = session.to_owned();
        tracker.spawn(async move {
            let mut reader = BufReader::new(stderr);
            while let Ok(Some((line, _))) = read_line_limited(&mut reader, 64 * 1024).await {
                let line = String::from_utf8_lossy(&line).trim_end().to_owned();
                tracing::debug!(%session, stderr = %line, "agent stderr");
                if !line.is_empty() {
                    *last.lock().unwrap() = Some(line);
                }
            }
        })
    });

    let stdout = child.stdout.take();
    let session = session.to_owned();
    tracker.spawn(async move {
        if let Some(stdout) = stdout {
            let mut reader = BufReader::new(stdout);
            while let Ok(Some((line, truncated))) =
                read_line_limited(&mut reader, MAX_AGENT_LINE).await
            {
                let line = String::from_utf8_lossy(&line).into_owned();
                let report = AgentReport::Line {
                    session: session.clone(),
                    generation,
                    line,
                    truncated,
                };
                if core.send(C::from(report)).await.is_err() {
                    break;
                }
            }
        }
        let status = child.wait().await;
        let _ = exited_sender.send(true);
        if let Some(task) = stderr_task {
            let _ = task.await;
        }
        let status = match status {
            Ok(status) => status.to_string(),
            Err(e) => format!("unknown status: {e}"),
        };
        let reason = match last_stderr_line.lock().unwrap().take() {
            Some(line) => format!("agent exited ({status}): {line}"),
            None => format!("agent exited ({status})"),
        };
        let _ = core
            .send(C::from(AgentReport::Exited {
                session,
                generation,
                reason,
            }))
            .await;
    });

    Ok(AgentHandle {
        generation,
        stdin: stdin_sender,
        pid,
        exited,
    })
}

/// Reads one line of at most `max` bytes (without its newline). A longer line is cut at
/// `max` and the rest skipped, so a peer that never sends a newline cannot make the reader
/// allocate without bound. Returns `None` at end of input.
pub async fn read_line_limited<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> std::io::Result<Option<(Vec<u8>, bool)>> {
    let mut line = Vec::new();
    let mut truncated = false;
    let mut read_any = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(read_any.then_some((line, truncated)));
        }
        read_any = true;
        let (chunk, found, used) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], true, i + 1),
            None => (available, false, available.len()),
        };
        let room = max.saturating_sub(line.len());
        if chunk.len() > room {
            truncated = true;
            line.extend_from_slice(&chunk[..room]);
        } else {
            line.extend_from_slice(chunk);
        }
        reader.consume(used);
        if found {
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(Some((line, truncated)));
        }
    }
}
