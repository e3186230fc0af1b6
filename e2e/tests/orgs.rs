//! Organizations with real processes: a `cloud-relay`, daemons logged in with API keys, the
//! real `cloudctl`, and membership changed with `cloud-relay org add-member|remove-member`
//! while everything runs.

use cloudd_e2e::{wait_for, Home, Relay, DEADLINE};
use serde_json::Value;

/// The ids of the sessions `cloudctl session list` shows.
fn listed(home: &Home) -> Vec<String> {
    home.cloudctl_json(&["session", "list"])["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect()
}

fn create(home: &Home, task: &str, visibility: &str) -> Value {
    home.cloudctl_json(&[
        "session",
        "create",
        "--task",
        task,
        "--visibility",
        visibility,
    ])["session"]
        .clone()
}

fn login(home: &Home, relay: &Relay, user: &str, org: &str) {
    let key = relay.token(user, org);
    home.cloudctl_ok(&["login", "--relay", &relay.url(), "--token", &key]);
    home.wait_connected();
}

/// No output holds anything shaped like a token.
fn assert_no_token(text: &str) {
    for prefix in ["crt_", "cat_", "crf_"] {
        assert!(!text.contains(prefix), "a token in: {text}");
    }
}

/// A user in two orgs creates a session in each: the list shows only the current org's
/// (and its team sessions of other users), a switch reconnects the bridge in the new org
/// (status shows it), a switch to an org the user is not in is refused with what to do,
/// and a user removed from the current org loses access at once, then can switch back.
#[test]
fn sessions_lists_and_team_visibility_follow_the_current_org() {
    let relay = Relay::start();
    // alice's key names acme; she is added to beta by the operator.
    relay.admin(&["org", "add-member", "beta", "alice"]);
    let alice = Home::new();
    let _alice_daemon = alice.spawn_daemon();
    login(&alice, &relay, "alice", "acme");
    // bob belongs to beta only, and shares a session with his team there.
    let bob = Home::new();
    let _bob_daemon = bob.spawn_daemon();
    login(&bob, &relay, "bob", "beta");
    let team = create(&bob, "bob's team session", "team");
    let team_id = team["id"].as_str().unwrap().to_owned();

    // The login's default org is current.
    let orgs = alice.cloudctl_json(&["org", "list"]);
    assert_eq!(orgs["current"], "acme", "{orgs}");
    assert_eq!(orgs["orgs"], serde_json::json!(["acme", "beta"]), "{orgs}");
    let in_acme = create(&alice, "in acme", "private");
    assert_eq!(in_acme["org"], "acme");
    let acme_id = in_acme["id"].as_str().unwrap().to_owned();
    assert_eq!(listed(&alice), std::slice::from_ref(&acme_id));

    let switched = alice.cloudctl_ok(&["org", "switch", "beta"]);
    assert!(switched.contains("switched to org beta"), "{switched}");
    let status = alice.cloudctl_json(&["status"]);
    assert_eq!(status["relay"]["state"], "connected", "{status:#}");
    assert_eq!(status["relay"]["org"], "beta", "{status:#}");
    assert!(alice.cloudctl_ok(&["status"]).contains("alice@beta"));
    let in_beta = create(&alice, "in beta", "private");
    assert_eq!(in_beta["org"], "beta");
    let beta_id = in_beta["id"].as_str().unwrap().to_owned();
    wait_for("beta's sessions only", DEADLINE, || {
        let mut ids = listed(&alice);
        ids.sort();
        let mut expected = vec![beta_id.clone(), team_id.clone()];
        expected.sort();
        ids == expected
    });
    let list = alice.cloudctl_ok(&["org", "list"]);
    assert!(list.contains("* beta") && list.contains("  acme"), "{list}");

    // Back in acme: neither beta session is listed, and bob's team session is not visible.
    alice.cloudctl_ok(&["org", "switch", "acme"]);
    assert_eq!(listed(&alice), std::slice::from_ref(&acme_id));
    let hidden = alice.cloudctl(&["session", "show", &team_id]);
    assert!(!hidden.status.success());

    // An org alice is not a member of: refused, saying what to do; acme stays current.
    let refused = alice.cloudctl(&["org", "switch", "gamma"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("not a member of org gamma") && stderr.contains("your orgs: acme, beta"),
        "{stderr}"
    );
    assert_eq!(alice.cloudctl_json(&["org", "list"])["current"], "acme");
    let status = alice.wait_connected();
    assert_eq!(status["relay"]["org"], "acme", "{status:#}");

    // Removed from beta while working in it: the relay ends the connection, the reconnect
    // is refused with the reason, and nothing of beta can be done.
    alice.cloudctl_ok(&["org", "switch", "beta"]);
    relay.admin(&["org", "remove-member", "beta", "alice"]);
    let mut status = Value::Null;
    wait_for("the bridge to be refused", DEADLINE, || {
        status = alice.cloudctl_json(&["status"]);
        status["relay"]["state"] == "refused"
    });
    let reason = status["relay"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("not a member of org beta") && reason.contains("cloudctl org switch"),
        "{status:#}"
    );
    let create_refused = alice.cloudctl(&["session", "create", "--task", "x"]);
    assert!(!create_refused.status.success());
    // bob, still in beta, is unaffected.
    assert_eq!(
        bob.cloudctl_json(&["status"])["relay"]["state"],
        "connected"
    );
    // Switching to an org alice still belongs to works again.
    let orgs = alice.cloudctl_json(&["org", "switch", "acme"]);
    assert_eq!(orgs["orgs"], serde_json::json!(["acme"]), "{orgs}");
    assert_eq!(listed(&alice), [acme_id]);
    // A new login starts in its own key's default org, not in the org switched to before.
    login(&alice, &relay, "carol", "delta");
    let orgs = alice.cloudctl_json(&["org", "list"]);
    assert_eq!(orgs["current"], "delta", "{orgs}");
    assert_eq!(alice.cloudctl_json(&["status"])["relay"]["org"], "delta");
    for output in [
        alice.cloudctl_ok(&["org", "list"]),
        alice.cloudctl_ok(&["status"]),
        stderr.into_owned(),
        reason.to_owned(),
        relay.log(),
    ] {
        assert_no_token(&output);
    }
}
