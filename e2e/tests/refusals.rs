//! Journaled events belong to the relay and identity they were queued for, and a refused
//! event is reported where the user sees it (issue 8, point 3): never sent to another
//! relay after `logout`, `send` fails at once while the relay refuses this daemon, and an
//! answer refused later shows in `status`. Real daemon, real standalone relay, real
//! `cloudctl`.

use cloudd_e2e::{wait_for, Home, Relay, DEADLINE};
use serde_json::{json, Value};

fn login(home: &Home, relay: &Relay, user: &str, org: &str) -> String {
    let token = relay.token(user, org);
    home.cloudctl_ok(&["login", "--relay", &relay.url(), "--token", &token]);
    token
}

fn create(home: &Home) -> String {
    let created = home.cloudctl_json(&["session", "create", "--task", "refusals"]);
    created["session"]["id"].as_str().unwrap().to_owned()
}

fn wait_state(home: &Home, state: &str) -> Value {
    let mut status = Value::Null;
    wait_for(&format!("the bridge to be {state}"), DEADLINE, || {
        status = home.cloudctl_json(&["status"]);
        status["relay"]["state"] == state
    });
    status
}

#[test]
fn events_queued_for_a_relay_are_never_sent_to_another() {
    let mut relay = Relay::start();
    let home = Home::new();
    home.wait_connected();
    login(&home, &relay, "ann", "acme");
    let session = create(&home);
    relay.kill();
    wait_state(&home, "retrying");
    let queued = home.cloudctl_json(&["send", &session, "echo for-the-team-relay"]);
    assert_eq!(queued["state"], "queued", "{queued}");

    // Back to the embedded relay: the event is not for it.
    home.cloudctl_ok(&["logout"]);
    let status = wait_state(&home, "connected");
    assert_eq!(status["relay"]["mode"], "embedded");
    let mut status = status;
    wait_for("the refusal to be counted", DEADLINE, || {
        status = home.cloudctl_json(&["status"]);
        status["relay"]["refused_events"] == 1
    });
    let reason = status["relay"]["last_refusal"].as_str().unwrap().to_owned();
    assert!(reason.contains(&relay.url()), "{reason}");
    assert!(reason.contains("ann"), "{reason}");
    assert_eq!(status["relay"]["journal_depth"], 0);
    let human = home.cloudctl_ok(&["status"]);
    assert!(
        human.contains("refused") && human.contains("1 event"),
        "{human}"
    );
    // The embedded relay never saw it: it has no such session and refused nothing.
    assert!(
        !home
            .read_daemon_log()
            .contains("the relay refused a journaled event"),
        "{}",
        home.read_daemon_log()
    );
    // And the team relay does not get it later either.
    relay.restart();
    login(&home, &relay, "ann", "acme");
    let (code, log) = relay.http(
        "GET",
        &format!("/v1/sessions/{session}/log"),
        &relay.token("ann", "acme"),
        None,
    );
    assert_eq!(code, 200, "{log}");
    assert!(!log.to_string().contains("for-the-team-relay"), "{log}");
}

#[test]
fn send_fails_at_once_while_the_relay_refuses_this_daemon() {
    let mut relay = Relay::start();
    let home = Home::new();
    home.wait_connected();
    login(&home, &relay, "ann", "acme");
    let session = create(&home);
    relay.revoke("ann");
    relay.kill();
    relay.restart();
    wait_state(&home, "refused");
    let output = home.cloudctl(&["send", &session, "echo never"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("not queued") && stderr.contains("refuses this daemon"),
        "{stderr}"
    );
    assert_eq!(home.cloudctl_json(&["status"])["relay"]["journal_depth"], 0);
}

#[test]
fn an_answer_refused_after_an_outage_is_counted_in_status() {
    let mut relay = Relay::start();
    let home = Home::new();
    home.wait_connected();
    login(&home, &relay, "ann", "acme");
    let session = create(&home);
    home.cloudctl_ok(&["send", &session, "echo withdrawn-by-the-restart"]);
    let mut prompts = json!([]);
    wait_for("the prompt", DEADLINE, || {
        prompts = home.cloudctl_json(&["permissions", &session]);
        prompts.as_array().is_some_and(|p| !p.is_empty())
    });
    let request_id = prompts[0]["request_id"].as_str().unwrap().to_owned();

    // The relay goes away; the answer is queued.
    relay.kill();
    wait_state(&home, "retrying");
    let queued = home.cloudctl_json(&["allow", &session, &request_id]);
    assert_eq!(queued["state"], "queued", "{queued}");
    // The relay's restart stopped the agent, which withdrew the prompt: the queued answer
    // is refused when it arrives.
    relay.restart();
    let mut status = Value::Null;
    wait_for("the refusal to be counted", DEADLINE, || {
        status = home.cloudctl_json(&["status"]);
        status["relay"]["refused_events"] == 1
    });
    let reason = status["relay"]["last_refusal"].as_str().unwrap();
    assert!(
        reason.contains(&request_id) && reason.contains("withdrawn"),
        "{reason}"
    );
}
