//! `cloudctl session shell ID`: an interactive shell in a session's workspace, through the
//! daemon (which opens the relay's shell socket; this process never sees a token).
//!
//! The local terminal is put in raw mode for the shell's lifetime (restored on every way
//! out), keystrokes go out as `Input` frames, a window-size change (SIGWINCH, and a check
//! before each input, so a resize is never overtaken by what is typed after it) as a
//! `Resize` frame, and `Output` frames are written to stdout as they come. The shell's
//! `Exit` status becomes this process's exit status; an `Ended` frame is reported as an
//! error. Without a terminal on stdin (a script piping commands in), the input is sent as
//! it is; its end is not (the input ends with `exit`, and the shell ends when it exits).
//!
//! This module decides nothing about who may open a shell: the relay does.

use std::io::Write as _;

use anyhow::{anyhow, bail, Context as _};
use cloud_protocol::ipc::{Request, Response};
use cloud_protocol::terminal::{self, FromShell, ToShell, WindowSize, MAX_CHUNK};
use cloudctl::client::Client;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;

/// What the client's end of a shell connection has decoded so far.
#[derive(Debug, Default)]
struct Frames {
    /// Bytes read and not yet decoded.
    buf: Vec<u8>,
}

impl Frames {
    /// The next whole frame, `Ok(None)` while more bytes are needed.
    fn next(&mut self) -> Result<Option<FromShell>, terminal::TerminalError> {
        let Some((frame, used)) = terminal::decode_framed::<FromShell>(&self.buf)? else {
            return Ok(None);
        };
        self.buf.drain(..used);
        Ok(Some(frame))
    }
}

/// The frames that carry `bytes` of input: a `Resize` first when the window's size is not
/// the one last sent (`sent` is updated), then `Input` chunks of at most [`MAX_CHUNK`].
fn input_frames(bytes: &[u8], now: Option<WindowSize>, sent: &mut WindowSize) -> Vec<ToShell> {
    let mut frames: Vec<ToShell> = resize_frame(now, sent).into_iter().collect();
    frames.extend(
        bytes
            .chunks(MAX_CHUNK)
            .map(|chunk| ToShell::Input(chunk.to_vec())),
    );
    frames
}

/// A `Resize` when the window's size `now` is not the one last `sent` (updated).
fn resize_frame(now: Option<WindowSize>, sent: &mut WindowSize) -> Option<ToShell> {
    let now = now?.or_default();
    if now == *sent {
        return None;
    }
    *sent = now;
    Some(ToShell::Resize(now))
}

/// Opens the shell on `client`'s connection and runs it; returns its exit status.
pub async fn shell(mut client: Client, session: String) -> anyhow::Result<i32> {
    let interactive = is_terminal(libc::STDIN_FILENO);
    let mut sent = window_size().unwrap_or(WindowSize::DEFAULT).or_default();
    let term = std::env::var("TERM").ok().filter(|t| !t.is_empty());
    match client
        .request(Request::SessionShell {
            session: session.clone(),
            cols: sent.cols,
            rows: sent.rows,
            term,
        })
        .await?
    {
        Response::ShellOpened { .. } => {}
        other => bail!("unexpected reply to session/shell: {other:?}"),
    }
    let (mut stream, buf) = client.into_parts();
    let mut frames = Frames { buf };
    // Restored when this function returns, whichever way.
    let _raw = if interactive {
        Some(RawMode::enter().context("cannot put the terminal in raw mode")?)
    } else {
        None
    };
    let mut input = read_stdin();
    let mut resized = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
        .context("cannot watch the window size")?;
    let mut stdout = std::io::stdout().lock();
    let mut read = vec![0u8; 64 * 1024];
    let mut out = Vec::new();
    loop {
        // Everything already decodable first: the shell's output, then its end.
        while let Some(frame) = frames.next().context("cloudd sent a bad terminal frame")? {
            match frame {
                FromShell::Output(bytes) => {
                    stdout.write_all(&bytes)?;
                }
                FromShell::Exit { code } => {
                    stdout.flush()?;
                    return Ok(code);
                }
                FromShell::Ended { reason } => {
                    stdout.flush()?;
                    return Err(anyhow!("the shell was ended: {reason}"));
                }
            }
        }
        stdout.flush()?;
        out.clear();
        tokio::select! {
            _ = resized.recv() => {
                if let Some(frame) = resize_frame(window_size(), &mut sent) {
                    terminal::encode_framed(&frame, &mut out)?;
                }
            }
            typed = input.recv() => {
                let frames = match typed {
                    Some(bytes) => input_frames(&bytes, window_size(), &mut sent),
                    // The end of piped input is not passed on: a Ctrl-D that reaches the
                    // shell's terminal before its line editor is ready is lost, so the
                    // input says `exit` itself, and the shell ends when it exits.
                    None => {
                        input = closed_input();
                        Vec::new()
                    }
                };
                for frame in &frames {
                    terminal::encode_framed(frame, &mut out)?;
                }
            }
            n = stream.read(&mut read) => {
                let n = n.context("reading from cloudd")?;
                if n == 0 {
                    bail!("cloudd closed the shell's connection before the shell exited; `cloudctl status` shows why");
                }
                frames.buf.extend_from_slice(&read[..n]);
            }
        }
        if !out.is_empty() {
            stream.write_all(&out).await.context("writing to cloudd")?;
        }
    }
}

/// Stdin, read on a thread of its own (a blocking read: the descriptor stays as it is,
/// shared with the parent shell), in chunks as they come; the channel closes at its end.
fn read_stdin() -> mpsc::Receiver<Vec<u8>> {
    let (sender, receiver) = mpsc::channel(16);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 8192];
        loop {
            // SAFETY: reads into a live buffer from stdin.
            let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            if n <= 0 || sender.blocking_send(buf[..n as usize].to_vec()).is_err() {
                return;
            }
        }
    });
    receiver
}

/// An input that never yields (once stdin has ended).
fn closed_input() -> mpsc::Receiver<Vec<u8>> {
    let (sender, receiver) = mpsc::channel(1);
    std::mem::forget(sender);
    receiver
}

fn is_terminal(fd: libc::c_int) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

/// The size of the terminal on stdin (or stdout), if there is one.
fn window_size() -> Option<WindowSize> {
    [libc::STDIN_FILENO, libc::STDOUT_FILENO]
        .into_iter()
        .find_map(|fd| {
            // SAFETY: a zeroed winsize is valid, and TIOCGWINSZ writes only into it.
            let mut size: libc::winsize = unsafe { std::mem::zeroed() };
            #[allow(clippy::useless_conversion)] // the request's type differs by platform
            let ok = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ.into(), &mut size) } == 0;
            (ok && size.ws_col > 0 && size.ws_row > 0).then_some(WindowSize {
                cols: size.ws_col,
                rows: size.ws_row,
            })
        })
}

/// The terminal on stdin in raw mode (no echo, no line editing, no signals from keys: all
/// of that is the remote terminal's), until dropped.
struct RawMode {
    /// The settings to restore.
    saved: libc::termios,
}

impl RawMode {
    fn enter() -> std::io::Result<RawMode> {
        // SAFETY: a zeroed termios is valid for tcgetattr to fill.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr and tcsetattr read and write the termios given.
        unsafe {
            if libc::tcgetattr(libc::STDIN_FILENO, &mut saved) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            if libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `enter`.
        unsafe {
            libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_split_across_reads_comes_out_whole_and_in_order() {
        let mut stream = Vec::new();
        for frame in [
            FromShell::Output(b"one".to_vec()),
            FromShell::Output(b"two".to_vec()),
            FromShell::Exit { code: 3 },
        ] {
            terminal::encode_framed(&frame, &mut stream).unwrap();
        }
        let mut frames = Frames::default();
        let mut seen = Vec::new();
        for byte in stream {
            frames.buf.push(byte);
            while let Some(frame) = frames.next().unwrap() {
                seen.push(frame);
            }
        }
        assert_eq!(
            seen,
            [
                FromShell::Output(b"one".to_vec()),
                FromShell::Output(b"two".to_vec()),
                FromShell::Exit { code: 3 },
            ]
        );
        assert!(frames.buf.is_empty());
    }

    #[test]
    fn an_oversized_frame_is_an_error_before_its_body_arrives() {
        let mut frames = Frames {
            buf: u32::MAX.to_le_bytes().to_vec(),
        };
        assert!(frames.next().is_err());
    }

    #[test]
    fn a_resize_goes_before_the_input_typed_after_it_and_only_once() {
        let mut sent = WindowSize { cols: 80, rows: 24 };
        let bigger = WindowSize {
            cols: 100,
            rows: 40,
        };
        assert_eq!(
            input_frames(b"ls\r", Some(bigger), &mut sent),
            [ToShell::Resize(bigger), ToShell::Input(b"ls\r".to_vec())]
        );
        assert_eq!(sent, bigger);
        assert_eq!(
            input_frames(b"x", Some(bigger), &mut sent),
            [ToShell::Input(b"x".to_vec())]
        );
        // No terminal to ask: nothing to resize.
        assert_eq!(resize_frame(None, &mut sent), None);
        assert_eq!(
            resize_frame(Some(WindowSize { cols: 0, rows: 0 }), &mut sent),
            Some(ToShell::Resize(WindowSize::DEFAULT))
        );
    }

    #[test]
    fn long_input_is_cut_into_chunks_that_fit_a_frame() {
        let mut sent = WindowSize::DEFAULT;
        let bytes = vec![b'a'; 2 * MAX_CHUNK + 5];
        let frames = input_frames(&bytes, None, &mut sent);
        assert_eq!(frames.len(), 3);
        let mut joined = Vec::new();
        for frame in &frames {
            let ToShell::Input(chunk) = frame else {
                panic!("{frame:?}")
            };
            assert!(chunk.len() <= MAX_CHUNK);
            terminal::encode(frame).unwrap();
            joined.extend_from_slice(chunk);
        }
        assert_eq!(joined, bytes);
    }
}
