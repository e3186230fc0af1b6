//! A daemon as a client of sessions, in process: a real relay on 127.0.0.1:0 and
//! daemon-like bridge clients sending `ToRelay::Attached`, read back through REST and the
//! bridge's own `Get`.

mod common;

use cloud_protocol::bridge::{FromRelay, RelayRequest, ToRelay};
use cloud_protocol::session::{ClientKind, Session};
use common::*;
use serde_json::Value;

/// Asks for the session over the bridge: the answer comes after everything sent before it
/// was handled (the connection takes messages in order), with the session's clients.
async fn get(bridge: &mut Bridge, id: u64, session: &str) -> Result<Option<Session>, String> {
    bridge
        .send(
            0,
            ToRelay::Request {
                id,
                request: RelayRequest::Get {
                    session: session.to_owned(),
                },
            },
        )
        .await;
    bridge
        .recv_until("the reply", |message| match message {
            FromRelay::Reply { id: got, result } if *got == id => Some(result.clone()),
            _ => None,
        })
        .await
}

fn rest_clients(session: &Value) -> Vec<Value> {
    session["clients"].as_array().unwrap().clone()
}

#[tokio::test]
async fn a_daemon_counts_for_the_sessions_it_reports_attached_that_its_user_may_see() {
    let relay = TestRelay::start(script_agent("cat >/dev/null")).await;
    let alice = relay.token("alice", "acme");
    let mallory = relay.token("mallory", "evil");
    let created = relay.create(&alice, "{}").await;
    let session = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["auto_stop_minutes"], 30, "the default: {created}");
    assert_eq!(created["clients"], serde_json::json!([]));

    // Another org's daemon claims alice's private session (and one that does not exist):
    // neither counts.
    let (mut intruder, _) = Bridge::connect(relay.addr, &mallory, "i-mallory").await;
    intruder
        .send(
            0,
            ToRelay::Attached {
                sessions: vec![session.clone(), "s-0000000000000000".to_owned()],
            },
        )
        .await;
    assert!(get(&mut intruder, 1, &session).await.is_err());

    let (mut daemon, _) = Bridge::connect(relay.addr, &alice, "i-alice").await;
    daemon
        .send(
            0,
            ToRelay::Attached {
                sessions: vec![session.clone(), session.clone()],
            },
        )
        .await;
    let shown = get(&mut daemon, 1, &session).await.unwrap().unwrap();
    assert_eq!(shown.clients.len(), 1, "{:?}", shown.clients);
    let client = &shown.clients[0];
    assert_eq!(
        (client.kind, client.user.as_str(), client.label.as_str()),
        (ClientKind::Daemon, "alice", "test")
    );
    let (status, body) = relay
        .http(
            "GET",
            &format!("/v1/sessions/{session}"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let clients = rest_clients(&body);
    assert_eq!(clients.len(), 1, "{body}");
    assert_eq!(clients[0]["kind"], "daemon");
    // A listing carries no clients.
    let (_, list) = relay.http("GET", "/v1/sessions", Some(&alice), None).await;
    assert_eq!(list[0]["clients"], serde_json::json!([]), "{list}");

    // The whole set each time: an empty one leaves.
    daemon.send(0, ToRelay::Attached { sessions: vec![] }).await;
    let shown = get(&mut daemon, 2, &session).await.unwrap().unwrap();
    assert!(shown.clients.is_empty(), "{:?}", shown.clients);

    // So does the connection's end.
    daemon
        .send(
            0,
            ToRelay::Attached {
                sessions: vec![session.clone()],
            },
        )
        .await;
    assert_eq!(
        get(&mut daemon, 3, &session)
            .await
            .unwrap()
            .unwrap()
            .clients
            .len(),
        1
    );
    drop(daemon);
    let path = format!("/v1/sessions/{session}");
    wait_for_async(
        "the daemon to leave with its connection",
        DEADLINE,
        || async {
            let (_, body) = relay.http("GET", &path, Some(&alice), None).await;
            let clients = rest_clients(&body);
            if clients.is_empty() {
                Ok(())
            } else {
                Err(format!("{clients:?}"))
            }
        },
    )
    .await;
    relay.stop().await;
}
