//! Expiring access tokens with real processes: a `cloud-relay` whose access tokens live 2
//! seconds, a daemon logged in with an API key, and the real `cloudctl`. Both run with
//! debug logging, and every test greps their logs and every CLI output for tokens.

use std::time::{Duration, Instant};

use cloudd_e2e::secrets::{assert_no_tokens, Outputs};
use cloudd_e2e::{wait_for, Home, Relay, DEADLINE};
use serde_json::{json, Value};

/// A relay whose access tokens live 2 s, logging at debug, with an agent that reads and
/// ignores what it is sent.
fn short_lived_relay() -> Relay {
    Relay::start_logging(
        &[
            "--access-token-ttl",
            "2s",
            "--agent-command",
            "sh",
            "-c",
            "cat >/dev/null",
        ],
        "debug",
    )
}

/// The daemon's `credentials.toml`.
fn credentials(home: &Home) -> Value {
    let text = std::fs::read_to_string(home.paths.config_dir.join("credentials.toml")).unwrap();
    let table: toml_lite::Table = toml_lite::parse(&text);
    json!(table)
}

/// Just enough TOML for `credentials.toml` (`key = "string"` lines).
mod toml_lite {
    pub type Table = std::collections::BTreeMap<String, String>;

    pub fn parse(text: &str) -> Table {
        text.lines()
            .filter_map(|line| {
                let (key, value) = line.split_once('=')?;
                Some((
                    key.trim().to_owned(),
                    value.trim().trim_matches('"').to_owned(),
                ))
            })
            .collect()
    }
}

fn login(home: &Home, relay: &Relay, outputs: &mut Outputs) -> String {
    let key = relay.token("alice", "acme");
    outputs.ok(home, &["login", "--relay", &relay.url(), "--token", &key]);
    key
}

/// With 2-second access tokens, 30 seconds of sends: every one accepted and delivered
/// exactly once, the bridge renewing its token (or reconnecting with a fresh one) all
/// along; the credentials file ends up holding a refresh token only, never the API key.
#[test]
fn a_two_second_token_over_a_thirty_second_send_loop_refuses_and_loses_nothing() {
    let relay = short_lived_relay();
    let home = Home::new();
    let _daemon = home.spawn_daemon_with(|command| {
        command.env("CLOUDD_LOG", "debug");
    });
    let mut outputs = Outputs::default();
    let key = login(&home, &relay, &mut outputs);
    home.wait_connected();
    let stored = credentials(&home);
    assert!(
        stored.get("api_key").is_none() && stored.get("token").is_none(),
        "{stored:#}"
    );
    let first_refresh = stored["refresh_token"].as_str().unwrap().to_owned();
    assert!(first_refresh.starts_with("crf_"));

    let created = outputs.json(&home, &["session", "create", "--task", "tokens"]);
    let session = created["session"]["id"].as_str().unwrap().to_owned();
    let started = Instant::now();
    let mut sent = Vec::new();
    while started.elapsed() < Duration::from_secs(30) {
        let message = format!("message-{}", sent.len());
        let output = outputs.ok(&home, &["send", &session, &message]);
        assert!(output.starts_with("sent (seq "), "{message}: {output}");
        sent.push(message);
    }
    // Every message, once each, in order.
    wait_for("every message to be in the session log", DEADLINE, || {
        relay.user_messages(&key, &session).len() >= sent.len()
    });
    assert_eq!(relay.user_messages(&key, &session), sent);
    let status = outputs.json(&home, &["status"]);
    assert_eq!(status["relay"]["state"], "connected", "{status:#}");
    assert_eq!(status["relay"]["refused_events"], 0, "{status:#}");
    // The token was renewed many times (every 1.6 s) and the refresh token rotated.
    let renewals = relay.log().matches("bridge credential renewed").count();
    eprintln!(
        "sent {} renewals {renewals} reconnects {}",
        sent.len(),
        home.read_daemon_log()
            .matches("connected to the relay")
            .count()
    );
    assert!(renewals >= 10, "{renewals} renewals in 30 s");
    let last_refresh = credentials(&home)["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(last_refresh, first_refresh);
    assert_no_tokens(
        &home,
        &relay,
        &outputs,
        &[&key, &first_refresh, &last_refresh],
    );
}

/// A refresh token used twice (here: stolen from the daemon and used first) revokes its
/// whole family: the thief's new tokens and the daemon's login both stop working, the
/// daemon says in `cloudctl status` to log in again, and a new login works.
#[test]
fn a_reused_refresh_token_revokes_the_login_and_status_says_to_log_in_again() {
    let relay = short_lived_relay();
    let home = Home::new();
    let _daemon = home.spawn_daemon_with(|command| {
        command.env("CLOUDD_LOG", "debug");
    });
    let mut outputs = Outputs::default();
    let key = login(&home, &relay, &mut outputs);
    home.wait_connected();

    let stolen = credentials(&home)["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let (code, answer) = relay_post(
        &relay,
        &json!({"grant_type": "refresh_token", "refresh_token": stolen}),
    );
    // The daemon may have rotated it already: then this use is the reuse.
    assert!(code == 200 || code == 401, "{code} {answer}");
    let thief_access = answer["access_token"].as_str().map(str::to_owned);
    let thief_refresh = answer["refresh_token"].as_str().map(str::to_owned);

    let mut status = Value::Null;
    wait_for("the daemon to be refused for good", DEADLINE, || {
        status = outputs.json(&home, &["status"]);
        status["relay"]["state"] == "refused"
    });
    let reason = status["relay"]["reason"].as_str().unwrap();
    assert!(reason.contains("cloudctl login"), "{reason}");
    let text = outputs.ok(&home, &["status"]);
    assert!(
        text.contains("refused") && text.contains("cloudctl login"),
        "{text}"
    );

    // The thief's tokens are revoked with the family.
    if let (Some(access), Some(refresh)) = (&thief_access, &thief_refresh) {
        assert_eq!(relay.http("GET", "/v1/sessions", access, None).0, 401);
        let (code, _) = relay_post(
            &relay,
            &json!({"grant_type": "refresh_token", "refresh_token": refresh}),
        );
        assert_eq!(code, 401);
    }

    // A new login (its own family) works.
    let key2 = login(&home, &relay, &mut outputs);
    home.wait_connected();
    let mut secrets = vec![key.as_str(), key2.as_str(), stolen.as_str()];
    secrets.extend(thief_access.as_deref());
    secrets.extend(thief_refresh.as_deref());
    assert_no_tokens(&home, &relay, &outputs, &secrets);
}

/// `POST /v1/auth/token` without a bearer.
fn relay_post(relay: &Relay, body: &Value) -> (u16, Value) {
    cloudd_test_support::http(
        ([127, 0, 0, 1], relay.port).into(),
        "POST",
        "/v1/auth/token",
        None,
        Some(&body.to_string()),
    )
}

/// A daemon logged in before access tokens (`token = ...` in `credentials.toml`, the
/// relay's bearer token then) keeps working: the token is exchanged as an API key and the
/// file rewritten with the refresh token only.
#[test]
fn a_first_format_credentials_file_is_exchanged_and_rewritten() {
    let relay = short_lived_relay();
    let home = Home::new();
    let key = relay.token("alice", "acme");
    std::fs::create_dir_all(&home.paths.config_dir).unwrap();
    std::fs::write(
        home.paths.config_dir.join("credentials.toml"),
        format!("relay = \"{}\"\ntoken = \"{key}\"\n", relay.url()),
    )
    .unwrap();
    let _daemon = home.spawn_daemon_with(|command| {
        command.env("CLOUDD_LOG", "debug");
    });
    let mut outputs = Outputs::default();
    let status = outputs.json(&home, &["status"]);
    let status = if status["relay"]["state"] == "connected" {
        status
    } else {
        home.wait_connected()
    };
    assert_eq!(status["relay"]["mode"], "remote", "{status:#}");
    assert_eq!(status["relay"]["user"], "alice", "{status:#}");
    let stored = credentials(&home);
    assert!(
        stored.get("token").is_none() && stored.get("api_key").is_none(),
        "{stored:#}"
    );
    assert!(stored["refresh_token"]
        .as_str()
        .unwrap()
        .starts_with("crf_"));
    assert_no_tokens(&home, &relay, &outputs, &[&key]);
}

/// A relay restarted without its signing secret turns down every access token it issued:
/// the daemon's upgrade gets a 401, it refreshes once (its refresh token is still good)
/// and reconnects, and sends go on.
#[test]
fn a_refused_access_token_is_refreshed_once_and_the_bridge_reconnects() {
    // The default lifetime: the daemon's token is nowhere near due for a refresh.
    let mut relay =
        Relay::start_logging(&["--agent-command", "sh", "-c", "cat >/dev/null"], "debug");
    let home = Home::new();
    let _daemon = home.spawn_daemon_with(|command| {
        command.env("CLOUDD_LOG", "debug");
    });
    let mut outputs = Outputs::default();
    let key = login(&home, &relay, &mut outputs);
    home.wait_connected();
    let created = outputs.json(&home, &["session", "create", "--task", "secret lost"]);
    let session = created["session"]["id"].as_str().unwrap().to_owned();
    let refresh_before = credentials(&home)["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();

    relay.kill();
    std::fs::remove_file(relay.data.path().join("auth.secret")).unwrap();
    relay.restart();
    let mut status = Value::Null;
    wait_for("the bridge to reconnect", DEADLINE, || {
        status = outputs.json(&home, &["status"]);
        status["relay"]["state"] == "connected"
            && credentials(&home)["refresh_token"].as_str() != Some(refresh_before.as_str())
    });
    // Its token was 15 minutes from due: only the 401 made it refresh (and it did).
    let sent = outputs.ok(&home, &["send", &session, "after the restart"]);
    assert!(sent.starts_with("sent (seq "), "{sent}");
    wait_for("the message in the session log", DEADLINE, || {
        relay.user_messages(&key, &session) == ["after the restart"]
    });
    assert_no_tokens(&home, &relay, &outputs, &[&key, &refresh_before]);
}
