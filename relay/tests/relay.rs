//! The relay end to end: a real relay on 127.0.0.1:0 with a temp data directory, real
//! agent processes, raw HTTP and real WebSocket clients.

mod common;

use cloud_protocol::bridge::{
    FromRelay, Outbound, PermissionDecision, RelayRequest, ToRelay, BRIDGE_PATH, MAX_BRIDGE_MESSAGE,
};
use cloud_protocol::session::{
    Author, CreateSession, NetworkAccess, RepoAccess, SessionEvent, SessionStatus, Visibility,
};
use common::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn tokens_authenticate_and_revocation_refuses_live_bridges() {
    let relay = TestRelay::start(shell_agent()).await;
    let token = relay.token("alice", "acme");
    assert_eq!(
        relay
            .http("GET", "/v1/sessions", Some(&token), None)
            .await
            .0,
        200
    );
    let (status, body) = relay.http("GET", "/v1/sessions", None, None).await;
    assert_eq!(status, 401);
    assert!(body["error"].is_string());
    assert_eq!(
        relay
            .http("GET", "/v1/sessions", Some("crt_wrong"), None)
            .await
            .0,
        401
    );
    assert_eq!(
        websocket(relay.addr, BRIDGE_PATH, "crt_wrong").await.err(),
        Some(401)
    );
    let text = std::fs::read_to_string(relay.data().join("tokens.jsonl")).unwrap();
    assert!(!text.contains(&token), "tokens are stored hashed only");

    let (mut bridge, _) = Bridge::connect(relay.addr, &token, "i-1").await;
    assert_eq!(
        cloud_relay::tokens::revoke_user(relay.data(), "alice").unwrap(),
        1
    );
    let refusal = bridge
        .recv_until("a refusal", |m| match m {
            FromRelay::Refused { permanent, reason } => Some((*permanent, reason.clone())),
            _ => None,
        })
        .await;
    assert!(refusal.0, "a revoked token is a permanent refusal");
    assert!(!refusal.1.contains(&token));
    assert!(bridge.recv().await.is_none(), "the connection is closed");
    assert_eq!(
        relay
            .http("GET", "/v1/sessions", Some(&token), None)
            .await
            .0,
        401
    );
    assert_eq!(
        websocket(relay.addr, BRIDGE_PATH, &token).await.err(),
        Some(401)
    );
    relay.stop().await;
}

#[tokio::test]
async fn session_lifecycle_and_illegal_transitions() {
    let relay = TestRelay::start(shell_agent()).await;
    let token = relay.token("alice", "acme");
    let session = relay.create(&token, r#"{"task": "demo"}"#).await;
    let id = session["id"].as_str().unwrap().to_owned();
    assert_eq!(session["status"], "running");
    assert_eq!(session["visibility"], "private");
    assert_eq!(session["network_access"], "limited");
    assert_eq!(session["repo_access"], "write");
    assert_eq!(session["vm_image"], "default");
    assert_eq!(session["owner"], "alice");
    assert!(relay.workspace(&id).is_dir());

    let (status, paused) = relay
        .http(
            "POST",
            &format!("/v1/sessions/{id}/pause"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!((status, paused["status"].as_str()), (200, Some("paused")));
    let (status, error) = relay
        .http(
            "POST",
            &format!("/v1/sessions/{id}/pause"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, 409);
    assert_eq!(
        error["error"],
        "cannot move a paused session to paused; from paused it can move to: running, completed"
    );
    let (status, resumed) = relay
        .http(
            "POST",
            &format!("/v1/sessions/{id}/resume"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!((status, resumed["status"].as_str()), (200, Some("running")));
    let (status, _) = relay
        .http(
            "POST",
            &format!("/v1/sessions/{id}/complete"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let (status, error) = relay
        .http(
            "POST",
            &format!("/v1/sessions/{id}/resume"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, 409);
    assert!(error["error"].as_str().unwrap().contains("final"));
    let (status, error) = relay
        .http(
            "POST",
            &format!("/v1/sessions/{id}/messages"),
            Some(&token),
            Some(r#"{"text":"ls"}"#),
        )
        .await;
    assert_eq!(status, 409, "{error}");

    let statuses: Vec<SessionStatus> = relay
        .log(&token, &id)
        .await
        .iter()
        .filter_map(|e| match e.event {
            SessionEvent::Status { status, .. } => Some(status),
            _ => None,
        })
        .collect();
    use SessionStatus::*;
    assert_eq!(statuses, [Starting, Running, Paused, Running, Completed]);
    let log = relay.log(&token, &id).await;
    assert!(
        log.iter().enumerate().all(|(i, e)| e.seq == i as u64 + 1),
        "seqs from 1 without gaps"
    );

    let (status, _) = relay
        .http("POST", "/v1/sessions", Some(&token), Some("{not json"))
        .await;
    assert_eq!(status, 400);
    let (status, _) = relay
        .http("DELETE", &format!("/v1/sessions/{id}"), Some(&token), None)
        .await;
    assert_eq!(status, 204);
    assert_eq!(
        relay
            .http("GET", &format!("/v1/sessions/{id}"), Some(&token), None)
            .await
            .0,
        404
    );
    assert_eq!(
        relay
            .http("GET", &format!("/v1/sessions/{id}/log"), Some(&token), None)
            .await
            .0,
        404
    );
    wait_for_async("the workspace to be removed", DEADLINE, || async {
        if relay.workspace(&id).exists() {
            Err("it exists".to_owned())
        } else {
            Ok(())
        }
    })
    .await;
    relay.stop().await;
}

#[tokio::test]
async fn visibility_is_enforced() {
    let relay = TestRelay::start(script_agent("cat > /dev/null")).await;
    let alice = relay.token("alice", "acme");
    let bob = relay.token("bob", "acme");
    let carol = relay.token("carol", "other");
    let team = relay.create(&alice, r#"{"visibility": "team"}"#).await;
    let id = team["id"].as_str().unwrap().to_owned();
    let private = relay.create(&alice, "{}").await;
    let private_id = private["id"].as_str().unwrap().to_owned();

    let listed = |value: serde_json::Value| -> Vec<String> {
        value
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        listed(relay.http("GET", "/v1/sessions", Some(&bob), None).await.1),
        vec![id.clone()]
    );
    assert!(listed(
        relay
            .http("GET", "/v1/sessions", Some(&carol), None)
            .await
            .1
    )
    .is_empty());
    assert_eq!(
        relay
            .http("GET", &format!("/v1/sessions/{id}"), Some(&carol), None)
            .await
            .0,
        404
    );
    assert_eq!(
        relay
            .http(
                "GET",
                &format!("/v1/sessions/{private_id}"),
                Some(&bob),
                None
            )
            .await
            .0,
        404
    );
    let (status, _) = relay
        .http(
            "POST",
            &format!("/v1/sessions/{id}/messages"),
            Some(&bob),
            Some(r#"{"text":"hi"}"#),
        )
        .await;
    assert_eq!(status, 200, "team members may send");
    assert_eq!(
        websocket(relay.addr, &format!("/v1/sessions/{id}/subscribe"), &carol)
            .await
            .err(),
        Some(404)
    );

    let (status, _) = relay
        .http(
            "POST",
            &format!("/v1/sessions/{id}/share"),
            Some(&alice),
            Some(r#"{"visibility":"public"}"#),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        relay
            .http("GET", &format!("/v1/sessions/{id}"), Some(&carol), None)
            .await
            .0,
        200
    );
    assert!(listed(
        relay
            .http("GET", "/v1/sessions", Some(&carol), None)
            .await
            .1
    )
    .is_empty());
    let (status, error) = relay
        .http(
            "POST",
            &format!("/v1/sessions/{id}/messages"),
            Some(&carol),
            Some(r#"{"text":"hi"}"#),
        )
        .await;
    assert_eq!(
        (status, error["error"].as_str()),
        (403, Some("viewers cannot send"))
    );
    for action in ["pause", "interrupt", "complete"] {
        assert_eq!(
            relay
                .http(
                    "POST",
                    &format!("/v1/sessions/{id}/{action}"),
                    Some(&carol),
                    None
                )
                .await
                .0,
            403
        );
    }
    assert_eq!(
        relay
            .http("DELETE", &format!("/v1/sessions/{id}"), Some(&carol), None)
            .await
            .0,
        403
    );

    // An outsider's bridge cannot join a private session, nor send to a public one.
    let (mut carol_bridge, sessions) = Bridge::connect(relay.addr, &carol, "i-carol").await;
    assert!(sessions.is_empty());
    carol_bridge
        .send(
            0,
            ToRelay::Join {
                session: private_id.clone(),
                after: 0,
            },
        )
        .await;
    carol_bridge
        .recv_until("join refused", |m| {
            matches!(m, FromRelay::JoinRefused { .. }).then_some(())
        })
        .await;
    carol_bridge
        .send(
            1,
            ToRelay::Event(Outbound::UserMessage {
                session: id.clone(),
                text: "x".into(),
                key: None,
            }),
        )
        .await;
    let reason = carol_bridge
        .recv_until("event refused", |m| match m {
            FromRelay::EventRefused { seq: 1, reason } => Some(reason.clone()),
            _ => None,
        })
        .await;
    assert_eq!(reason, "viewers cannot send");
    assert_eq!(carol_bridge.ack, 1, "a refused event is still acknowledged");

    // The viewer endpoint streams the log read-only.
    let mut viewer = websocket(
        relay.addr,
        &format!("/v1/sessions/{id}/subscribe?after=0"),
        &carol,
    )
    .await
    .unwrap();
    use futures_util::{SinkExt as _, StreamExt as _};
    let first = tokio::time::timeout(DEADLINE, viewer.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let entry: cloud_protocol::session::LogEntry =
        serde_json::from_str(first.to_text().unwrap()).unwrap();
    assert_eq!(entry.seq, 1);
    viewer
        .send(Message::text(r#"{"text":"ignored"}"#))
        .await
        .unwrap();
    let before = relay.log(&alice, &id).await.len();

    // Bob's replica loses the session when it becomes private.
    let (mut bob_bridge, sessions) = Bridge::connect(relay.addr, &bob, "i-bob").await;
    assert_eq!(sessions.len(), 1);
    relay
        .http(
            "POST",
            &format!("/v1/sessions/{id}/share"),
            Some(&alice),
            Some(r#"{"visibility":"private"}"#),
        )
        .await;
    let removed = bob_bridge
        .recv_until("session removed", |m| match m {
            FromRelay::SessionRemoved { session } => Some(session.clone()),
            _ => None,
        })
        .await;
    assert_eq!(removed, id);
    assert_eq!(
        relay
            .http("GET", &format!("/v1/sessions/{id}"), Some(&bob), None)
            .await
            .0,
        404
    );
    assert_eq!(
        relay.log(&alice, &id).await.len(),
        before,
        "what a viewer sends changes nothing"
    );
    relay.stop().await;
}

/// Sends a message through REST, waits for the prompt, answers it, and returns the log
/// entries after the answer once the result arrives.
async fn run_command(
    relay: &TestRelay,
    token: &str,
    id: &str,
    command: &str,
    answer: serde_json::Value,
) -> (String, Vec<cloud_protocol::session::LogEntry>) {
    let sent_seq = relay.send_message(token, id, command).await;
    let prompt = relay
        .wait_for_log(token, id, "a permission prompt", |e| {
            e.seq > sent_seq && is_prompt(e)
        })
        .await;
    let prompt = message(&prompt).unwrap();
    assert_eq!(prompt["request"]["tool_name"], "Bash");
    assert_eq!(prompt["request"]["input"]["command"], command);
    let request_id = prompt["request_id"].as_str().unwrap().to_owned();
    let (status, answered) = relay
        .http(
            "POST",
            &format!("/v1/sessions/{id}/permissions/{request_id}"),
            Some(token),
            Some(&answer.to_string()),
        )
        .await;
    assert_eq!(status, 200, "{answered}");
    let answer_seq = answered["seq"].as_u64().unwrap();
    relay
        .wait_for_log(token, id, "a result", |e| {
            e.seq > answer_seq && is_result(e)
        })
        .await;
    let log = relay.log(token, id).await;
    (
        request_id,
        log.into_iter().filter(|e| e.seq > answer_seq).collect(),
    )
}

#[tokio::test]
async fn shell_agent_round_trip_over_rest() {
    let relay = TestRelay::start(shell_agent()).await;
    let token = relay.token("alice", "acme");
    let id = relay.create(&token, "{}").await["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let (request_id, after) = run_command(
        &relay,
        &token,
        &id,
        "echo hi && pwd",
        json!({"behavior": "allow"}),
    )
    .await;
    let texts: Vec<String> = after.iter().filter_map(assistant_text).collect();
    assert_eq!(texts[0], "hi");
    assert_eq!(
        std::path::Path::new(&texts[1])
            .file_name()
            .unwrap()
            .to_str(),
        Some(id.as_str()),
        "runs in the workspace"
    );
    let result = message(after.iter().find(|e| is_result(e)).unwrap()).unwrap();
    assert_eq!(
        (result["subtype"].as_str(), result["exit_code"].as_i64()),
        (Some("success"), Some(0))
    );

    let (status, error) = relay
        .http(
            "POST",
            &format!("/v1/sessions/{id}/permissions/{request_id}"),
            Some(&token),
            Some(r#"{"behavior":"allow"}"#),
        )
        .await;
    assert_eq!(status, 409);
    assert!(
        error["error"]
            .as_str()
            .unwrap()
            .contains("already answered"),
        "{error}"
    );

    let (_, after) = run_command(
        &relay,
        &token,
        &id,
        "echo changed",
        json!({"behavior": "allow", "updated_input": {"command": "echo updated"}}),
    )
    .await;
    assert_eq!(
        after.iter().filter_map(assistant_text).collect::<Vec<_>>(),
        ["updated"]
    );

    let (_, after) = run_command(
        &relay,
        &token,
        &id,
        "touch should-not-exist",
        json!({"behavior": "deny", "message": "nope"}),
    )
    .await;
    let result = message(after.iter().find(|e| is_result(e)).unwrap()).unwrap();
    assert_eq!(result["subtype"], "error");
    assert!(result["result"].as_str().unwrap().contains("nope"));
    assert!(!relay.workspace(&id).join("should-not-exist").exists());

    // The user's own messages and answers are in the log, by the user.
    let log = relay.log(&token, &id).await;
    assert!(log.iter().any(|e| e.author == Author::User("alice".into())
        && message(e).is_some_and(|m| m["type"] == "user")));
    assert!(log.iter().any(|e| e.author == Author::User("alice".into())
        && message(e).is_some_and(|m| m["type"] == "control_response")));
    relay.stop().await;
}

#[tokio::test]
async fn interrupt_kills_the_running_command() {
    let relay = TestRelay::start(shell_agent()).await;
    let token = relay.token("alice", "acme");
    let id = relay.create(&token, "{}").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    relay
        .http(
            "POST",
            &format!("/v1/sessions/{id}/messages"),
            Some(&token),
            Some(r#"{"text":"echo started; sleep 600"}"#),
        )
        .await;
    let prompt = relay.wait_for_log(&token, &id, "a prompt", is_prompt).await;
    let request_id = message(&prompt).unwrap()["request_id"]
        .as_str()
        .unwrap()
        .to_owned();
    relay
        .http(
            "POST",
            &format!("/v1/sessions/{id}/permissions/{request_id}"),
            Some(&token),
            Some(r#"{"behavior":"allow"}"#),
        )
        .await;
    relay
        .wait_for_log(&token, &id, "output", |e| {
            assistant_text(e).as_deref() == Some("started")
        })
        .await;
    let (status, _) = relay
        .http(
            "POST",
            &format!("/v1/sessions/{id}/interrupt"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let result = relay.wait_for_log(&token, &id, "a result", is_result).await;
    assert_eq!(message(&result).unwrap()["result"], "interrupted");
    relay
        .wait_for_log(&token, &id, "the interrupt's answer", |e| {
            e.author == Author::Agent
                && message(e).is_some_and(|m| {
                    m["type"] == "control_response" && m["response"]["subtype"] == "success"
                })
        })
        .await;
    relay.stop().await;
}

#[tokio::test]
async fn shell_agent_round_trip_over_the_bridge_with_dedup() {
    let relay = TestRelay::start(shell_agent()).await;
    let token = relay.token("alice", "acme");
    let (mut bridge, sessions) = Bridge::connect(relay.addr, &token, "i-1").await;
    assert!(sessions.is_empty());
    bridge
        .send(
            0,
            ToRelay::Request {
                id: 7,
                request: RelayRequest::Create(CreateSession {
                    task: "t".into(),
                    visibility: Visibility::Private,
                    network_access: NetworkAccess::Limited,
                    repo_access: RepoAccess::Write,
                    vm_image: "default".into(),
                    ..CreateSession::default()
                }),
            },
        )
        .await;
    let session = bridge
        .recv_until("the reply", |m| match m {
            FromRelay::Reply { id: 7, result } => Some(result.clone().unwrap().unwrap()),
            _ => None,
        })
        .await;
    assert_eq!(session.status, SessionStatus::Running);
    let id = session.id.clone();
    bridge
        .send(
            0,
            ToRelay::Join {
                session: id.clone(),
                after: 0,
            },
        )
        .await;
    bridge
        .send(
            1,
            ToRelay::Event(Outbound::UserMessage {
                session: id.clone(),
                text: "echo hi".into(),
                key: None,
            }),
        )
        .await;
    bridge.wait_ack(1).await;
    let request_id = bridge
        .recv_until("a prompt", |m| match m {
            FromRelay::Log { entry, .. } if is_prompt(entry) => message(entry).unwrap()
                ["request_id"]
                .as_str()
                .map(str::to_owned),
            _ => None,
        })
        .await;
    let allow = Outbound::PermissionAnswer {
        session: id.clone(),
        request_id: request_id.clone(),
        decision: PermissionDecision::Allow {
            updated_input: None,
        },
        key: None,
    };
    bridge.send(2, ToRelay::Event(allow.clone())).await;
    let mut texts = Vec::new();
    bridge
        .recv_until("a result", |m| match m {
            FromRelay::Log { entry, .. } => {
                texts.extend(assistant_text(entry));
                is_result(entry).then_some(())
            }
            _ => None,
        })
        .await;
    assert_eq!(texts, ["hi"]);

    // A second answer is refused but acknowledged.
    bridge.send(3, ToRelay::Event(allow)).await;
    let reason = bridge
        .recv_until("the refusal", |m| match m {
            FromRelay::EventRefused { seq: 3, reason } => Some(reason.clone()),
            _ => None,
        })
        .await;
    assert!(reason.contains("already answered"), "{reason}");
    assert!(bridge.ack >= 3);

    // A resent event (same instance, same seq) is acknowledged but not applied again, even
    // on a new connection.
    drop(bridge);
    let (mut bridge, sessions) = Bridge::connect(relay.addr, &token, "i-1").await;
    assert_eq!(sessions.len(), 1);
    assert_eq!(
        bridge.ack, 3,
        "the registration's answer carries the instance's ack"
    );
    bridge
        .send(
            1,
            ToRelay::Event(Outbound::UserMessage {
                session: id.clone(),
                text: "echo hi".into(),
                key: None,
            }),
        )
        .await;
    bridge
        .send(
            4,
            ToRelay::Event(Outbound::UserMessage {
                session: id.clone(),
                text: "echo second".into(),
                key: None,
            }),
        )
        .await;
    bridge.wait_ack(4).await;
    let log = relay.log(&token, &id).await;
    let users: Vec<String> = log
        .iter()
        .filter_map(|e| {
            message(e)
                .filter(|m| m["type"] == "user")
                .map(|m| m["message"]["content"].as_str().unwrap().to_owned())
        })
        .collect();
    assert_eq!(users, ["echo hi", "echo second"]);

    // A deny over the bridge.
    bridge
        .send(
            0,
            ToRelay::Join {
                session: id.clone(),
                after: log.last().unwrap().seq - 1,
            },
        )
        .await;
    let request_id = bridge
        .recv_until("the second prompt", |m| match m {
            FromRelay::Log { entry, .. } if is_prompt(entry) => message(entry).unwrap()
                ["request_id"]
                .as_str()
                .map(str::to_owned),
            _ => None,
        })
        .await;
    bridge
        .send(
            5,
            ToRelay::Event(Outbound::PermissionAnswer {
                session: id.clone(),
                request_id,
                decision: PermissionDecision::Deny {
                    message: "not now".into(),
                },
                key: None,
            }),
        )
        .await;
    let result = bridge
        .recv_until("the denial", |m| match m {
            FromRelay::Log { entry, .. } if is_result(entry) => message(entry),
            _ => None,
        })
        .await;
    assert!(result["result"].as_str().unwrap().contains("not now"));
    relay.stop().await;
}

#[tokio::test]
async fn unknown_control_subtypes_are_answered_with_an_error() {
    let script = r#"echo '{"type":"control_request","request_id":"b1","request":{"subtype":"bogus"}}'; while read line; do echo "$line" >> replies.txt; done"#;
    let relay = TestRelay::start(script_agent(script)).await;
    let token = relay.token("alice", "acme");
    let id = relay.create(&token, "{}").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let response = relay
        .wait_for_log(&token, &id, "the error response", |e| {
            e.author == Author::Relay && message(e).is_some_and(|m| m["type"] == "control_response")
        })
        .await;
    let response = message(&response).unwrap();
    assert_eq!(response["response"]["subtype"], "error");
    assert_eq!(response["response"]["request_id"], "b1");
    let replies = relay.workspace(&id).join("replies.txt");
    let text = wait_for_async("the agent to get the error response", DEADLINE, || async {
        let text = std::fs::read_to_string(&replies).unwrap_or_default();
        if text.contains("\"b1\"") {
            Ok(text)
        } else {
            Err(text)
        }
    })
    .await;
    assert!(text.contains("\"error\""));
    relay.stop().await;
}

#[tokio::test]
async fn a_crashed_agent_fails_the_session_and_paused_messages_wait_for_resume() {
    let relay = TestRelay::start(script_agent("echo boom >&2; exit 3")).await;
    let token = relay.token("alice", "acme");
    let id = relay.create(&token, "{}").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let failed = relay.wait_for_status(&token, &id, "failed").await;
    let failure = failed["failure"].as_str().unwrap();
    assert!(
        failure.contains('3') && failure.contains("boom"),
        "{failure}"
    );
    relay.stop().await;

    let relay = TestRelay::start(script_agent("cat >> input.txt")).await;
    let token = relay.token("alice", "acme");
    let id = relay.create(&token, "{}").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    relay
        .http(
            "POST",
            &format!("/v1/sessions/{id}/pause"),
            Some(&token),
            None,
        )
        .await;
    relay.send_message(&token, &id, "while paused").await;
    assert!(
        !std::fs::read_to_string(relay.workspace(&id).join("input.txt"))
            .unwrap_or_default()
            .contains("while paused")
    );
    relay
        .http(
            "POST",
            &format!("/v1/sessions/{id}/resume"),
            Some(&token),
            None,
        )
        .await;
    let input = relay.workspace(&id).join("input.txt");
    wait_for_async(
        "the queued message to reach the new agent",
        DEADLINE,
        || async {
            let text = std::fs::read_to_string(&input).unwrap_or_default();
            if text.contains("while paused") {
                Ok(())
            } else {
                Err(text)
            }
        },
    )
    .await;
    relay.stop().await;
}

#[tokio::test]
async fn a_restart_keeps_sessions_logs_and_dedup() {
    let mut relay = TestRelay::start(shell_agent()).await;
    let token = relay.token("alice", "acme");
    let id = relay.create(&token, r#"{"task":"keep me"}"#).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (mut bridge, _) = Bridge::connect(relay.addr, &token, "i-r").await;
    bridge
        .send(
            1,
            ToRelay::Event(Outbound::UserMessage {
                session: id.clone(),
                text: "echo one".into(),
                key: None,
            }),
        )
        .await;
    bridge.wait_ack(1).await;
    let prompt = relay.wait_for_log(&token, &id, "a prompt", is_prompt).await;
    let request_id = message(&prompt).unwrap()["request_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let before = relay.log(&token, &id).await;
    drop(bridge);

    relay.restart().await;
    let session = relay.wait_for_status(&token, &id, "running").await;
    assert_eq!(session["task"], "keep me");
    let after = relay.log(&token, &id).await;
    assert_eq!(
        &after[..before.len()],
        &before[..],
        "the log survives unchanged"
    );
    assert!(
        after
            .iter()
            .any(|e| e.author == Author::Relay
                && message(e).is_some_and(|m| m["type"] == "control_cancel_request"
                    && m["request_id"] == request_id.as_str())),
        "the dead agent's prompt is withdrawn"
    );
    let (status, error) = relay
        .http(
            "POST",
            &format!("/v1/sessions/{id}/permissions/{request_id}"),
            Some(&token),
            Some(r#"{"behavior":"allow"}"#),
        )
        .await;
    assert_eq!(status, 409);
    assert!(error["error"].as_str().unwrap().contains("withdrawn"));

    let (mut bridge, sessions) = Bridge::connect(relay.addr, &token, "i-r").await;
    assert_eq!(sessions.len(), 1);
    assert_eq!(bridge.ack, 1);
    bridge
        .send(
            1,
            ToRelay::Event(Outbound::UserMessage {
                session: id.clone(),
                text: "echo one".into(),
                key: None,
            }),
        )
        .await;
    bridge
        .send(
            2,
            ToRelay::Event(Outbound::UserMessage {
                session: id.clone(),
                text: "echo two".into(),
                key: None,
            }),
        )
        .await;
    bridge.wait_ack(2).await;
    // The restarted agent works: it prompts again for the message the dead one had not
    // finished (that prompt may already be in `after`, so anything after `before` counts).
    relay
        .wait_for_log(&token, &id, "a new prompt", |e| {
            e.seq > before.len() as u64
                && is_prompt(e)
                && message(e).is_some_and(|m| m["request_id"] != request_id.as_str())
        })
        .await;
    let n_user = relay
        .log(&token, &id)
        .await
        .iter()
        .filter(|e| message(e).is_some_and(|m| m["type"] == "user"))
        .count();
    assert_eq!(n_user, 2);
    relay.stop().await;
}

#[tokio::test]
async fn malformed_and_oversized_bridge_messages_are_refused_without_harm() {
    let relay = TestRelay::start(script_agent("cat > /dev/null")).await;
    let token = relay.token("alice", "acme");
    let id = relay.create(&token, "{}").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (mut healthy, _) = Bridge::connect(relay.addr, &token, "i-healthy").await;

    async fn expect_refusal(bridge: &mut Bridge) {
        let refusal = bridge.recv().await;
        assert!(
            matches!(
                refusal,
                Some(FromRelay::Refused {
                    permanent: false,
                    ..
                }) | None
            ),
            "{refusal:?}"
        );
        assert!(bridge.recv().await.is_none(), "closed after the refusal");
    }

    // Garbage after registering.
    let (mut bad, _) = Bridge::connect(relay.addr, &token, "i-bad").await;
    bad.send_raw(Message::Binary(vec![0xff; 64].into())).await;
    expect_refusal(&mut bad).await;
    // Text instead of binary.
    let (mut bad, _) = Bridge::connect(relay.addr, &token, "i-bad").await;
    bad.send_raw(Message::text("hello")).await;
    expect_refusal(&mut bad).await;
    // Something other than Register first.
    let socket = websocket(relay.addr, BRIDGE_PATH, &token).await.unwrap();
    let mut bad = Bridge { socket, ack: 0 };
    bad.send(0, ToRelay::Heartbeat).await;
    expect_refusal(&mut bad).await;
    // Oversized.
    let (mut bad, _) = Bridge::connect(relay.addr, &token, "i-bad").await;
    if bad
        .send_raw(Message::Binary(vec![0u8; MAX_BRIDGE_MESSAGE + 1].into()))
        .await
    {
        expect_refusal(&mut bad).await;
    }

    healthy
        .send(
            1,
            ToRelay::Event(Outbound::UserMessage {
                session: id.clone(),
                text: "still fine".into(),
                key: None,
            }),
        )
        .await;
    healthy.wait_ack(1).await;
    assert_eq!(
        relay
            .http("GET", &format!("/v1/sessions/{id}"), Some(&token), None)
            .await
            .0,
        200
    );
    relay.stop().await;
}

#[test]
fn arbitrary_first_messages_never_harm_a_live_relay() {
    use proptest::prelude::*;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let relay = runtime.block_on(TestRelay::start(script_agent("cat > /dev/null")));
    let token = relay.token("alice", "acme");
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    });
    runner
        .run(&proptest::collection::vec(any::<u8>(), 0..256), |bytes| {
            runtime.block_on(async {
                let socket = websocket(relay.addr, BRIDGE_PATH, &token).await.unwrap();
                let mut bridge = Bridge { socket, ack: 0 };
                bridge.send_raw(Message::Binary(bytes.into())).await;
                // Either a refusal or, for bytes that happen to be a valid Register, a
                // registration; the relay must stay up either way.
                let _ = bridge.recv().await;
            });
            Ok(())
        })
        .unwrap();
    runtime.block_on(async {
        assert_eq!(
            relay
                .http("GET", "/v1/sessions", Some(&token), None)
                .await
                .0,
            200
        );
        relay.stop().await;
    });
}

#[tokio::test]
async fn ten_thousand_bridge_events_arrive_exactly_once_in_order() {
    let relay = TestRelay::start(script_agent("cat > /dev/null")).await;
    let token = relay.token("alice", "acme");
    let id = relay.create(&token, "{}").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (mut bridge, _) = Bridge::connect(relay.addr, &token, "i-bulk").await;
    const N: u64 = 10_000;
    let started = std::time::Instant::now();
    // Send everything, resending a window of already-sent seqs halfway (as a daemon does
    // after a reconnect), without waiting for acks.
    for seq in 1..=N {
        let event = Outbound::UserMessage {
            session: id.clone(),
            text: format!("m{seq}"),
            key: None,
        };
        bridge.send(seq, ToRelay::Event(event)).await;
        if seq == N / 2 {
            for again in N / 2 - 100..=N / 2 {
                let event = Outbound::UserMessage {
                    session: id.clone(),
                    text: format!("m{again}"),
                    key: None,
                };
                bridge.send(again, ToRelay::Event(event)).await;
            }
        }
    }
    bridge.wait_ack(N).await;
    eprintln!("{N} events acknowledged in {:?}", started.elapsed());
    let mut texts = Vec::new();
    let mut after = 0;
    loop {
        let (status, page) = relay
            .http(
                "GET",
                &format!("/v1/sessions/{id}/log?after={after}"),
                Some(&token),
                None,
            )
            .await;
        assert_eq!(status, 200);
        let page: Vec<cloud_protocol::session::LogEntry> = serde_json::from_value(page).unwrap();
        let Some(last) = page.last() else { break };
        after = last.seq;
        texts.extend(page.iter().filter_map(|e| {
            message(e)
                .filter(|m| m["type"] == "user")
                .map(|m| m["message"]["content"].as_str().unwrap().to_owned())
        }));
    }
    let expected: Vec<String> = (1..=N).map(|seq| format!("m{seq}")).collect();
    assert_eq!(texts, expected);
    let (status, error) = relay
        .http(
            "GET",
            &format!("/v1/sessions/{id}/log?after=x"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, 400);
    assert!(error["error"].is_string());
    relay.stop().await;
}
