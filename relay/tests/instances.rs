//! Instance listing and instance commands, in process: a real relay on 127.0.0.1:0, raw
//! HTTP, and daemon-like bridge clients that answer (or do not answer) commands
//! themselves, so every outcome can be produced on purpose.

mod common;

use std::net::SocketAddr;

use cloud_protocol::bridge::{self, Channel, Envelope, FromRelay, Outbound, ToRelay};
use common::*;
use futures_util::StreamExt as _;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// The next envelope from the relay, whole (the helper's `recv` keeps only the body).
async fn recv_envelope(bridge: &mut Bridge) -> Option<Envelope<FromRelay>> {
    loop {
        let message = tokio::time::timeout(DEADLINE, bridge.socket.next())
            .await
            .expect("timed out waiting for the relay");
        match message {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return None,
            Some(Ok(Message::Binary(bytes))) => {
                return Some(bridge::decode::<FromRelay>(&bytes).unwrap())
            }
            Some(Ok(_)) => {}
        }
    }
}

/// Reads until a `Command` arrives; returns its envelope's ack, its id and its name.
async fn recv_command(bridge: &mut Bridge) -> (u64, u64, String) {
    loop {
        let envelope = recv_envelope(bridge)
            .await
            .expect("closed while waiting for a command");
        if let FromRelay::Command { id, name } = envelope.body {
            assert_eq!(envelope.channel, Channel::Extension);
            return (envelope.ack, id, name);
        }
    }
}

/// `POST /v1/instances/{instance}/commands` with `{"name": name}`, in a task of its own.
fn command(
    addr: SocketAddr,
    token: &str,
    instance: &str,
    name: &str,
) -> tokio::task::JoinHandle<(u16, Value)> {
    let token = token.to_owned();
    let path = format!("/v1/instances/{instance}/commands");
    let body = json!({ "name": name }).to_string();
    tokio::spawn(async move { http(addr, "POST", &path, Some(&token), Some(&body)).await })
}

async fn instances(relay: &TestRelay, token: &str) -> Vec<Value> {
    let (status, list) = relay.http("GET", "/v1/instances", Some(token), None).await;
    assert_eq!(status, 200, "{list}");
    list.as_array().unwrap().clone()
}

async fn wait_for_instances(
    relay: &TestRelay,
    token: &str,
    what: &str,
    mut done: impl FnMut(&[Value]) -> bool,
) -> Vec<Value> {
    let done = std::cell::RefCell::new(&mut done);
    common::wait_for_async(what, common::DEADLINE, || async {
        let list = instances(relay, token).await;
        if (done.borrow_mut())(&list) {
            Ok(list)
        } else {
            Err(format!("{list:?}"))
        }
    })
    .await
}

#[tokio::test]
async fn commands_reach_the_instance_and_its_answers_come_back() {
    let relay = TestRelay::start(script_agent("cat > /dev/null")).await;
    let ann = relay.token("ann", "acme");
    // Same org: instances are per user, not per org.
    let bob = relay.token("bob", "acme");
    let (mut daemon, _) = Bridge::connect(relay.addr, &ann, "i-ann").await;

    // Listed for ann only, with what it registered; a heartbeat shows.
    let list = instances(&relay, &ann).await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["instance"], "i-ann");
    assert_eq!(list[0]["hostname"], "test");
    assert_eq!(list[0]["daemon_version"], "0");
    assert_eq!(list[0]["bridge_version"], bridge::BRIDGE_VERSION);
    assert_eq!(list[0]["sessions"], json!([]));
    assert!(list[0]["connected_at"].as_u64().unwrap() > 0);
    assert_eq!(list[0]["last_heartbeat_at"], Value::Null);
    daemon.send(0, ToRelay::Heartbeat).await;
    wait_for_instances(&relay, &ann, "the heartbeat", |list| {
        list[0]["last_heartbeat_at"].as_u64().is_some()
    })
    .await;
    assert_eq!(instances(&relay, &bob).await, Vec::<Value>::new());
    let (status, body) = command(relay.addr, &bob, "i-ann", "ping").await.unwrap();
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"], "no such instance connected: i-ann");

    // An applied (here refused) event moves the ack, and a command's envelope carries it.
    daemon
        .send(
            1,
            ToRelay::Event(Outbound::UserMessage {
                session: "s-missing".into(),
                text: "x".into(),
                key: None,
            }),
        )
        .await;
    daemon.wait_ack(1).await;
    let call = command(relay.addr, &ann, "i-ann", "ping");
    let (ack, id, name) = recv_command(&mut daemon).await;
    assert_eq!((ack, name.as_str()), (1, "ping"));
    daemon
        .send(
            0,
            ToRelay::CommandResult {
                id,
                result: Ok("pong".into()),
            },
        )
        .await;
    let (status, body) = call.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"instance": "i-ann", "name": "ping", "result": "pong"})
    );

    // The daemon's error is a 422 with its message.
    let call = command(relay.addr, &ann, "i-ann", "frobnicate");
    let (_, id, _) = recv_command(&mut daemon).await;
    daemon
        .send(
            0,
            ToRelay::CommandResult {
                id,
                result: Err("unknown instance command \"frobnicate\"".into()),
            },
        )
        .await;
    let (status, body) = call.await.unwrap();
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"], "unknown instance command \"frobnicate\"");

    // Answers out of order go to the right callers; an unknown id is ignored.
    let first = command(relay.addr, &ann, "i-ann", "first");
    let (_, first_id, first_name) = recv_command(&mut daemon).await;
    let second = command(relay.addr, &ann, "i-ann", "second");
    let (_, second_id, second_name) = recv_command(&mut daemon).await;
    assert_eq!(
        (first_name.as_str(), second_name.as_str()),
        ("first", "second")
    );
    assert_ne!(first_id, second_id);
    for (id, result) in [(999, "stray"), (second_id, "two"), (first_id, "one")] {
        daemon
            .send(
                0,
                ToRelay::CommandResult {
                    id,
                    result: Ok(result.into()),
                },
            )
            .await;
    }
    assert_eq!(second.await.unwrap().1["result"], "two");
    assert_eq!(first.await.unwrap().1["result"], "one");

    // Bodies are checked.
    for body in ["{}", "{\"name\": \"ping\", \"extra\": 1}", "not json"] {
        let (status, answer) = relay
            .http(
                "POST",
                "/v1/instances/i-ann/commands",
                Some(&ann),
                Some(body),
            )
            .await;
        assert_eq!(status, 400, "{body}: {answer}");
    }
    // Without a token, 401.
    let (status, _) = relay.http("GET", "/v1/instances", None, None).await;
    assert_eq!(status, 401);

    // A command pending when the connection ends fails at once; then the instance is gone.
    let call = command(relay.addr, &ann, "i-ann", "hang");
    recv_command(&mut daemon).await;
    drop(daemon);
    let (status, body) = call.await.unwrap();
    assert_eq!(status, 502, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("disconnected"),
        "{body}"
    );
    wait_for_instances(&relay, &ann, "the instance to leave", <[Value]>::is_empty).await;
    let (status, _) = command(relay.addr, &ann, "i-ann", "ping").await.unwrap();
    assert_eq!(status, 404);
    relay.stop().await;
}

#[tokio::test]
async fn a_reconnect_replaces_the_instance_and_the_old_connection_cannot_remove_it() {
    let relay = TestRelay::start(script_agent("cat > /dev/null")).await;
    let ann = relay.token("ann", "acme");
    let bob = relay.token("bob", "other");
    let (mut old, _) = Bridge::connect(relay.addr, &ann, "i-1").await;
    let (mut new, _) = Bridge::connect(relay.addr, &ann, "i-1").await;
    // Bob's daemon with the same instance id is a different instance.
    let (mut bobs, _) = Bridge::connect(relay.addr, &bob, "i-1").await;
    assert_eq!(instances(&relay, &ann).await.len(), 1);
    assert_eq!(instances(&relay, &bob).await.len(), 1);

    // The old connection ends. Its refusal is written only after it left the registry
    // (with the close frame), so once it arrives the registry has had its say.
    old.send_raw(Message::Binary(vec![0xff; 8].into())).await;
    let refusal = old.recv().await;
    assert!(
        matches!(refusal, Some(FromRelay::Refused { .. })),
        "{refusal:?}"
    );
    assert_eq!(instances(&relay, &ann).await.len(), 1);

    // Commands reach the new connection, and ann's never reach bob's daemon.
    let call = command(relay.addr, &ann, "i-1", "ping");
    let (_, id, _) = recv_command(&mut new).await;
    new.send(
        0,
        ToRelay::CommandResult {
            id,
            result: Ok("new".into()),
        },
    )
    .await;
    assert_eq!(call.await.unwrap().1["result"], "new");
    let call = command(relay.addr, &bob, "i-1", "ping");
    let (_, id, _) = recv_command(&mut bobs).await;
    bobs.send(
        0,
        ToRelay::CommandResult {
            id,
            result: Ok("bob".into()),
        },
    )
    .await;
    assert_eq!(call.await.unwrap().1["result"], "bob");
    relay.stop().await;
}

#[tokio::test]
async fn a_shutdown_fails_pending_commands_with_503() {
    let relay = TestRelay::start(script_agent("cat > /dev/null")).await;
    let ann = relay.token("ann", "acme");
    let (mut daemon, _) = Bridge::connect(relay.addr, &ann, "i-1").await;
    let call = command(relay.addr, &ann, "i-1", "hang");
    recv_command(&mut daemon).await;
    let stop = tokio::spawn(relay.stop());
    let (status, body) = call.await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("shutting down"),
        "{body}"
    );
    stop.await.unwrap();
}
