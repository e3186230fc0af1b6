//! Rate limits on the bridge, with a real relay on 127.0.0.1:0 and a daemon-like bridge
//! client: events over the events limit are dropped (not acknowledged) with a `SlowDown`,
//! and so is every later event until the first dropped one is resent, so none is applied
//! out of order or lost; a session request over the requests limit is answered by a
//! `SlowDown` naming it instead of a `Reply`.

mod common;

use std::time::{Duration, Instant};

use cloud_protocol::bridge::{FromRelay, Outbound, RelayRequest, ToRelay};
use cloud_relay::limits::{Limits, Rate};
use common::*;

fn message(session: &str, seq: u64) -> ToRelay {
    ToRelay::Event(Outbound::UserMessage {
        session: session.to_owned(),
        text: format!("m-{seq}"),
        key: None,
    })
}

/// The user messages of a session's log, in order.
async fn user_messages(relay: &TestRelay, token: &str, session: &str) -> Vec<String> {
    relay
        .log(token, session)
        .await
        .iter()
        .filter_map(|entry| {
            let m = common::message(entry)?;
            (m["type"] == "user").then(|| m["message"]["content"].as_str().unwrap().to_owned())
        })
        .collect()
}

#[tokio::test]
async fn events_over_the_limit_wait_for_their_resend_and_arrive_once_in_order() {
    let limits = Limits {
        requests: None,
        events: Some(Rate {
            per_second: 2,
            burst: 3,
        }),
    };
    let relay = TestRelay::start_with_limits(script_agent("cat >/dev/null"), limits).await;
    let token = relay.token("ann", "acme");
    let session = relay.create(&token, "{}").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (mut bridge, _) = Bridge::connect(relay.addr, &token, "i-1").await;

    for seq in 1..=6 {
        bridge.send(seq, message(&session, seq)).await;
    }
    // The burst is taken; the fourth is the first over the limit: the daemon is told to
    // wait until the bucket is full again (3 tokens at 2 per second).
    let delay = bridge
        .recv_until("a slow-down", |m| match m {
            FromRelay::SlowDown {
                retry_after_ms,
                request: None,
            } => Some(*retry_after_ms),
            _ => None,
        })
        .await;
    assert!(delay > 1_000 && delay <= 1_500, "{delay} ms");
    bridge.wait_ack(3).await;
    assert_eq!(bridge.ack, 3, "nothing over the limit is acknowledged");
    // A later event arriving after the pause, before the dropped one is resent (one that
    // was on its way), is dropped too, though the bucket is full again: taking it would
    // make the core skip 4 and 5 as resends.
    tokio::time::sleep(Duration::from_millis(delay)).await;
    bridge.send(6, message(&session, 6)).await;

    // Resend from the first unacknowledged, honouring every slow-down, as the daemon does.
    let start = Instant::now();
    while bridge.ack < 6 {
        assert!(
            start.elapsed() < DEADLINE,
            "never taken: ack {}",
            bridge.ack
        );
        for seq in bridge.ack + 1..=6 {
            bridge.send(seq, message(&session, seq)).await;
        }
        let slow_down = bridge
            .recv_until("an ack or a slow-down", |m| match m {
                FromRelay::SlowDown { retry_after_ms, .. } => Some(Some(*retry_after_ms)),
                FromRelay::Ack => Some(None),
                _ => None,
            })
            .await;
        if let Some(ms) = slow_down {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
    let expected: Vec<String> = (1..=6).map(|seq| format!("m-{seq}")).collect();
    assert_eq!(user_messages(&relay, &token, &session).await, expected);
}

#[tokio::test]
async fn a_session_request_over_the_limit_gets_a_slow_down_instead_of_a_reply() {
    let limits = Limits {
        requests: Some(Rate {
            per_second: 1,
            burst: 3,
        }),
        events: None,
    };
    let relay = TestRelay::start_with_limits(script_agent("cat >/dev/null"), limits).await;
    let token = relay.token("ann", "acme");
    // The create and the bridge's upgrade take two tokens of three.
    let session = relay.create(&token, "{}").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (mut bridge, _) = Bridge::connect(relay.addr, &token, "i-1").await;
    let get = |id| ToRelay::Request {
        id,
        request: RelayRequest::Get {
            session: session.clone(),
        },
    };
    bridge.send(0, get(1)).await;
    bridge.send(0, get(2)).await;
    let answered = bridge
        .recv_until("the first reply", |m| match m {
            FromRelay::Reply { id, result } => Some((*id, result.is_ok())),
            _ => None,
        })
        .await;
    assert_eq!(answered, (1, true));
    let (request, delay) = bridge
        .recv_until("the second's slow-down", |m| match m {
            FromRelay::SlowDown {
                retry_after_ms,
                request,
            } => Some((*request, *retry_after_ms)),
            FromRelay::Reply { id, .. } => panic!("request {id} was answered over the limit"),
            _ => None,
        })
        .await;
    assert_eq!(request, Some(2));
    assert!(delay > 0 && delay <= 1_000, "{delay} ms");
}
