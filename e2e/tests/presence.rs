//! Client presence and idle auto-stop with real processes: a standalone `cloud-relay` with
//! short heartbeats (and a short auto-stop unit), the real daemon and `cloudctl`, a
//! JSON-RPC client attached through the daemon, and a raw WebSocket viewer.

use std::time::{Duration, Instant};

use cloudd_e2e::{wait_for, Home, JsonClient, Relay, DEADLINE};
use futures_util::StreamExt as _;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

/// The relay's heartbeat interval in the presence test.
const HEARTBEAT: Duration = Duration::from_millis(500);

/// What the harness may add to "within three heartbeats": a `session show` round trip and
/// a busy machine's scheduling.
const MEASURING_SLACK: Duration = Duration::from_millis(1500);

fn login(home: &Home, relay: &Relay, user: &str, org: &str) -> String {
    let token = relay.token(user, org);
    home.cloudctl_ok(&["login", "--relay", &relay.url(), "--token", &token]);
    token
}

fn create_session(home: &Home, args: &[&str]) -> String {
    let mut all = vec!["session", "create"];
    all.extend_from_slice(args);
    let created = home.cloudctl_json(&all);
    created["session"]["id"].as_str().unwrap().to_owned()
}

/// The session's clients as `cloudctl session show --json` lists them.
fn shown_clients(home: &Home, session: &str) -> Vec<Value> {
    let shown = home.cloudctl_json(&["session", "show", session]);
    assert_eq!(shown["stale"], false, "{shown}");
    shown["session"]["clients"].as_array().unwrap().clone()
}

/// The session as the relay's REST API shows it (not a client itself).
fn rest_session(relay: &Relay, token: &str, session: &str) -> Value {
    let (code, body) = relay.http("GET", &format!("/v1/sessions/{session}"), token, None);
    assert_eq!(code, 200, "{body}");
    body
}

fn kinds(clients: &[Value]) -> Vec<&str> {
    let mut kinds: Vec<&str> = clients.iter().filter_map(|c| c["kind"].as_str()).collect();
    kinds.sort_unstable();
    kinds
}

/// The session's status entries in its log (REST), as (status, reason).
fn status_entries(relay: &Relay, token: &str, session: &str) -> Vec<(String, Option<String>)> {
    let (code, log) = relay.http(
        "GET",
        &format!("/v1/sessions/{session}/log?after=0"),
        token,
        None,
    );
    assert_eq!(code, 200, "{log}");
    log.as_array()
        .unwrap()
        .iter()
        .filter(|entry| entry["author"] == "relay")
        .filter_map(|entry| {
            let status = &entry["event"]["status"];
            Some((
                status["status"].as_str()?.to_owned(),
                status["reason"].as_str().map(str::to_owned),
            ))
        })
        .collect()
}

/// A JSON-RPC client attached to a session through the daemon: the daemon's local client,
/// which makes the daemon a client of the session on the relay.
fn attach(home: &Home, session: &str) -> JsonClient {
    let mut client = JsonClient::connect(&home.paths.socket).unwrap();
    client.hello().unwrap();
    let reply = client
        .call("attach", json!({"session": session, "since": 0}))
        .unwrap();
    assert!(reply.get("result").is_some(), "{reply}");
    client
}

/// A raw WebSocket viewer of a session on a thread of its own: it reads (and so answers
/// the relay's pings) until told to fall silent, then holds the connection open without
/// reading a byte until dropped.
struct Viewer {
    silent: Option<tokio::sync::oneshot::Sender<()>>,
    close: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Viewer {
    fn connect(relay: &Relay, token: &str, session: &str) -> Viewer {
        let mut request = format!(
            "ws://127.0.0.1:{}/v1/sessions/{session}/subscribe",
            relay.port
        )
        .into_client_request()
        .unwrap();
        let headers = request.headers_mut();
        headers.insert("Authorization", format!("Bearer {token}").parse().unwrap());
        headers.insert("User-Agent", "presence-e2e".parse().unwrap());
        let (silent, mut silent_rx) = tokio::sync::oneshot::channel::<()>();
        let (close, close_rx) = tokio::sync::oneshot::channel::<()>();
        let (connected, connected_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
                connected.send(()).unwrap();
                loop {
                    tokio::select! {
                        _ = &mut silent_rx => break,
                        message = socket.next() => if message.is_none() { return },
                    }
                }
                let _ = close_rx.await;
                drop(socket);
            });
        });
        connected_rx
            .recv_timeout(DEADLINE)
            .expect("the viewer connected");
        Viewer {
            silent: Some(silent),
            close: Some(close),
            thread: Some(thread),
        }
    }

    /// Stops reading: the relay's pings go unanswered from now on.
    fn fall_silent(&mut self) {
        let _ = self.silent.take().unwrap().send(());
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        self.silent.take();
        self.close.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Continues a stopped process when dropped, whatever the test's outcome.
struct Stopped(u32);

impl Stopped {
    fn stop(pid: u32) -> Stopped {
        // SAFETY: kill(2) on a pid of this test's own daemon.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

#[test]
fn session_show_lists_connected_clients_and_a_silent_one_drops_out_within_three_heartbeats() {
    // No rate limit: the test polls the relay.
    let relay = Relay::start_with(&["--heartbeat", "500ms", "--requests-per-second", "0"]);
    let home = Home::new();
    let token = login(&home, &relay, "ann", "acme");
    home.wait_connected();
    let session = create_session(&home, &["--auto-stop-minutes", "0"]);
    assert!(
        shown_clients(&home, &session).is_empty(),
        "creating follows the session but attaches nobody"
    );

    let attached = attach(&home, &session);
    let mut viewer = Viewer::connect(&relay, &token, &session);
    let mut clients = Vec::new();
    wait_for("the daemon and the viewer listed", DEADLINE, || {
        clients = shown_clients(&home, &session);
        kinds(&clients) == ["daemon", "viewer"]
    });
    for client in &clients {
        assert_eq!(client["user"], "ann", "{client}");
        assert!(
            client["connected_at"].as_u64().unwrap() <= client["last_heartbeat"].as_u64().unwrap(),
            "{client}"
        );
        let label = client["label"].as_str().unwrap();
        match client["kind"].as_str().unwrap() {
            "viewer" => assert_eq!(label, "presence-e2e"),
            _ => assert!(!label.is_empty(), "a daemon is named by its host: {client}"),
        }
    }
    let text = home.cloudctl_ok(&["session", "show", &session]);
    assert!(
        text.contains("daemon ann (") && text.contains("viewer ann (presence-e2e)"),
        "{text}"
    );

    // Answering pings keeps both listed well past three heartbeats.
    wait_for(
        "the viewer's heartbeats to outlast 4 intervals",
        DEADLINE,
        || {
            let clients = shown_clients(&home, &session);
            assert_eq!(kinds(&clients), ["daemon", "viewer"], "{clients:?}");
            clients.iter().all(|c| {
                c["last_heartbeat"].as_u64().unwrap() - c["connected_at"].as_u64().unwrap()
                    > 4 * HEARTBEAT.as_millis() as u64
            })
        },
    );

    // A viewer that stops answering drops out; the daemon stays.
    viewer.fall_silent();
    let silent_since = Instant::now();
    wait_for("the silent viewer to drop out", DEADLINE, || {
        kinds(&shown_clients(&home, &session)) == ["daemon"]
    });
    let took = silent_since.elapsed();
    eprintln!("the silent viewer dropped out after {took:?}");
    assert!(
        took <= 3 * HEARTBEAT + MEASURING_SLACK,
        "the silent viewer was listed for {took:?}"
    );

    // A stopped daemon answers no ping: it drops out too (the REST API tells, the daemon
    // cannot), and counts again once it runs.
    let pid = home.daemon_pid().expect("the daemon runs");
    let stopped = Stopped::stop(pid);
    let stopped_at = Instant::now();
    wait_for("the stopped daemon to drop out", DEADLINE, || {
        rest_session(&relay, &token, &session)["clients"]
            .as_array()
            .unwrap()
            .is_empty()
    });
    let took = stopped_at.elapsed();
    eprintln!("the stopped daemon dropped out after {took:?}");
    assert!(
        took <= 3 * HEARTBEAT + MEASURING_SLACK,
        "the stopped daemon was listed for {took:?}"
    );
    drop(stopped);
    wait_for("the continued daemon listed again", DEADLINE, || {
        kinds(&shown_clients(&home, &session)) == ["daemon"]
    });

    // Detaching (closing the attached client) leaves at once.
    drop(attached);
    wait_for(
        "the daemon to leave with its last local client",
        DEADLINE,
        || shown_clients(&home, &session).is_empty(),
    );
}

#[test]
fn an_idle_session_is_paused_with_the_reason_and_a_client_attaching_resumes_it() {
    // One auto-stop "minute" lasts 300 ms here; no rate limit: the test polls the relay.
    let relay = Relay::start_with(&[
        "--heartbeat",
        "200ms",
        "--auto-stop-unit",
        "300ms",
        "--requests-per-second",
        "0",
    ]);
    let home = Home::new();
    let token = login(&home, &relay, "ann", "acme");
    home.wait_connected();
    let session = create_session(&home, &["--auto-stop-minutes", "2"]);
    let shown = home.cloudctl_json(&["session", "show", &session]);
    assert_eq!(shown["session"]["auto_stop_minutes"], 2, "{shown}");
    let text = home.cloudctl_ok(&["session", "show", &session]);
    assert!(text.contains("after 2 idle minutes"), "{text}");

    let idle = "idle for 2 minutes with no client".to_owned();
    wait_for("the idle session to be paused", DEADLINE, || {
        rest_session(&relay, &token, &session)["status"] == "paused"
    });
    let statuses = status_entries(&relay, &token, &session);
    assert_eq!(
        statuses.last(),
        Some(&("paused".to_owned(), Some(idle.clone()))),
        "{statuses:?}"
    );

    // A daemon attaching on behalf of a local client resumes it.
    let attached = attach(&home, &session);
    wait_for("the attach to resume it", DEADLINE, || {
        rest_session(&relay, &token, &session)["status"] == "running"
    });
    let statuses = status_entries(&relay, &token, &session);
    assert_eq!(
        statuses.last(),
        Some(&(
            "running".to_owned(),
            Some("a client attached (daemon of ann)".to_owned())
        )),
        "{statuses:?}"
    );

    // Idle again once nobody is attached; then a viewer resumes it.
    drop(attached);
    wait_for("the session to be paused again", DEADLINE, || {
        rest_session(&relay, &token, &session)["status"] == "paused"
    });
    let _viewer = Viewer::connect(&relay, &token, &session);
    wait_for("the viewer to resume it", DEADLINE, || {
        rest_session(&relay, &token, &session)["status"] == "running"
    });
    let statuses = status_entries(&relay, &token, &session);
    assert_eq!(
        statuses.last(),
        Some(&(
            "running".to_owned(),
            Some("a client attached (viewer of ann)".to_owned())
        )),
        "{statuses:?}"
    );

    // A session a user paused stays paused when a client attaches (the relay checks at
    // every join).
    home.cloudctl_ok(&["session", "pause", &session]);
    let statuses = status_entries(&relay, &token, &session);
    assert_eq!(statuses.last(), Some(&("paused".to_owned(), None)));
    let _other = attach(&home, &session);
    wait_for("the attached daemon to be listed", DEADLINE, || {
        kinds(&shown_clients(&home, &session)).contains(&"daemon")
    });
    assert_eq!(rest_session(&relay, &token, &session)["status"], "paused");
}
