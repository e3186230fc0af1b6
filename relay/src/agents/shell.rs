//! The built-in agent: every user message is a shell command, run after permission.
//!
//! It speaks stream-json on stdin/stdout like any agent. For each user message (in order;
//! messages that arrive while a command is pending or running wait in a queue) it asks
//! `control_request {subtype: can_use_tool, tool_name: "Bash", input: {command}}`, waits for
//! the matching `control_response`, and on allow runs `sh -c COMMAND` (or the allowed
//! `updatedInput.command`) in its working directory, in a new process group, streaming each
//! output line (stdout and stderr together) as an `assistant` message and ending with a
//! `result`. A deny ends with a `result` carrying the denial. An `interrupt` control request
//! kills the running command's process group (or withdraws a pending prompt) and is
//! answered with a success; any other control request gets an error response.
//!
//! Stdin is read by its own task, so an interrupt gets through while a command runs. This
//! module must never run a command that was not allowed.

use std::collections::VecDeque;
use std::io::BufRead as _;
use std::process::Stdio;

use cloud_protocol::agent::{self, CAN_USE_TOOL, INTERRUPT};
use serde_json::{json, Value};
use tokio::io::{AsyncWriteExt as _, BufReader};
use tokio::sync::mpsc;

use super::process::read_line_limited;

/// The longest input line read; longer ones are dropped.
const MAX_INPUT_LINE: usize = 16 * 1024 * 1024;

/// How much of stdin one read takes. Each read is a trip to a blocking thread, and the
/// relay writes a whole round's messages at once.
const STDIN_BUFFER: usize = 64 * 1024;

/// The shell agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ShellAgentError {
    /// Its runtime could not be built.
    #[error("cannot start the shell agent's runtime: {0}")]
    Runtime(std::io::Error),
    /// Stdout is gone (the relay went away).
    #[error("cannot write to stdout: {0}")]
    Stdout(std::io::Error),
    /// Signal handling could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Runs the shell agent on this process's stdin and stdout until stdin closes or SIGTERM.
///
/// It builds its own current-thread runtime, so call it from a plain `main` (a hidden
/// subcommand), never from inside a tokio runtime.
pub fn run() -> Result<(), ShellAgentError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ShellAgentError::Runtime)?;
    runtime.block_on(ShellAgent::default().run())
}

/// A user message whose content is text (any other line does not parse as one).
#[derive(serde::Deserialize)]
struct UserLine<'a> {
    /// The line's type: `user`.
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    /// The message.
    #[serde(borrow)]
    message: UserContent<'a>,
}

/// The message of a [`UserLine`].
#[derive(serde::Deserialize)]
struct UserContent<'a> {
    /// Its text.
    #[serde(borrow)]
    content: std::borrow::Cow<'a, str>,
}

/// What the agent is doing.
#[derive(Debug, Default)]
enum State {
    /// Waiting for a message.
    #[default]
    Idle,
    /// Waiting for the answer to a permission prompt.
    Asking {
        /// The prompt's id.
        request_id: String,
        /// The command asked about.
        command: String,
    },
    /// Running a command.
    Running(Running),
}

/// A running command.
#[derive(Debug)]
struct Running {
    /// The `sh` process, leader of its own process group.
    child: tokio::process::Child,
    /// Its output lines, from a reader thread; closed at end of output.
    output: mpsc::UnboundedReceiver<String>,
    /// Whether it was killed by an interrupt.
    interrupted: bool,
}

#[derive(Debug, Default)]
struct ShellAgent {
    /// Commands waiting their turn.
    queue: VecDeque<String>,
    /// The current one.
    state: State,
    /// Numbers permission prompts.
    n_prompts: u64,
}

impl ShellAgent {
    async fn run(mut self) -> Result<(), ShellAgentError> {
        // Lines go over in batches: every complete line a read brought in at once.
        let (input_sender, mut input) = mpsc::unbounded_channel::<Vec<String>>();
        tokio::spawn(async move {
            let mut stdin = BufReader::with_capacity(STDIN_BUFFER, tokio::io::stdin());
            let mut batch = Vec::new();
            while let Ok(Some((line, truncated))) =
                read_line_limited(&mut stdin, MAX_INPUT_LINE).await
            {
                if !truncated {
                    batch
                        .push(String::from_utf8(line).unwrap_or_else(|e| {
                            String::from_utf8_lossy(e.as_bytes()).into_owned()
                        }));
                }
                // More to take without waiting: only a line already in the buffer.
                if stdin.buffer().contains(&b'\n') {
                    continue;
                }
                if !batch.is_empty() && input_sender.send(std::mem::take(&mut batch)).is_err() {
                    break;
                }
            }
            if !batch.is_empty() {
                let _ = input_sender.send(batch);
            }
        });
        let mut terminate = signal_stream()?;
        let mut stdout = tokio::io::stdout();
        loop {
            let mut lines = Vec::new();
            tokio::select! {
                batch = input.recv() => match batch {
                    Some(batch) => {
                        for line in &batch {
                            self.input(line, &mut lines);
                        }
                    }
                    None => break,
                },
                line = next_output(&mut self.state) => match line {
                    Some(line) => lines.push(json!({
                        "type": "assistant",
                        "message": {"role": "assistant", "content": [{"type": "text", "text": line}]},
                    }).to_string()),
                    None => self.finish(&mut lines).await,
                },
                _ = terminate.recv() => break,
            }
            self.start_next(&mut lines);
            for line in lines {
                stdout
                    .write_all(format!("{line}\n").as_bytes())
                    .await
                    .map_err(ShellAgentError::Stdout)?;
            }
            stdout.flush().await.map_err(ShellAgentError::Stdout)?;
        }
        if let State::Running(running) = &mut self.state {
            kill_group(&running.child);
            let _ = running.child.wait().await;
        }
        Ok(())
    }

    /// Handles one stdin line, producing output lines.
    fn input(&mut self, line: &str, out: &mut Vec<String>) {
        // The common line, a user message with text content, without building a tree.
        if let Ok(user) = serde_json::from_str::<UserLine<'_>>(line) {
            if user.kind == "user" {
                self.queue.push_back(user.message.content.into_owned());
                return;
            }
        }
        let Ok(value) = serde_json::from_str::<Value>(line) else {
            return;
        };
        match value.get("type").and_then(Value::as_str) {
            Some("user") => {
                let content = &value["message"]["content"];
                let command = match content {
                    Value::String(text) => text.clone(),
                    Value::Array(blocks) => blocks
                        .iter()
                        .filter_map(|b| b.get("text").and_then(Value::as_str))
                        .collect::<Vec<_>>()
                        .join("\n"),
                    _ => String::new(),
                };
                self.queue.push_back(command);
            }
            Some("control_response") => self.answer(&value["response"], out),
            Some("control_request") => {
                let request_id = value
                    .get("request_id")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                match value["request"]["subtype"].as_str() {
                    Some(INTERRUPT) => {
                        self.interrupt(out);
                        out.push(
                            json!({
                                "type": "control_response",
                                "response": {"subtype": "success", "request_id": request_id, "response": {}},
                            })
                            .to_string(),
                        );
                    }
                    subtype => out.push(agent::error_response(
                        request_id,
                        &format!(
                            "the shell agent does not handle control requests of subtype {}",
                            subtype.unwrap_or("(none)")
                        ),
                    )),
                }
            }
            _ => {}
        }
    }

    /// Handles a control_response: the answer to the pending prompt, if it matches.
    fn answer(&mut self, response: &Value, out: &mut Vec<String>) {
        let State::Asking {
            request_id,
            command,
        } = &self.state
        else {
            return;
        };
        if response["request_id"].as_str() != Some(request_id.as_str()) {
            return;
        }
        let answer = &response["response"];
        let allowed =
            response["subtype"].as_str() == Some("success") && answer["behavior"] == "allow";
        if !allowed {
            let message = answer["message"]
                .as_str()
                .or(response["error"].as_str())
                .unwrap_or("denied");
            out.push(result_line(
                false,
                None,
                &format!("permission denied: {message}"),
            ));
            self.state = State::Idle;
            return;
        }
        let command = answer["updatedInput"]["command"]
            .as_str()
            .unwrap_or(command)
            .to_owned();
        match start_command(&command) {
            Ok(running) => self.state = State::Running(running),
            Err(e) => {
                out.push(result_line(
                    false,
                    None,
                    &format!("cannot run the command: {e}"),
                ));
                self.state = State::Idle;
            }
        }
    }

    fn interrupt(&mut self, out: &mut Vec<String>) {
        match &mut self.state {
            State::Running(running) => {
                running.interrupted = true;
                kill_group(&running.child);
            }
            State::Asking { request_id, .. } => {
                out.push(
                    json!({"type": "control_cancel_request", "request_id": request_id}).to_string(),
                );
                out.push(result_line(false, None, "interrupted"));
                self.state = State::Idle;
            }
            State::Idle => {}
        }
    }

    /// The running command's output ended: reap it and report.
    async fn finish(&mut self, out: &mut Vec<String>) {
        let State::Running(mut running) = std::mem::take(&mut self.state) else {
            return;
        };
        let status = running.child.wait().await;
        let code = match status {
            Ok(status) => status.code().or_else(|| {
                #[cfg(unix)]
                {
                    std::os::unix::process::ExitStatusExt::signal(&status).map(|s| 128 + s)
                }
                #[cfg(not(unix))]
                None
            }),
            Err(_) => None,
        };
        let text = if running.interrupted {
            "interrupted".to_owned()
        } else {
            match code {
                Some(code) => format!("exit code {code}"),
                None => "unknown exit status".to_owned(),
            }
        };
        out.push(result_line(
            code == Some(0) && !running.interrupted,
            Some(code.unwrap_or(-1)),
            &text,
        ));
    }

    /// Asks about the next queued command when nothing else is going on.
    fn start_next(&mut self, out: &mut Vec<String>) {
        if !matches!(self.state, State::Idle) {
            return;
        }
        let Some(command) = self.queue.pop_front() else {
            return;
        };
        self.n_prompts += 1;
        let request_id = format!("bash-{}-{}", std::process::id(), self.n_prompts);
        out.push(
            json!({
                "type": "control_request",
                "request_id": request_id,
                "request": {"subtype": CAN_USE_TOOL, "tool_name": "Bash", "input": {"command": command}},
            })
            .to_string(),
        );
        self.state = State::Asking {
            request_id,
            command,
        };
    }
}

/// The next output line of the running command; `None` at its end; pending forever when
/// nothing runs.
async fn next_output(state: &mut State) -> Option<String> {
    match state {
        State::Running(running) => running.output.recv().await,
        _ => std::future::pending().await,
    }
}

fn result_line(success: bool, exit_code: Option<i32>, text: &str) -> String {
    let mut result = json!({
        "type": "result",
        "subtype": if success { "success" } else { "error" },
        "is_error": !success,
        "result": text,
    });
    if let Some(code) = exit_code {
        result["exit_code"] = json!(code);
    }
    result.to_string()
}

/// Starts `sh -c command` in a new process group with stdout and stderr on one pipe read by
/// a thread.
fn start_command(command: &str) -> std::io::Result<Running> {
    let (reader, writer) = std::io::pipe()?;
    let mut process = tokio::process::Command::new("sh");
    process
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::from(writer.try_clone()?))
        .stderr(Stdio::from(writer));
    #[cfg(unix)]
    process.process_group(0);
    let child = process.spawn()?;
    // The command holds the pipe's write ends; drop them so the reader sees the end of
    // output when the command (and whatever it started) is done.
    drop(process);
    let (sender, output) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let mut reader = std::io::BufReader::new(reader);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line);
                    let text = text.trim_end_matches(['\n', '\r']).to_owned();
                    if sender.send(text).is_err() {
                        break;
                    }
                }
            }
        }
    });
    Ok(Running {
        child,
        output,
        interrupted: false,
    })
}

/// Kills a command's whole process group.
fn kill_group(child: &tokio::process::Child) {
    #[cfg(unix)]
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: killpg only sends a signal, to the group this agent created for the
        // command; a group that is already gone yields ESRCH, which is harmless.
        unsafe {
            libc::killpg(pid, libc::SIGKILL);
        }
    }
}

#[cfg(unix)]
fn signal_stream() -> Result<tokio::signal::unix::Signal, ShellAgentError> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(ShellAgentError::Signals)
}

#[cfg(not(unix))]
fn signal_stream() -> Result<NeverSignal, ShellAgentError> {
    Ok(NeverSignal)
}

#[cfg(not(unix))]
#[derive(Debug)]
struct NeverSignal;

#[cfg(not(unix))]
impl NeverSignal {
    async fn recv(&mut self) -> Option<()> {
        std::future::pending().await
    }
}
