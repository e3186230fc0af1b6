//! Rate limits that lose nothing, with real processes: a `cloud-relay` with low limits, a
//! daemon logged in to it, and the real `cloudctl`. A burst of sends over the events limit
//! arrives exactly once, in order, no faster than the limit; requests over the requests
//! limit are answered 429 with `Retry-After` (HTTP) or retried by `cloudctl` (bridge).

use cloudd_e2e::{queue_sends, wait_for, Home, Relay, DEADLINE};
use serde_json::Value;

/// An agent that reads everything and says nothing, so the log holds only what was sent.
const QUIET_AGENT: [&str; 4] = ["--agent-command", "sh", "-c", "cat >/dev/null"];

/// The events limit of the burst test: per second, and the burst.
const EVENT_RATE: u64 = 250;
const EVENT_BURST: u64 = 250;

fn login(home: &Home, relay: &Relay, user: &str) -> String {
    let token = relay.token(user, "acme");
    home.cloudctl_ok(&["login", "--relay", &relay.url(), "--token", &token]);
    token
}

fn create_session(home: &Home) -> String {
    let created = home.cloudctl_json(&["session", "create"]);
    created["session"]["id"].as_str().unwrap().to_owned()
}

/// A counter's value in the relay's `/metrics`.
fn relay_counter(relay: &Relay, admin: &str, name: &str) -> u64 {
    let (code, body) = relay.http("GET", "/metrics", admin, None);
    assert_eq!(code, 200, "{body}");
    let text = body.as_str().unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} is not in /metrics:\n{text}"))
}

#[test]
fn a_burst_of_5000_sends_over_the_events_limit_arrives_exactly_once_within_the_limit() {
    let rate = EVENT_RATE.to_string();
    let burst = EVENT_BURST.to_string();
    // `--agent-command` takes every argument after it: it goes last.
    let mut args = vec!["--events-per-second", &rate, "--event-burst", &burst];
    args.extend(QUIET_AGENT);
    let relay = Relay::start_with(&args);
    let home = Home::new();
    login(&home, &relay, "ann");
    let session = create_session(&home);

    let texts: Vec<String> = (0..5_000).map(|n| format!("m-{n:05}")).collect();
    queue_sends(&home, &session, &texts);
    // While the relay holds the stream back, status says so (and until when).
    wait_for("status to say the daemon is rate limited", DEADLINE, || {
        home.cloudctl_ok(&["status"])
            .contains("rate limited until ")
    });
    wait_for("the journal to drain", DEADLINE * 4, || {
        let status = home.cloudctl_json(&["status"]);
        status["relay"]["state"] == "connected" && status["relay"]["journal_depth"] == 0
    });

    // Every message exactly once, in order (read with a key of its own, so the reads do
    // not count against the daemon's key).
    let reader = relay.token("ann", "acme");
    let held = relay.user_messages_at(&reader, &session);
    let texts_held: Vec<&str> = held.iter().map(|(_, text)| text.as_str()).collect();
    assert_eq!(texts_held.len(), texts.len(), "each message exactly once");
    assert!(texts_held.iter().eq(texts.iter()), "in order");

    // No faster than the limit: over any window, at most the burst plus the rate times the
    // window (10% slack for the relay's write rounds, which log a few admissions at once).
    let times: Vec<u64> = held.iter().map(|(at, _)| *at).collect();
    let mut end = 0;
    for start in 0..times.len() {
        while end < times.len() && times[end] < times[start] + 1_000 {
            end += 1;
        }
        let in_window = (end - start) as u64;
        assert!(
            in_window <= (EVENT_BURST + EVENT_RATE) * 11 / 10,
            "{in_window} events accepted within 1 s of {}",
            times[start]
        );
    }
    let span_ms = times.last().unwrap() - times.first().unwrap();
    let fastest_ms = (texts.len() as u64 - EVENT_BURST) * 1_000 / EVENT_RATE;
    assert!(
        span_ms >= fastest_ms * 9 / 10,
        "5000 events in {span_ms} ms: faster than {EVENT_RATE}/s"
    );
    let rate = (texts.len() as u64 - EVENT_BURST) as f64 / (span_ms as f64 / 1000.0);
    eprintln!(
        "accepted {} events in {span_ms} ms: {rate:.0}/s after the burst",
        texts.len()
    );

    // The daemon counted the slow-downs and the resends; the relay what it dropped.
    let metrics = home.cloudctl_json(&["metrics"]);
    assert!(metrics["slow_downs"].as_u64().unwrap() > 0, "{metrics}");
    assert!(metrics["retries"].as_u64().unwrap() > 0, "{metrics}");
    assert_eq!(metrics["deliveries"], 5_000, "{metrics}");
    let admin = relay.token_with_scopes("ops", "acme", &["admin"]);
    assert!(relay_counter(&relay, &admin, "cloud_relay_events_rate_limited_total") > 0);
    assert_eq!(
        relay_counter(&relay, &admin, "cloud_relay_events_accepted_total"),
        5_000
    );
}

#[test]
fn http_over_the_requests_limit_is_answered_429_with_retry_after() {
    let mut args = vec!["--requests-per-second", "1", "--request-burst", "3"];
    args.extend(QUIET_AGENT);
    let relay = Relay::start_with(&args);
    let token = relay.token("ann", "acme");
    let other = relay.token("bob", "acme");
    let addr = ([127, 0, 0, 1], relay.port).into();
    let get = |token: &str| {
        cloudd_test_support::http_answer(addr, "GET", "/v1/sessions", Some(token), None, &[])
    };
    for _ in 0..3 {
        assert_eq!(get(&token).0, 200);
    }
    let (code, headers, body) = get(&token);
    assert_eq!(code, 429, "{body}");
    let retry_after = headers
        .iter()
        .find(|(name, _)| name == "retry-after")
        .map(|(_, value)| value.clone());
    assert_eq!(retry_after.as_deref(), Some("1"), "{headers:?}");
    let message = body["error"].as_str().unwrap();
    assert!(
        message.contains("rate limited") && message.contains("retry"),
        "{message}"
    );
    assert!(!message.contains(&token));
    // Another key has a bucket of its own.
    assert_eq!(get(&other).0, 200);
    // About a second later the key has a token again (a refused request takes none).
    wait_for("the key's bucket to refill", DEADLINE, || {
        get(&token).0 == 200
    });
}

#[test]
fn session_commands_over_the_requests_limit_say_so_and_retry() {
    let mut args = vec!["--requests-per-second", "1", "--request-burst", "2"];
    args.extend(QUIET_AGENT);
    let relay = Relay::start_with(&args);
    let home = Home::new();
    let token = login(&home, &relay, "ann");
    home.wait_connected();
    let mut outputs = String::new();
    // The bridge's upgrade took one token, the first create the other: the next creates
    // are refused by the relay until a token is back, and cloudctl retries them.
    let mut said_rate_limited = 0;
    for _ in 0..3 {
        let output = home.cloudctl(&["--json", "session", "create"]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        outputs.push_str(&stderr);
        assert!(output.status.success(), "session create failed: {stderr}");
        let created: Value = serde_json::from_slice(&output.stdout).unwrap();
        assert!(created["session"]["id"].is_string(), "{created}");
        if stderr.contains("rate limited, retrying in ") {
            said_rate_limited += 1;
        }
    }
    assert!(said_rate_limited >= 1, "no create was rate limited");
    let metrics = home.cloudctl_json(&["metrics"]);
    assert!(metrics["slow_downs"].as_u64().unwrap() >= 1, "{metrics}");
    // The limit's messages name no token, in the CLI's output or either log.
    outputs.push_str(&home.cloudctl_ok(&["status"]));
    for (what, text) in [
        ("cloudctl's output", outputs),
        ("the daemon's log", home.read_daemon_log()),
        ("the relay's log", relay.log()),
    ] {
        assert!(!text.contains(&token), "{what} holds the token");
    }
}
