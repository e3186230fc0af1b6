//! Nothing a user sends is lost or applied twice without a word: unfinished messages reach
//! the session's next agent after a pause or a relay restart, or are logged as not
//! processed when the session is completed; idempotency keys make retries safe, across
//! restarts; refused journaled events are logged as not delivered, once. A real relay on
//! 127.0.0.1:0 with the real shell agent (or a silent one), raw HTTP and a daemon-like
//! bridge client.

mod common;

use cloud_protocol::bridge::{FromRelay, Outbound, PermissionDecision, ToRelay};
use cloud_protocol::session::{Author, LogEntry, SessionEvent, SessionStatus};
use common::*;
use serde_json::{json, Value};

/// `POST path` with no body; returns the status and the answer.
async fn post(relay: &TestRelay, token: &str, path: &str) -> (u16, Value) {
    relay.http("POST", path, Some(token), None).await
}

/// The request id and command of a shell agent prompt.
fn prompt(entry: &LogEntry) -> Option<(String, String)> {
    let m = message(entry).filter(|_| is_prompt(entry))?;
    Some((
        m["request_id"].as_str()?.to_owned(),
        m["request"]["input"]["command"].as_str()?.to_owned(),
    ))
}

/// Waits for the prompt for `command` after log seq `after`; returns its request id and
/// log seq.
async fn wait_prompt(
    relay: &TestRelay,
    token: &str,
    id: &str,
    after: u64,
    command: &str,
) -> (String, u64) {
    let entry = relay
        .wait_for_log(token, id, &format!("the prompt for {command}"), |e| {
            e.seq > after && prompt(e).is_some_and(|(_, c)| c == command)
        })
        .await;
    (prompt(&entry).unwrap().0, entry.seq)
}

/// Sends a message over REST with an `Idempotency-Key`; returns the status and answer.
async fn send_keyed(
    relay: &TestRelay,
    token: &str,
    id: &str,
    key: &str,
    text: &str,
) -> (u16, Value) {
    http_with_headers(
        relay.addr,
        "POST",
        &format!("/v1/sessions/{id}/messages"),
        Some(token),
        Some(&json!({ "text": text }).to_string()),
        &[("Idempotency-Key", key)],
    )
    .await
}

async fn allow(relay: &TestRelay, token: &str, id: &str, request_id: &str) {
    let (status, answer) = relay
        .http(
            "POST",
            &format!("/v1/sessions/{id}/permissions/{request_id}"),
            Some(token),
            Some(r#"{"behavior":"allow"}"#),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
}

/// The seq of the session's last `running` status entry (the newest agent's start).
async fn last_start(relay: &TestRelay, token: &str, id: &str) -> u64 {
    relay
        .log(token, id)
        .await
        .iter()
        .rev()
        .find(|e| {
            matches!(
                e.event,
                SessionEvent::Status {
                    status: SessionStatus::Running,
                    ..
                }
            )
        })
        .expect("the session was started")
        .seq
}

/// The commands the agent asked about after log seq `after`, in order.
fn prompted_after(log: &[LogEntry], after: u64) -> Vec<String> {
    log.iter()
        .filter(|e| e.seq > after)
        .filter_map(|e| prompt(e).map(|(_, command)| command))
        .collect()
}

/// The relay's system entries of `subtype`, in order.
fn system_entries(log: &[LogEntry], subtype: &str) -> Vec<Value> {
    log.iter()
        .filter(|e| e.author == Author::Relay)
        .filter_map(message)
        .filter(|m| m["type"] == "system" && m["subtype"] == subtype)
        .collect()
}

fn user_message(session: &str, text: &str, key: Option<&str>) -> ToRelay {
    ToRelay::Event(Outbound::UserMessage {
        session: session.to_owned(),
        text: text.to_owned(),
        key: key.map(str::to_owned),
    })
}

fn allow_event(session: &str, request_id: &str, key: Option<&str>) -> ToRelay {
    ToRelay::Event(Outbound::PermissionAnswer {
        session: session.to_owned(),
        request_id: request_id.to_owned(),
        decision: PermissionDecision::Allow {
            updated_input: None,
        },
        key: key.map(str::to_owned),
    })
}

/// The texts of the user messages in a session's log.
fn user_texts(log: &[LogEntry]) -> Vec<String> {
    log.iter()
        .filter_map(message)
        .filter(|m| m["type"] == "user")
        .map(|m| m["message"]["content"].as_str().unwrap().to_owned())
        .collect()
}

/// Reads until the refusal of `seq`; returns its reason.
async fn refusal_of(bridge: &mut Bridge, seq: u64) -> String {
    bridge
        .recv_until(&format!("the refusal of {seq}"), |m| match m {
            FromRelay::EventRefused {
                seq: refused,
                reason,
            } if *refused == seq => Some(reason.clone()),
            _ => None,
        })
        .await
}

#[tokio::test]
async fn unfinished_messages_reach_the_next_agent_after_a_restart_each_once() {
    let mut relay = TestRelay::start(shell_agent()).await;
    let token = relay.token("alice", "acme");
    let id = relay.create(&token, "{}").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // AAA's prompt stays unanswered; BBB waits behind it in the agent.
    relay.send_message(&token, &id, "echo AAA").await;
    relay.send_message(&token, &id, "echo BBB").await;
    wait_prompt(&relay, &token, &id, 0, "echo AAA").await;
    // A pause keeps the same agent (it is only stopped): a restarted relay starts a new one.
    relay.restart().await;

    // The new agent gets both, in order: AAA is asked again, then BBB.
    let resumed = last_start(&relay, &token, &id).await;
    let (aaa, _) = wait_prompt(&relay, &token, &id, resumed, "echo AAA").await;
    allow(&relay, &token, &id, &aaa).await;
    let (bbb, asked) = wait_prompt(&relay, &token, &id, resumed, "echo BBB").await;
    allow(&relay, &token, &id, &bbb).await;
    relay
        .wait_for_log(&token, &id, "BBB's result", |e| {
            e.seq > asked && is_result(e)
        })
        .await;
    let log = relay.log(&token, &id).await;
    assert_eq!(prompted_after(&log, resumed), ["echo AAA", "echo BBB"]);
    assert_eq!(
        log.iter().filter_map(assistant_text).collect::<Vec<_>>(),
        ["AAA", "BBB"],
        "each ran exactly once"
    );

    // Finished turns are never handed over again: after another restart, the first prompt
    // is for the next message.
    relay.restart().await;
    let resumed = last_start(&relay, &token, &id).await;
    relay.send_message(&token, &id, "echo CCC").await;
    wait_prompt(&relay, &token, &id, resumed, "echo CCC").await;
    let log = relay.log(&token, &id).await;
    assert_eq!(prompted_after(&log, resumed), ["echo CCC"]);
    relay.stop().await;
}

#[tokio::test]
async fn a_message_in_progress_reaches_the_next_agent_after_a_relay_restart() {
    let mut relay = TestRelay::start(shell_agent()).await;
    let token = relay.token("alice", "acme");
    let id = relay.create(&token, "{}").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    relay.send_message(&token, &id, "echo AAA").await;
    wait_prompt(&relay, &token, &id, 0, "echo AAA").await;

    relay.restart().await;
    relay.wait_for_status(&token, &id, "running").await;
    let restarted = last_start(&relay, &token, &id).await;
    let (aaa, _) = wait_prompt(&relay, &token, &id, restarted, "echo AAA").await;
    allow(&relay, &token, &id, &aaa).await;
    relay
        .wait_for_log(&token, &id, "AAA's output", |e| {
            assistant_text(e).as_deref() == Some("AAA")
        })
        .await;
    relay
        .wait_for_log(&token, &id, "AAA's result", |e| {
            e.seq > restarted && is_result(e)
        })
        .await;

    // Finished: the next restart's agent starts with the next message.
    relay.restart().await;
    relay.wait_for_status(&token, &id, "running").await;
    let restarted = last_start(&relay, &token, &id).await;
    relay.send_message(&token, &id, "echo CCC").await;
    wait_prompt(&relay, &token, &id, restarted, "echo CCC").await;
    let log = relay.log(&token, &id).await;
    assert_eq!(prompted_after(&log, restarted), ["echo CCC"]);
    assert_eq!(
        log.iter().filter_map(assistant_text).collect::<Vec<_>>(),
        ["AAA"]
    );
    relay.stop().await;
}

#[tokio::test]
async fn unfinished_messages_of_a_completed_session_are_logged_as_not_processed() {
    let mut relay = TestRelay::start(shell_agent()).await;
    let token = relay.token("alice", "acme");
    let id = relay.create(&token, "{}").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let aaa = relay.send_message(&token, &id, "echo AAA").await;
    let bbb = relay.send_message(&token, &id, "echo BBB").await;
    wait_prompt(&relay, &token, &id, 0, "echo AAA").await;
    let (status, completed) = post(&relay, &token, &format!("/v1/sessions/{id}/complete")).await;
    assert_eq!(status, 200, "{completed}");
    let log = relay.log(&token, &id).await;
    let not_processed = system_entries(&log, "not_processed");
    assert_eq!(not_processed.len(), 2, "{not_processed:#?}");
    for (entry, (text, seq)) in not_processed
        .iter()
        .zip([("echo AAA", aaa), ("echo BBB", bbb)])
    {
        assert_eq!(entry["message"], text);
        assert_eq!(entry["seq"], seq);
        assert_eq!(
            entry["reason"],
            "the session was completed before an agent finished it"
        );
    }

    // Messages sent while paused, never handed to any agent, too.
    let paused = relay.create(&token, "{}").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        post(&relay, &token, &format!("/v1/sessions/{paused}/pause"))
            .await
            .0,
        200
    );
    relay.send_message(&token, &paused, "echo CCC").await;
    assert_eq!(
        post(&relay, &token, &format!("/v1/sessions/{paused}/complete"))
            .await
            .0,
        200
    );
    let log = relay.log(&token, &paused).await;
    let not_processed = system_entries(&log, "not_processed");
    assert_eq!(not_processed.len(), 1, "{not_processed:#?}");
    assert_eq!(not_processed[0]["message"], "echo CCC");

    // Given up once: a restart neither logs them again nor hands them to anyone.
    relay.restart().await;
    let log = relay.log(&token, &id).await;
    assert_eq!(system_entries(&log, "not_processed").len(), 2);
    relay.stop().await;
}

#[tokio::test]
async fn a_repeated_idempotency_key_is_one_event_even_across_a_restart() {
    let mut relay = TestRelay::start(script_agent("cat > /dev/null")).await;
    let token = relay.token("alice", "acme");
    let id = relay.create(&token, "{}").await["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Over the bridge: a retry is a new journal entry with the key of the first.
    let (mut bridge, _) = Bridge::connect(relay.addr, &token, "i-1").await;
    bridge.send(1, user_message(&id, "one", Some("k-1"))).await;
    bridge.send(2, user_message(&id, "one", Some("k-1"))).await;
    bridge.send(3, user_message(&id, "two", None)).await;
    bridge.wait_ack(3).await;
    assert_eq!(user_texts(&relay.log(&token, &id).await), ["one", "two"]);

    // A refused event's repeat is refused again, as the first was, and logged once.
    bridge
        .send(4, allow_event(&id, "r-none", Some("k-2")))
        .await;
    let first = refusal_of(&mut bridge, 4).await;
    bridge
        .send(5, allow_event(&id, "r-none", Some("k-2")))
        .await;
    assert_eq!(refusal_of(&mut bridge, 5).await, first);
    bridge.wait_ack(5).await;
    drop(bridge);

    // Over REST, scoped by user.
    let (status, first_rest) = send_keyed(&relay, &token, &id, "k-1", "three").await;
    assert_eq!(status, 200, "{first_rest}");
    let again = send_keyed(&relay, &token, &id, "k-1", "three").await;
    assert_eq!(again, (200, first_rest.clone()));
    let (status, error) = send_keyed(&relay, &token, &id, &"k".repeat(129), "too long").await;
    assert_eq!(status, 400, "{error}");

    // Across a restart: the keys are durable.
    relay.restart().await;
    let (mut bridge, _) = Bridge::connect(relay.addr, &token, "i-1").await;
    assert_eq!(bridge.ack, 5);
    bridge.send(6, user_message(&id, "one", Some("k-1"))).await;
    bridge
        .send(7, allow_event(&id, "r-none", Some("k-2")))
        .await;
    assert_eq!(refusal_of(&mut bridge, 7).await, first);
    bridge.wait_ack(7).await;
    let again = send_keyed(&relay, &token, &id, "k-1", "three").await;
    assert_eq!(again, (200, first_rest));

    // Another instance of the same user has keys of its own.
    let (mut other, _) = Bridge::connect(relay.addr, &token, "i-2").await;
    other.send(1, user_message(&id, "four", Some("k-1"))).await;
    other.wait_ack(1).await;

    let log = relay.log(&token, &id).await;
    assert_eq!(user_texts(&log), ["one", "two", "three", "four"]);
    assert_eq!(system_entries(&log, "not_delivered").len(), 1);
    relay.stop().await;
}

#[tokio::test]
async fn a_refused_event_is_logged_as_not_delivered_once() {
    let mut relay = TestRelay::start(shell_agent()).await;
    let ann = relay.token("ann", "acme");
    let bob = relay.token("bob", "other");
    let id = relay.create(&ann, r#"{"visibility":"public"}"#).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (mut daemon, _) = Bridge::connect(relay.addr, &ann, "i-1").await;
    daemon
        .send(
            0,
            ToRelay::Join {
                session: id.clone(),
                after: 0,
            },
        )
        .await;
    daemon.send(1, user_message(&id, "echo AAA", None)).await;
    let (request_id, _) = wait_prompt(&relay, &ann, &id, 0, "echo AAA").await;
    // A restarted relay withdraws the prompt (its agent is gone): the allow sent after it
    // is refused.
    drop(daemon);
    relay.restart().await;
    let (mut daemon, _) = Bridge::connect(relay.addr, &ann, "i-1").await;
    daemon
        .send(
            0,
            ToRelay::Join {
                session: id.clone(),
                after: 0,
            },
        )
        .await;
    daemon.send(2, allow_event(&id, &request_id, None)).await;
    let reason = refusal_of(&mut daemon, 2).await;
    assert!(reason.contains("withdrawn"), "{reason}");

    // Every client following the session sees it.
    let seen = daemon
        .recv_until("the not_delivered entry", |m| match m {
            FromRelay::Log { entry, .. } => message(entry)
                .filter(|m| m["subtype"] == "not_delivered" && entry.author == Author::Relay),
            _ => None,
        })
        .await;
    assert_eq!(seen["message"], format!("allow {request_id}"));
    assert_eq!(seen["reason"], reason.as_str());

    // Re-reported at registration, resent, and after a restart: still one entry.
    drop(daemon);
    let (mut daemon, _) = Bridge::connect(relay.addr, &ann, "i-1").await;
    daemon.send(2, allow_event(&id, &request_id, None)).await;
    assert_eq!(refusal_of(&mut daemon, 2).await, reason);
    daemon.wait_ack(2).await;
    drop(daemon);
    relay.restart().await;
    let (mut daemon, _) = Bridge::connect(relay.addr, &ann, "i-1").await;
    daemon.send(3, user_message(&id, "echo after", None)).await;
    daemon.wait_ack(3).await;

    // A viewer's message is refused and logged too.
    let (mut viewer, _) = Bridge::connect(relay.addr, &bob, "i-b").await;
    viewer
        .send(1, user_message(&id, "echo from bob", None))
        .await;
    let refused = refusal_of(&mut viewer, 1).await;
    assert!(refused.contains("viewers cannot send"), "{refused}");
    viewer.wait_ack(1).await;

    let log = relay.log(&ann, &id).await;
    let not_delivered = system_entries(&log, "not_delivered");
    assert_eq!(not_delivered.len(), 2, "{not_delivered:#?}");
    assert_eq!(not_delivered[0]["message"], format!("allow {request_id}"));
    assert_eq!(not_delivered[1]["message"], "message \"echo from bob\"");
    assert_eq!(not_delivered[1]["reason"], refused.as_str());
    relay.stop().await;
}

#[tokio::test]
async fn a_store_written_by_an_earlier_relay_hands_over_only_what_it_had_queued() {
    let mut relay = TestRelay::start(script_agent("cat >> input.txt")).await;
    let token = relay.token("alice", "acme");
    let id = relay.create(&token, "{}").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let input = relay.workspace(&id).join("input.txt");
    let count = |text: &str| {
        std::fs::read_to_string(&input)
            .unwrap_or_default()
            .matches(text)
            .count()
    };
    relay.send_message(&token, &id, "handed").await;
    let start = std::time::Instant::now();
    while count("handed") == 0 {
        assert!(start.elapsed() < DEADLINE, "the agent got the message");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        post(&relay, &token, &format!("/v1/sessions/{id}/pause"))
            .await
            .0,
        200
    );
    let queued = relay.send_message(&token, &id, "queued").await;

    // As an earlier relay left it: no `f` key (so "handed", given to an agent, counted as
    // done), and "queued" under a `q` key.
    relay
        .restart_after(|data| {
            // sled's IO threads may hold the stopped relay's lock a moment longer.
            let start = std::time::Instant::now();
            let db = loop {
                match sled::open(data.join("store")) {
                    Ok(db) => break db,
                    Err(e) => assert!(start.elapsed() < DEADLINE, "{e}"),
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            };
            let tree = db.open_tree("relay").unwrap();
            let mut finished = b"f\0".to_vec();
            finished.extend_from_slice(id.as_bytes());
            assert!(tree.remove(finished).unwrap().is_some());
            let mut queue = b"q\0".to_vec();
            queue.extend_from_slice(id.as_bytes());
            queue.push(0);
            queue.extend_from_slice(&queued.to_be_bytes());
            let line = json!({"type": "user", "message": {"role": "user", "content": "queued"}});
            tree.insert(queue, line.to_string().as_bytes()).unwrap();
            db.flush().unwrap();
        })
        .await;
    assert_eq!(
        post(&relay, &token, &format!("/v1/sessions/{id}/resume"))
            .await
            .0,
        200
    );
    let start = std::time::Instant::now();
    while count("queued") == 0 {
        assert!(
            start.elapsed() < DEADLINE,
            "the queued message reached the new agent"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!((count("handed"), count("queued")), (1, 1));
    relay.stop().await;
}
