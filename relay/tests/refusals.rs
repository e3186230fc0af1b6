//! Refusals of journaled events survive their connection: the relay keeps each daemon
//! instance's most recent refusals and reports them again at its next registration, before
//! an ack that covers them. In process: a real relay on 127.0.0.1:0 and a daemon-like
//! bridge client that registers, sends and closes exactly when the test says.

mod common;

use cloud_protocol::bridge::{
    self, Channel, Envelope, FromRelay, Outbound, PermissionDecision, ToRelay,
};
use common::*;
use futures_util::StreamExt as _;
use tokio_tungstenite::tungstenite::Message;

/// The relay's limit on stored refusals per instance (`store::MAX_STORED_REFUSALS`).
const KEPT: u64 = 256;

/// The next envelope from the relay, whole (the helper's `recv` keeps only the body).
async fn recv_envelope(bridge: &mut Bridge) -> Envelope<FromRelay> {
    loop {
        let message = tokio::time::timeout(DEADLINE, bridge.socket.next())
            .await
            .expect("timed out waiting for the relay");
        match message {
            Some(Ok(Message::Binary(bytes))) => {
                let envelope = bridge::decode::<FromRelay>(&bytes).unwrap();
                bridge.ack = envelope.ack;
                return envelope;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            other => panic!("the relay closed the connection or sent text: {other:?}"),
        }
    }
}

/// Connects and sends `Register`; returns the client and every envelope the relay sent up
/// to and including the `Sessions` that ends its answer (the `Settings` that follows it is
/// read and left out).
async fn register(
    relay: &TestRelay,
    token: &str,
    instance: &str,
) -> (Bridge, Vec<Envelope<FromRelay>>) {
    let mut bridge = Bridge::register(relay.addr, token, instance).await;
    let mut answer = Vec::new();
    loop {
        let envelope = recv_envelope(&mut bridge).await;
        let last = matches!(envelope.body, FromRelay::Sessions(_));
        answer.push(envelope);
        if last {
            let settings = recv_envelope(&mut bridge).await;
            assert!(
                matches!(settings.body, FromRelay::Settings(_)),
                "{:?}",
                settings.body
            );
            return (bridge, answer);
        }
    }
}

/// Checks a registration's answer: `Registered` with `registered_ack`, one `EventRefused`
/// per `refusals` (seq, a piece of its reason) in order, an `Ack` with `ack` if there was
/// any refusal, then `Sessions`, every envelope after `Registered` carrying `ack`.
fn check_registration(
    answer: &[Envelope<FromRelay>],
    registered_ack: u64,
    refusals: &[(u64, &str)],
    ack: u64,
) {
    let summary: Vec<String> = answer
        .iter()
        .map(|e| format!("{:?} ack {}", e.body, e.ack))
        .collect();
    let extra = usize::from(!refusals.is_empty());
    assert_eq!(
        answer.len(),
        2 + refusals.len() + extra,
        "the registration's answer: {summary:#?}"
    );
    assert!(
        matches!(answer[0].body, FromRelay::Registered { .. }),
        "{summary:#?}"
    );
    assert_eq!(answer[0].channel, Channel::Extension);
    assert_eq!(
        answer[0].ack, registered_ack,
        "Registered's ack: {summary:#?}"
    );
    for (envelope, &(seq, reason)) in answer[1..].iter().zip(refusals) {
        match &envelope.body {
            FromRelay::EventRefused {
                seq: refused,
                reason: why,
            } => {
                assert_eq!(*refused, seq, "{summary:#?}");
                assert!(why.contains(reason), "{why:?} for seq {seq}");
            }
            other => panic!("expected the refusal of {seq}, got {other:?}: {summary:#?}"),
        }
        assert_eq!(envelope.channel, Channel::Task);
    }
    if extra == 1 {
        let envelope = &answer[1 + refusals.len()];
        assert!(matches!(envelope.body, FromRelay::Ack), "{summary:#?}");
        assert_eq!(envelope.channel, Channel::Task);
    }
    assert!(
        matches!(answer.last().unwrap().body, FromRelay::Sessions(_)),
        "{summary:#?}"
    );
    for envelope in &answer[1..] {
        assert_eq!(envelope.ack, ack, "{summary:#?}");
    }
}

/// Reads until an `Ack` covers `seq`; returns the refusals read on the way. (A refusal's
/// envelope carries its whole batch's ack: the batch's other refusals may follow it.)
async fn refusals_until_ack(bridge: &mut Bridge, seq: u64) -> Vec<(u64, String)> {
    let mut refusals = Vec::new();
    loop {
        let envelope = recv_envelope(bridge).await;
        match envelope.body {
            FromRelay::EventRefused { seq, reason } => refusals.push((seq, reason)),
            FromRelay::Ack if envelope.ack >= seq => return refusals,
            _ => {}
        }
    }
}

fn user_message(session: &str, text: &str) -> ToRelay {
    ToRelay::Event(Outbound::UserMessage {
        session: session.to_owned(),
        text: text.to_owned(),
        key: None,
    })
}

/// The texts of the user messages in a session's log.
async fn user_texts(relay: &TestRelay, token: &str, session: &str) -> Vec<String> {
    relay
        .log(token, session)
        .await
        .iter()
        .filter_map(|e| {
            message(e)
                .filter(|m| m["type"] == "user")
                .map(|m| m["message"]["content"].as_str().unwrap().to_owned())
        })
        .collect()
}

#[tokio::test]
async fn a_refusal_lost_with_its_connection_is_reported_at_the_next_registration() {
    let mut relay = TestRelay::start(script_agent("cat > /dev/null")).await;
    let ann = relay.token("ann", "acme");
    let bob = relay.token("bob", "acme");
    let session = relay.create(&ann, "{}").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    relay.wait_for_status(&ann, &session, "running").await;

    // Seq 1 is applied, 2 (an answer to a prompt that does not exist) refused, 3 applied.
    let (mut daemon, answer) = register(&relay, &ann, "i-1").await;
    check_registration(&answer, 0, &[], 0);
    daemon.send(1, user_message(&session, "one")).await;
    daemon
        .send(
            2,
            ToRelay::Event(Outbound::PermissionAnswer {
                session: session.clone(),
                request_id: "r-none".to_owned(),
                decision: PermissionDecision::Allow {
                    updated_input: None,
                },
                key: None,
            }),
        )
        .await;
    daemon.send(3, user_message(&session, "three")).await;
    // Events are applied in order and shown only once flushed: once "three" is in the log,
    // the refusal of 2 is on disk too. The daemon never reads the replies: it closes.
    relay
        .wait_for_log(&ann, &session, "the third event", |e| {
            message(e).is_some_and(|m| m["message"]["content"] == "three")
        })
        .await;
    daemon.socket.close(None).await.unwrap();
    drop(daemon);

    // The next registration holds the ack below the refusal, reports it, then acks all.
    let refusal = [(2, "no permission request r-none")];
    let (mut daemon, answer) = register(&relay, &ann, "i-1").await;
    check_registration(&answer, 1, &refusal, 3);

    // A daemon resends from the ack it was given: the resent refused event is reported
    // again, and nothing is applied twice.
    daemon
        .send(
            2,
            ToRelay::Event(Outbound::PermissionAnswer {
                session: session.clone(),
                request_id: "r-none".to_owned(),
                decision: PermissionDecision::Allow {
                    updated_input: None,
                },
                key: None,
            }),
        )
        .await;
    daemon.send(3, user_message(&session, "three")).await;
    daemon.send(4, user_message(&session, "four")).await;
    let again = refusals_until_ack(&mut daemon, 4).await;
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0].0, 2);
    assert!(
        again[0].1.contains("no permission request r-none"),
        "{again:?}"
    );
    assert_eq!(
        user_texts(&relay, &ann, &session).await,
        ["one", "three", "four"]
    );
    daemon.socket.close(None).await.unwrap();
    drop(daemon);

    // Another user's daemon with the same instance id has no refusals and no ack.
    let (_bobs, answer) = register(&relay, &bob, "i-1").await;
    check_registration(&answer, 0, &[], 0);

    // The refusal is stored: a restarted relay reports it too.
    relay.restart().await;
    let (_daemon, answer) = register(&relay, &ann, "i-1").await;
    check_registration(&answer, 1, &refusal, 4);
    relay.stop().await;
}

#[tokio::test]
async fn only_the_most_recent_refusals_are_kept() {
    let mut relay = TestRelay::start(script_agent("cat > /dev/null")).await;
    let ann = relay.token("ann", "acme");
    let session = relay.create(&ann, "{}").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    relay.wait_for_status(&ann, &session, "running").await;
    let (mut daemon, _) = register(&relay, &ann, "i-1").await;

    // Two bursts of events, each its own batches: every third one applied, the others
    // refused (a session that does not exist; an interrupt of a paused session).
    let (status, body) = relay
        .http(
            "POST",
            &format!("/v1/sessions/{session}/pause"),
            Some(&ann),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let total = 2 * KEPT;
    let refused = |seq: u64| !seq.is_multiple_of(3);
    let event = |seq: u64| match seq % 3 {
        0 => user_message(&session, &format!("m{seq}")),
        1 => user_message("s-missing", "x"),
        _ => ToRelay::Event(Outbound::Interrupt {
            session: session.clone(),
            key: None,
        }),
    };
    let reason = |seq: u64| match seq % 3 {
        1 => "no such session: s-missing",
        _ => "there is nothing to interrupt",
    };
    let mut reported = Vec::new();
    for burst in [1..=KEPT, KEPT + 1..=total] {
        let last = *burst.end();
        for seq in burst {
            daemon.send(seq, event(seq)).await;
        }
        reported.extend(refusals_until_ack(&mut daemon, last).await);
    }
    // Every refusal was reported once, on the connection that sent the event.
    let all: Vec<u64> = (1..=total).filter(|&seq| refused(seq)).collect();
    assert_eq!(
        reported.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
        all
    );
    daemon.socket.close(None).await.unwrap();
    drop(daemon);

    // Only the last KEPT are reported again, oldest first, and Registered stays below
    // the oldest of them.
    let kept: Vec<(u64, &str)> = all[all.len() - KEPT as usize..]
        .iter()
        .map(|&seq| (seq, reason(seq)))
        .collect();
    let (_daemon, answer) = register(&relay, &ann, "i-1").await;
    check_registration(&answer, kept[0].0 - 1, &kept, total);

    // The store holds the same, pruned in the batches that added refusals.
    relay.restart().await;
    let (_daemon, answer) = register(&relay, &ann, "i-1").await;
    check_registration(&answer, kept[0].0 - 1, &kept, total);
    relay.stop().await;
}

#[tokio::test]
async fn a_registration_without_stored_refusals_is_unchanged() {
    let relay = TestRelay::start(script_agent("cat > /dev/null")).await;
    let ann = relay.token("ann", "acme");
    let session = relay.create(&ann, "{}").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    relay.wait_for_status(&ann, &session, "running").await;
    let (mut daemon, answer) = register(&relay, &ann, "i-1").await;
    check_registration(&answer, 0, &[], 0);
    for seq in 1..=3 {
        daemon
            .send(seq, user_message(&session, &format!("m{seq}")))
            .await;
    }
    assert_eq!(refusals_until_ack(&mut daemon, 3).await, []);
    drop(daemon);
    let (_daemon, answer) = register(&relay, &ann, "i-1").await;
    check_registration(&answer, 3, &[], 3);
    relay.stop().await;
}
