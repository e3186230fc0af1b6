//! A terminal into a session (issue 11, point 4): `cloudctl session shell ID` under a real
//! pseudo-terminal, through the real daemon to a real standalone relay, runs a shell in
//! the session's workspace on the relay's own terminal, follows the client's window size,
//! and exits with the shell's status. Viewers, users who may not change the session and
//! read-only credentials are refused.

use std::io::{Read as _, Write as _};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};

use cloudd_e2e::{wait_for, Home, Relay, DEADLINE};

/// A relay whose shells start in a `HOME` of their own (the `.bashrc` of the user running
/// the tests, which may do anything, slowly, is not theirs to read).
fn relay(home: &tempfile::TempDir) -> Relay {
    let mut relay = Relay::start();
    relay.restart_with_env(&[("HOME", home.path().to_str().unwrap())]);
    relay
}

fn login(home: &Home, relay: &Relay, user: &str, org: &str) {
    let token = relay.token(user, org);
    home.cloudctl_ok(&["login", "--relay", &relay.url(), "--token", &token]);
}

fn create(home: &Home, visibility: &str) -> String {
    let created = home.cloudctl_json(&[
        "session",
        "create",
        "--task",
        "shell",
        "--visibility",
        visibility,
    ]);
    created["session"]["id"].as_str().unwrap().to_owned()
}

/// `cloudctl ARGS` on the slave of a pseudo-terminal of `cols`×`rows` (its controlling
/// terminal, in a session of its own, so it gets SIGWINCH when the size changes), with
/// what it writes collected from the master.
struct OnTerminal {
    child: Child,
    master: std::fs::File,
    output: Arc<Mutex<Vec<u8>>>,
    /// The daemon's and the relay's logs, for a failure's message.
    home_log: std::path::PathBuf,
    relay_log: std::path::PathBuf,
}

impl OnTerminal {
    fn spawn(home: &Home, relay: &Relay, args: &[&str], cols: u16, rows: u16) -> OnTerminal {
        let (mut master, mut slave) = (-1, -1);
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty fills in two descriptors; the winsize outlives the call.
        let opened = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                &size,
            )
        };
        assert_eq!(opened, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both descriptors were just opened and belong to this test alone.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let mut command = home.cloudctl_command();
        command
            .args(args)
            .env("TERM", "dumb")
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave));
        // SAFETY: setsid and ioctl are async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("spawn cloudctl");
        drop(command);
        let master = std::fs::File::from(master);
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut reader = master.try_clone().unwrap();
        let collected = Arc::clone(&output);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with EIO once cloudctl (the last holder of the slave) has exited.
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                collected.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        OnTerminal {
            child,
            master,
            output,
            home_log: home.paths.log_file(),
            relay_log: relay.log_path(),
        }
    }

    fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    /// Waits until the terminal shows what `found` looks for; on a timeout, fails with what
    /// it shows and what the daemon and the relay logged.
    fn wait_output(&self, what: &str, found: impl Fn(&str) -> bool) {
        let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_for(what, DEADLINE, || found(&self.output()))
        }));
        if waited.is_err() {
            panic!(
                "timed out waiting for {what}; the terminal shows {:?}\ncloudd's log:\n{}\nthe relay's log:\n{}",
                self.output(),
                std::fs::read_to_string(self.home_log.as_path()).unwrap_or_default(),
                std::fs::read_to_string(self.relay_log.as_path()).unwrap_or_default(),
            );
        }
    }

    fn type_in(&mut self, text: &str) {
        self.master.write_all(text.as_bytes()).unwrap();
    }

    /// Changes the terminal's size, as a terminal emulator's window does.
    fn resize(&self, cols: u16, rows: u16) {
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads the winsize given.
        let result = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        assert_eq!(result, 0, "{}", std::io::Error::last_os_error());
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut status = None;
        wait_for("cloudctl session shell to exit", DEADLINE, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status.unwrap()
    }
}

impl Drop for OnTerminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_shell_runs_in_the_workspace_follows_the_window_and_exits_with_its_status() {
    let shell_home = tempfile::tempdir().unwrap();
    let relay = relay(&shell_home);
    let home = Home::new();
    home.wait_connected();
    login(&home, &relay, "ann", "acme");
    let session = create(&home, "private");
    let workspace = relay.data.path().join("workspaces").join(&session);

    let mut terminal = OnTerminal::spawn(&home, &relay, &["session", "shell", &session], 80, 24);
    terminal.wait_output("the shell's prompt", |output| !output.is_empty());

    // The relay's terminal has the size the client's had when it opened.
    terminal.type_in("stty size\r");
    terminal.wait_output("the first size", |output| output.contains("24 80"));

    // While it is open, the shell is one of the session's clients.
    let shown = home.cloudctl_json(&["session", "show", &session]);
    let clients = shown["session"]["clients"].as_array().unwrap();
    assert!(
        clients
            .iter()
            .any(|c| c["kind"] == "terminal" && c["user"] == "ann"),
        "{shown}"
    );

    // The client's window grows: the shell's terminal follows.
    terminal.resize(100, 40);
    terminal.type_in("stty size\r");
    terminal.wait_output("the new size", |output| output.contains("40 100"));

    // Typed in raw mode, run by the relay's shell in the workspace.
    terminal.type_in("echo \"pwd=[$PWD] id=[$CLOUD_SESSION_ID]\"; exit 3\r");
    let expected = format!("pwd=[{}] id=[{session}]", workspace.display());
    terminal.wait_output("the shell's answer", |output| output.contains(&expected));
    let status = terminal.wait_exit();
    assert_eq!(status.code(), Some(3), "{}", terminal.output());
    assert!(
        !relay.log().contains("Bearer"),
        "the relay logged a credential"
    );
}

#[test]
fn viewers_and_users_who_may_not_change_the_session_get_no_shell() {
    let shell_home = tempfile::tempdir().unwrap();
    let relay = relay(&shell_home);
    let ann = Home::new();
    ann.wait_connected();
    login(&ann, &relay, "ann", "acme");
    let public = create(&ann, "public");
    let private = create(&ann, "private");

    // Someone of another org sees a public session, read-only.
    let eve = Home::new();
    eve.wait_connected();
    login(&eve, &relay, "eve", "globex");
    let refused = eve.cloudctl(&["session", "shell", &public]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("viewers cannot open a shell"), "{stderr}");

    // Someone of the owner's org may not change (or see) a private session.
    let bob = Home::new();
    bob.wait_connected();
    login(&bob, &relay, "bob", "acme");
    let refused = bob.cloudctl(&["session", "shell", &private]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no such session"), "{stderr}");

    // The owner may, also with commands piped in rather than typed.
    let mut piped = ann
        .cloudctl_command()
        .args(["session", "shell", &private])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    piped
        .stdin
        .take()
        .unwrap()
        .write_all(b"echo piped-$((6 * 7)); exit 5\n")
        .unwrap();
    let output = piped.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(5), "{stdout} {output:?}");
    assert!(stdout.contains("piped-42"), "{stdout}");

    // A read-only credential of the owner gets none at the relay either.
    let read_only = relay.token_with_scopes("ann", "acme", &["sessions:read"]);
    let status = upgrade_status(&relay, &public, &read_only);
    assert_eq!(status, 403);
    // While the owner's full credential does.
    let full = relay.token("ann", "acme");
    assert_eq!(upgrade_status(&relay, &public, &full), 101);
}

/// The HTTP status of a WebSocket upgrade at the session's shell socket with `token`.
fn upgrade_status(relay: &Relay, session: &str, token: &str) -> u16 {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let url = format!(
        "ws://127.0.0.1:{}/v1/sessions/{session}/shell?cols=80&rows=24",
        relay.port
    );
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        match tokio_tungstenite::connect_async(request).await {
            Ok((mut socket, response)) => {
                let _ = socket.close(None).await;
                response.status().as_u16()
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                response.status().as_u16()
            }
            Err(e) => panic!("the upgrade failed: {e}"),
        }
    })
}

#[test]
fn deleting_the_session_ends_its_shell_with_the_reason() {
    let shell_home = tempfile::tempdir().unwrap();
    let relay = relay(&shell_home);
    let home = Home::new();
    home.wait_connected();
    login(&home, &relay, "ann", "acme");
    let session = create(&home, "private");
    let mut terminal = OnTerminal::spawn(&home, &relay, &["session", "shell", &session], 80, 24);
    terminal.type_in("echo ready-$((40 + 2))\r");
    terminal.wait_output("the shell to answer", |output| output.contains("ready-42"));

    home.cloudctl_ok(&["session", "delete", &session]);
    let status = terminal.wait_exit();
    assert_eq!(status.code(), Some(1), "{}", terminal.output());
    terminal.wait_output("the reason", |output| {
        output.contains("the shell was ended: the session was deleted")
    });
}

/// Under `--provider sandbox`, the shell is in the session's sandbox, as its agent is: it
/// sees its workspace but not the relay's data, cannot write outside the workspace, and
/// has no network when the session has none.
#[test]
fn a_shell_of_a_sandboxed_session_is_in_its_sandbox() {
    let shell_home = tempfile::tempdir().unwrap();
    let mut relay = Relay::start_with(&["--provider", "sandbox"]);
    relay.restart_with_env(&[("HOME", shell_home.path().to_str().unwrap())]);
    let home = Home::new();
    home.wait_connected();
    login(&home, &relay, "ann", "acme");
    let created =
        home.cloudctl_json(&["session", "create", "--task", "shell", "--network", "none"]);
    assert_eq!(created["session"]["provider"], "sandbox", "{created}");
    let session = created["session"]["id"].as_str().unwrap().to_owned();
    let data = relay.data.path().display().to_string();

    let mut terminal = OnTerminal::spawn(&home, &relay, &["session", "shell", &session], 80, 24);
    terminal.wait_output("the shell's prompt", |output| !output.is_empty());
    terminal.type_in(&format!(
        "test -e {data}/store; echo data=$?; touch /usr/cloudd-x 2>/dev/null; echo usr=$?; \
         touch here && echo ws=ok; (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null; echo net=$?; exit 4\r",
        port = relay.port
    ));
    // (The terminal echoes the line typed, `net=$?` included: wait for the answer.)
    terminal.wait_output("the shell's answers", |output| {
        output.contains("net=0") || output.contains("net=1")
    });
    let output = terminal.output();
    assert!(
        output.contains("data=1"),
        "the relay's data is visible: {output}"
    );
    assert!(output.contains("usr=1"), "the system is writable: {output}");
    assert!(
        output.contains("ws=ok"),
        "the workspace is not writable: {output}"
    );
    assert!(
        output.contains("net=1"),
        "the shell reached the relay's port: {output}"
    );
    assert_eq!(terminal.wait_exit().code(), Some(4), "{output}");
}
