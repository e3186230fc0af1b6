//! Providers with real processes: a real relay on 127.0.0.1:0, the built-in shell agent
//! as a real process (under bubblewrap for the sandbox provider), commands run inside it
//! through REST, and checks made from outside (`/proc`, the host's files, loopback
//! listeners on the host).

mod common;

use std::io::{Read as _, Write as _};
use std::path::PathBuf;

use cloud_protocol::session::SessionEvent;
use cloud_relay::providers::ProviderConfig;
use common::*;
use serde_json::json;

/// The sandbox provider with the relay's own program as its forwarder.
fn sandbox() -> ProviderConfig {
    ProviderConfig {
        kind: cloud_protocol::session::ProviderKind::Sandbox,
        bwrap: PathBuf::from("bwrap"),
        helper: Some(PathBuf::from(env!("CARGO_BIN_EXE_cloud-relay"))),
        allowed_domains: Vec::new(),
    }
}

/// Creates a session from `body` and waits until it runs; returns its id.
async fn create_running(relay: &TestRelay, token: &str, body: serde_json::Value) -> String {
    let id = relay.create(token, &body.to_string()).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    relay.wait_for_status(token, &id, "running").await;
    id
}

/// Sends a shell command, allows it, and returns the agent's output lines once its result
/// arrives.
async fn run_shell(relay: &TestRelay, token: &str, id: &str, command: &str) -> Vec<String> {
    let sent_seq = relay.send_message(token, id, command).await;
    let prompt = relay
        .wait_for_log(token, id, "the command's prompt", |e| {
            e.seq > sent_seq && is_prompt(e)
        })
        .await;
    let request_id = message(&prompt).unwrap()["request_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, answered) = relay
        .http(
            "POST",
            &format!("/v1/sessions/{id}/permissions/{request_id}"),
            Some(token),
            Some(r#"{"behavior":"allow"}"#),
        )
        .await;
    assert_eq!(status, 200, "{answered}");
    let answer_seq = answered["seq"].as_u64().unwrap();
    relay
        .wait_for_log(token, id, "the command's result", |e| {
            e.seq > answer_seq && is_result(e)
        })
        .await;
    relay
        .log(token, id)
        .await
        .iter()
        .filter(|e| e.seq > answer_seq)
        .filter_map(assistant_text)
        .collect()
}

async fn action(relay: &TestRelay, token: &str, id: &str, action: &str) -> serde_json::Value {
    let (status, session) = relay
        .http(
            "POST",
            &format!("/v1/sessions/{id}/{action}"),
            Some(token),
            None,
        )
        .await;
    assert_eq!(status, 200, "{action}: {session}");
    session
}

/// The pid of the session's agent: the relay's child process (this test's, the relay
/// running in it) whose environment names the session.
fn agent_pid(session: &str) -> Option<u32> {
    let marker = format!("CLOUD_SESSION_ID={session}");
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let environ = std::fs::read(entry.path().join("environ")).ok()?;
            let named = environ
                .split(|&b| b == 0)
                .any(|var| var == marker.as_bytes());
            (named && parent(pid) == Some(me)).then_some(pid)
        })
}

/// A process's state letter and parent, from `/proc/PID/stat`.
fn stat(pid: u32) -> Option<(char, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = text.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let parent = fields.next()?.parse().ok()?;
    Some((state, parent))
}

fn parent(pid: u32) -> Option<u32> {
    stat(pid).map(|(_, parent)| parent)
}

/// Waits until `pid`'s state is (or, with `!is`, is no longer) `state`.
async fn wait_state(pid: u32, state: char, is: bool) {
    wait_for_async(
        &format!("pid {pid} state {state} == {is}"),
        DEADLINE,
        || async {
            match stat(pid) {
                Some((now, _)) if (now == state) == is => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await
}

#[tokio::test]
async fn pause_stops_the_agent_and_resume_continues_the_same_process() {
    let relay = TestRelay::start(shell_agent()).await;
    let token = relay.token("alice", "acme");
    let id = create_running(&relay, &token, json!({})).await;
    let (status, session) = relay
        .http("GET", &format!("/v1/sessions/{id}"), Some(&token), None)
        .await;
    assert_eq!((status, &session["provider"]), (200, &json!("local")));
    let pid = wait_for_async("the agent's pid", DEADLINE, || async {
        agent_pid(&id).ok_or_else(|| "no agent yet".to_owned())
    })
    .await;

    assert_eq!(
        action(&relay, &token, &id, "pause").await["status"],
        "paused"
    );
    wait_state(pid, 'T', true).await;
    // A message sent while it is paused waits in its stdin.
    relay
        .send_message(&token, &id, "echo queued-while-paused")
        .await;
    assert_eq!(stat(pid).map(|s| s.0), Some('T'), "still stopped");

    assert_eq!(
        action(&relay, &token, &id, "resume").await["status"],
        "running"
    );
    wait_state(pid, 'T', false).await;
    assert_eq!(agent_pid(&id), Some(pid), "the same agent process goes on");
    // It takes the message it was sent while paused.
    let prompt = relay
        .wait_for_log(&token, &id, "the queued message's prompt", |e| {
            is_prompt(e)
                && message(e).unwrap()["request"]["input"]["command"] == "echo queued-while-paused"
        })
        .await;
    let request_id = message(&prompt).unwrap()["request_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _) = relay
        .http(
            "POST",
            &format!("/v1/sessions/{id}/permissions/{request_id}"),
            Some(&token),
            Some(r#"{"behavior":"allow"}"#),
        )
        .await;
    assert_eq!(status, 200);
    relay
        .wait_for_log(&token, &id, "the queued command's output", |e| {
            assistant_text(e).as_deref() == Some("queued-while-paused")
        })
        .await;

    // Completing a paused session ends its agent.
    action(&relay, &token, &id, "pause").await;
    wait_state(pid, 'T', true).await;
    action(&relay, &token, &id, "complete").await;
    wait_for_async("the agent to end", DEADLINE, || async {
        match stat(pid) {
            None | Some(('Z', _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    relay.stop().await;
}

#[tokio::test]
async fn a_removed_workspace_is_rebuilt_from_its_snapshot_on_resume_and_at_start() {
    let mut relay = TestRelay::start(shell_agent()).await;
    let token = relay.token("alice", "acme");
    let id = create_running(&relay, &token, json!({})).await;
    run_shell(
        &relay,
        &token,
        &id,
        "mkdir -p dir && echo kept > dir/kept.txt",
    )
    .await;
    // The agent's turn became a snapshot version.
    relay
        .wait_for_log(
            &token,
            &id,
            "the agent's version",
            |e| matches!(&e.event, SessionEvent::Snapshot(info) if info.files >= 1),
        )
        .await;

    action(&relay, &token, &id, "pause").await;
    std::fs::remove_dir_all(relay.workspace(&id)).unwrap();
    action(&relay, &token, &id, "resume").await;
    relay.wait_for_status(&token, &id, "running").await;
    relay
        .wait_for_log(&token, &id, "the rebuild's status", |e| {
            matches!(&e.event, SessionEvent::Status { reason: Some(r), .. } if r.contains("rebuilding the workspace"))
        })
        .await;
    assert_eq!(
        run_shell(&relay, &token, &id, "cat dir/kept.txt").await,
        ["kept"]
    );

    // A relay that starts without a running session's workspace rebuilds it too.
    relay
        .restart_after(|data| {
            std::fs::remove_dir_all(data.join("workspaces").join(&id)).unwrap();
        })
        .await;
    let token = relay.token("alice", "acme");
    relay.wait_for_status(&token, &id, "running").await;
    assert_eq!(
        run_shell(&relay, &token, &id, "cat dir/kept.txt").await,
        ["kept"]
    );
    relay.stop().await;
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

fn bwrap_works() -> bool {
    // The tests below need it: CI installs bubblewrap (.ci/run); say so plainly otherwise.
    let ok = std::process::Command::new("bwrap")
        .args(["--ro-bind", "/", "/", "true"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "bwrap cannot run here: install bubblewrap (apt-get install bubblewrap)"
    );
    ok
}

#[tokio::test]
async fn the_sandbox_sees_only_its_workspace_and_has_no_network_with_none() {
    bwrap_works();
    let relay = TestRelay::start_with_provider(shell_agent(), sandbox()).await;
    let token = relay.token("alice", "acme");
    let data = relay.data().to_owned();
    std::fs::write(data.join("secret.txt"), "outside").unwrap();
    let port = host_server();
    let id = create_running(&relay, &token, json!({"network_access": "none"})).await;
    let (_, session) = relay
        .http("GET", &format!("/v1/sessions/{id}"), Some(&token), None)
        .await;
    assert_eq!(session["provider"], "sandbox");
    relay
        .wait_for_log(&token, &id, "the network note", |e| {
            message(e).is_some_and(|m| {
                m["subtype"] == "network" && m["network_access"] == "none" && m["enforced"] == true
            })
        })
        .await;

    let d = data.display();
    let escape = format!("/cloudd-escape-{id}");
    let script = format!(
        "test -e {d}/secret.txt && echo secret-visible || echo secret-invisible; \
         test -e {d}/tokens.jsonl && echo tokens-visible || echo tokens-invisible; \
         (echo x > {d}/escape.txt) 2>/dev/null; \
         (echo x > {escape}) 2>/dev/null && echo root-writable || echo root-refused; \
         (echo x > /usr/cloudd-escape) 2>/dev/null && echo usr-writable || echo usr-refused; \
         echo inside > inside.txt && echo workspace-writable; \
         echo t > /tmp/t && echo tmp-writable; \
         test -e /usr/bin/sh && echo system-visible; \
         curl -sS -m 5 http://127.0.0.1:{port}/ 2>/dev/null || echo host-unreachable"
    );
    let out = run_shell(&relay, &token, &id, &script).await;
    let _ = std::fs::remove_file(&escape);
    assert_eq!(
        out,
        [
            "secret-invisible",
            "tokens-invisible",
            "root-refused",
            "usr-refused",
            "workspace-writable",
            "tmp-writable",
            "system-visible",
            "host-unreachable"
        ]
    );
    assert_eq!(
        std::fs::read_to_string(relay.workspace(&id).join("inside.txt")).unwrap(),
        "inside\n"
    );
    // The data directory is under /tmp here, and the sandbox's /tmp is its own: the write
    // above may land there, never in the host's.
    assert!(!data.join("escape.txt").exists());

    // Pause stops the whole sandbox; resume continues it.
    let pid = agent_pid(&id).expect("the sandbox's bwrap");
    action(&relay, &token, &id, "pause").await;
    wait_state(pid, 'T', true).await;
    action(&relay, &token, &id, "resume").await;
    wait_state(pid, 'T', false).await;
    assert_eq!(
        run_shell(&relay, &token, &id, "echo still-here").await,
        ["still-here"]
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_limited_sandbox_reaches_only_allowed_hosts_through_the_proxy() {
    bwrap_works();
    let relay = TestRelay::start_with_provider(shell_agent(), sandbox()).await;
    let token = relay.token("alice", "acme");
    let port = host_server();
    let id = create_running(
        &relay,
        &token,
        json!({"network_access": "limited", "allowed_domains": ["localhost"]}),
    )
    .await;
    let (_, session) = relay
        .http("GET", &format!("/v1/sessions/{id}"), Some(&token), None)
        .await;
    assert_eq!(session["allowed_domains"], json!(["localhost"]));
    let script = format!(
        "curl -sS -m 10 http://localhost:{port}/; \
         curl -sS -m 10 --proxytunnel http://localhost:{port}/; \
         curl -sS -m 10 -o /dev/null -w 'plain %{{http_code}}\\n' http://127.0.0.1:{port}/; \
         curl -sS -m 10 --proxytunnel http://127.0.0.1:{port}/ 2>/dev/null || echo tunnel-refused; \
         curl -sS -m 5 --noproxy '*' http://localhost:{port}/ 2>/dev/null || echo direct-unreachable"
    );
    let out = run_shell(&relay, &token, &id, &script).await;
    assert_eq!(
        out,
        [
            "hello-from-host",
            "hello-from-host",
            "plain 403",
            "tunnel-refused",
            "direct-unreachable"
        ]
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_full_sandbox_reaches_the_host() {
    bwrap_works();
    let relay = TestRelay::start_with_provider(shell_agent(), sandbox()).await;
    let token = relay.token("alice", "acme");
    let port = host_server();
    let id = create_running(&relay, &token, json!({"network_access": "full"})).await;
    let out = run_shell(
        &relay,
        &token,
        &id,
        &format!("curl -sS -m 10 http://127.0.0.1:{port}/"),
    )
    .await;
    assert_eq!(out, ["hello-from-host"]);
    relay.stop().await;
}

#[tokio::test]
async fn a_sandbox_the_platform_cannot_make_is_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    // No bubblewrap at all.
    let missing = ProviderConfig {
        bwrap: dir.path().join("no-such-bwrap"),
        ..sandbox()
    };
    // A bubblewrap that cannot make namespaces (as where user namespaces are disabled).
    let refusing = dir.path().join("bwrap");
    std::fs::write(
        &refusing,
        "#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(
        &refusing,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let no_userns = ProviderConfig {
        bwrap: refusing,
        ..sandbox()
    };
    for (config, says) in [
        (missing, "apt-get install bubblewrap"),
        (no_userns, "user namespaces"),
    ] {
        let relay = TestRelay::start_with_provider(shell_agent(), config).await;
        let token = relay.token("alice", "acme");
        let (status, error) = relay
            .http("POST", "/v1/sessions", Some(&token), Some("{}"))
            .await;
        assert_eq!(status, 503, "{error}");
        let text = error["error"].as_str().unwrap();
        assert!(
            text.contains(says) && text.contains("--provider local"),
            "{text}"
        );
        let (_, list) = relay.http("GET", "/v1/sessions", Some(&token), None).await;
        assert_eq!(
            list.as_array().map(Vec::len),
            Some(0),
            "nothing was created"
        );
        relay.stop().await;
    }
}

#[tokio::test]
async fn a_paused_session_whose_agent_died_with_the_relay_gets_a_new_agent_on_resume() {
    let mut relay = TestRelay::start(shell_agent()).await;
    let token = relay.token("alice", "acme");
    let id = create_running(&relay, &token, json!({})).await;
    relay.send_message(&token, &id, "echo AAA").await;
    let first = relay
        .wait_for_log(&token, &id, "AAA's prompt", is_prompt)
        .await;
    let request_id = message(&first).unwrap()["request_id"].clone();
    action(&relay, &token, &id, "pause").await;
    relay.restart().await;
    let token = relay.token("alice", "acme");
    // The stopped agent is gone with the old relay: its prompt is withdrawn at start.
    relay
        .wait_for_log(&token, &id, "the withdrawal", |e| {
            message(e).is_some_and(|m| {
                m["type"] == "control_cancel_request" && m["request_id"] == request_id
            })
        })
        .await;
    assert_eq!(
        action(&relay, &token, &id, "resume").await["status"],
        "running"
    );
    // A new agent is handed the unfinished message and asks again.
    relay
        .wait_for_log(&token, &id, "AAA's prompt again", |e| {
            e.seq > first.seq && is_prompt(e)
        })
        .await;
    relay.stop().await;
}

#[tokio::test]
async fn a_relay_restarted_with_another_provider_runs_its_sessions_with_it() {
    bwrap_works();
    let mut relay = TestRelay::start(shell_agent()).await;
    let token = relay.token("alice", "acme");
    let id = create_running(&relay, &token, json!({"network_access": "none"})).await;
    let secret = relay.data().join("secret.txt");
    std::fs::write(&secret, "outside").unwrap();
    let probe = format!(
        "test -e {} && echo visible || echo invisible",
        secret.display()
    );
    assert_eq!(run_shell(&relay, &token, &id, &probe).await, ["visible"]);

    relay.provider = sandbox();
    relay.restart().await;
    let token = relay.token("alice", "acme");
    let session = relay.wait_for_status(&token, &id, "running").await;
    assert_eq!(session["provider"], "sandbox", "{session}");
    assert_eq!(run_shell(&relay, &token, &id, &probe).await, ["invisible"]);
    relay.stop().await;
}
