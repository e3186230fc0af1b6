//! Providers with real processes: a real `cloud-relay serve --provider sandbox`, the real
//! daemon and `cloudctl`, the built-in shell agent under bubblewrap, and a loopback
//! server on the host to reach (or not) from inside.

use std::io::{Read as _, Write as _};

use cloudd_e2e::{wait_for, Home, Relay, DEADLINE};

fn login(home: &Home, relay: &Relay) {
    let token = relay.token("ann", "acme");
    home.cloudctl_ok(&["login", "--relay", &relay.url(), "--token", &token]);
    home.wait_connected();
}

/// A loopback HTTP server on the host answering every request with `hello-from-host`.
fn host_server() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let body = "hello-from-host\n";
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    port
}

/// Runs `command` in the session with the shell agent (allowed through `cloudctl allow`)
/// and returns the session's log as `cloudctl attach` replays it once the result is in.
fn run(home: &Home, session: &str, command: &str) -> String {
    let before = home.cloudctl_ok(&["attach", session, "--since", "0", "--no-follow"]);
    let results_before = before.matches("result success").count();
    home.cloudctl_ok(&["send", session, command]);
    home.allow_command(session, command);
    let mut replay = String::new();
    wait_for("the command's result", DEADLINE, || {
        replay = home.cloudctl_ok(&["attach", session, "--since", "0", "--no-follow"]);
        replay.matches("result success").count() > results_before
    });
    replay
}

#[test]
fn a_sandbox_relay_shows_its_provider_and_confines_the_agent() {
    let relay = Relay::start_with(&["--provider", "sandbox", "--allowed-domain", "localhost"]);
    let home = Home::new();
    login(&home, &relay);
    let port = host_server();

    let created = home.cloudctl_json(&[
        "session",
        "create",
        "--task",
        "boxed",
        "--network",
        "limited",
    ]);
    let session = created["session"]["id"].as_str().unwrap().to_owned();
    assert_eq!(created["session"]["provider"], "sandbox", "{created}");
    let shown = home.cloudctl_json(&["session", "show", &session]);
    assert_eq!(shown["session"]["provider"], "sandbox", "{shown}");
    let table = home.cloudctl_ok(&["session", "show", &session]);
    let row = table
        .lines()
        .find(|l| l.starts_with("provider"))
        .unwrap_or_default();
    assert!(row.ends_with("sandbox"), "{table}");

    let escape = format!("/cloudd-e2e-escape-{session}");
    let replay = run(
        &home,
        &session,
        &format!(
            "(echo x > {escape}) 2>/dev/null || echo write-refused; \
             test -e {home} && echo home-visible || echo home-invisible; \
             curl -sS -m 10 http://localhost:{port}/; \
             curl -sS -m 10 -o /dev/null -w 'direct-ip %{{http_code}}\\n' http://127.0.0.1:{port}/",
            home = home.path().display()
        ),
    );
    let _ = std::fs::remove_file(&escape);
    for expected in [
        "write-refused",
        "home-invisible",
        "hello-from-host",
        "direct-ip 403",
    ] {
        assert!(replay.contains(expected), "{expected} in:\n{replay}");
    }
}

#[test]
fn a_relay_that_cannot_sandbox_refuses_to_create_sessions_and_says_why() {
    let relay = Relay::start_with(&["--provider", "sandbox", "--bwrap", "/nonexistent/bwrap"]);
    let home = Home::new();
    login(&home, &relay);
    let output = home.cloudctl(&["session", "create", "--task", "nowhere"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("apt-get install bubblewrap") && stderr.contains("--provider local"),
        "{stderr}"
    );
    let list = home.cloudctl_json(&["session", "list"]);
    assert_eq!(list["sessions"].as_array().map(Vec::len), Some(0), "{list}");
    // Said at start too, in the operator's log.
    assert!(
        relay.log().contains("provider unavailable"),
        "{}",
        relay.log()
    );
}
