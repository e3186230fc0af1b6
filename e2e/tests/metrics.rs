//! Local metrics, private by default, with real processes: `cloudctl metrics` after a
//! number of sends, the relay's `/metrics` for its operator only, and telemetry that
//! leaves the machine only with `telemetry = true`.

use cloudd_e2e::{queue_sends, wait_for, Home, Relay, DEADLINE};

/// An agent that reads everything and says nothing.
const QUIET_AGENT: [&str; 4] = ["--agent-command", "sh", "-c", "cat >/dev/null"];

fn login(home: &Home, relay: &Relay, user: &str) {
    let token = relay.token(user, "acme");
    home.cloudctl_ok(&["login", "--relay", &relay.url(), "--token", &token]);
    home.wait_connected();
}

fn create_session(home: &Home) -> String {
    let created = home.cloudctl_json(&["session", "create"]);
    created["session"]["id"].as_str().unwrap().to_owned()
}

fn wait_journal_empty(home: &Home) {
    wait_for("the journal to drain", DEADLINE, || {
        let status = home.cloudctl_json(&["status"]);
        status["relay"]["state"] == "connected" && status["relay"]["journal_depth"] == 0
    });
}

fn texts(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:04}")).collect()
}

/// The relay's `/metrics` text.
fn relay_metrics(relay: &Relay, admin: &str) -> String {
    let (code, body) = relay.http("GET", "/metrics", admin, None);
    assert_eq!(code, 200, "{body}");
    body.as_str().unwrap().to_owned()
}

/// A sample's value in `/metrics` text.
fn sample(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} is not in /metrics:\n{text}"))
}

#[test]
fn cloudctl_metrics_counts_every_send_and_delivery() {
    let home = Home::new();
    home.wait_connected();
    let session = create_session(&home);
    queue_sends(&home, &session, &texts("m", 300));
    wait_journal_empty(&home);

    let metrics = home.cloudctl_json(&["metrics"]);
    assert_eq!(metrics["sends"], 300, "{metrics}");
    assert_eq!(metrics["deliveries"], 300, "{metrics}");
    assert_eq!(metrics["refusals"], 0, "{metrics}");
    assert_eq!(metrics["journal_depth"], 0, "{metrics}");
    assert_eq!(metrics["latency"]["count"], 300, "{metrics}");
    assert!(metrics["latency"]["p50_ms"].is_u64(), "{metrics}");
    assert!(metrics["latency"]["p99_ms"].as_u64() >= metrics["latency"]["p50_ms"].as_u64());
    assert!(metrics["reconnects"].as_u64().unwrap() >= 1, "{metrics}");
    assert_eq!(metrics["telemetry"], false, "{metrics}");
    assert!(metrics["rate_limited_until_ms"].is_null(), "{metrics}");

    let text = home.cloudctl_ok(&["metrics"]);
    let row = |name: &str| {
        text.lines()
            .find(|line| line.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} row in:\n{text}"))
            .split_whitespace()
            .last()
            .unwrap()
            .to_owned()
    };
    assert_eq!(row("sends"), "300", "{text}");
    assert_eq!(row("deliveries"), "300", "{text}");
    assert_eq!(row("journal depth"), "0", "{text}");
    assert!(text.contains("p50 ") && text.contains("p99 "), "{text}");
    assert!(text.contains("off: nothing leaves this machine"), "{text}");
}

#[test]
fn the_relays_metrics_are_for_its_operator_only() {
    let relay = Relay::start_with(&QUIET_AGENT);
    let home = Home::new();
    login(&home, &relay, "ann");
    let session = create_session(&home);
    queue_sends(&home, &session, &texts("m", 20));
    wait_journal_empty(&home);

    let user = relay.token("ann", "acme");
    assert_eq!(relay.http("GET", "/metrics", "", None).0, 401);
    let (code, body) = relay.http("GET", "/metrics", &user, None);
    assert_eq!(code, 403, "{body}");
    assert!(body["error"].as_str().unwrap().contains("admin"), "{body}");

    let admin = relay.token_with_scopes("ops", "acme", &["admin"]);
    let text = relay_metrics(&relay, &admin);
    assert_eq!(sample(&text, "cloud_relay_sessions"), 1, "{text}");
    assert_eq!(
        sample(&text, "cloud_relay_instances_connected"),
        1,
        "{text}"
    );
    assert_eq!(
        sample(&text, "cloud_relay_events_accepted_total"),
        20,
        "{text}"
    );
    assert_eq!(
        sample(&text, "cloud_relay_events_refused_total"),
        0,
        "{text}"
    );
    assert_eq!(
        sample(&text, "cloud_relay_events_rate_limited_total"),
        0,
        "{text}"
    );
    assert!(sample(&text, "cloud_relay_http_requests_total{class=\"4xx\"}") >= 2);
    assert!(sample(&text, "cloud_relay_http_requests_total{class=\"1xx\"}") >= 1);
    assert!(text.contains("# TYPE cloud_relay_events_accepted_total counter"));
}

#[test]
fn telemetry_leaves_the_machine_only_when_turned_on_and_then_counts_only() {
    let relay = Relay::start_with(&QUIET_AGENT);
    let admin = relay.token_with_scopes("ops", "acme", &["admin"]);

    // Off (the default): connected, sending, drained, and the relay got no report.
    let quiet = Home::new();
    login(&quiet, &relay, "ann");
    let session = create_session(&quiet);
    queue_sends(&quiet, &session, &texts("q", 10));
    wait_journal_empty(&quiet);
    let text = relay_metrics(&relay, &admin);
    assert_eq!(
        sample(&text, "cloud_relay_telemetry_reports_total"),
        0,
        "{text}"
    );

    // On: a report right after registering with the relay, holding counts only.
    let chatty = Home::new();
    std::fs::create_dir_all(&chatty.paths.config_dir).unwrap();
    std::fs::write(chatty.paths.config_file(), "telemetry = true\n").unwrap();
    login(&chatty, &relay, "bob");
    wait_for("the opted-in daemon's report", DEADLINE, || {
        sample(
            &relay_metrics(&relay, &admin),
            "cloud_relay_telemetry_reports_total",
        ) >= 1
    });
    let text = relay_metrics(&relay, &admin);
    assert_eq!(
        sample(&text, "cloud_relay_telemetry_reports_total"),
        1,
        "{text}"
    );
    assert!(
        sample(&text, "cloud_relay_telemetry_reconnects_total") >= 1,
        "{text}"
    );
    assert_eq!(chatty.cloudctl_json(&["metrics"])["telemetry"], true);
}
