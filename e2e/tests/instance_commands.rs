//! Instance commands with real processes: a standalone `cloud-relay`, a real `cloudd`
//! logged in to it with the real `cloudctl`, and REST calls over loopback. The relay lists
//! the daemon and sends it commands; the daemon answers them over its bridge.

use cloudd_e2e::{wait_for, Home, Relay, DEADLINE};
use serde_json::{json, Value};

fn instances(relay: &Relay, token: &str) -> Vec<Value> {
    let (status, list) = relay.http("GET", "/v1/instances", token, None);
    assert_eq!(status, 200, "{list}");
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .clone()
}

fn command(relay: &Relay, token: &str, instance: &str, name: &str) -> (u16, Value) {
    relay.http(
        "POST",
        &format!("/v1/instances/{instance}/commands"),
        token,
        Some(&json!({ "name": name })),
    )
}

#[test]
fn the_relay_lists_a_daemon_and_its_commands_are_answered_by_it() {
    let relay = Relay::start();
    let home = Home::new();
    let ann = relay.token("ann", "acme");
    home.cloudctl_ok(&["login", "--relay", &relay.url(), "--token", &ann]);
    let status = home.wait_connected();
    let instance = status["relay"]["instance_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no instance id: {status}"))
        .to_owned();
    assert!(instance.starts_with("i-"), "{instance}");

    // The daemon registered before it was told `Registered`, so it is listed already.
    let list = instances(&relay, &ann);
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["instance"], instance.as_str());
    assert!(
        !list[0]["hostname"].as_str().unwrap().is_empty(),
        "{list:?}"
    );
    assert!(list[0]["connected_at"].as_u64().unwrap() > 0, "{list:?}");

    // The daemon's own answers, through the relay.
    let (code, body) = command(&relay, &ann, &instance, "ping");
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body,
        json!({"instance": instance, "name": "ping", "result": "pong"})
    );
    let (code, body) = command(&relay, &ann, &instance, "refresh");
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["result"], "refreshed");
    let (code, body) = command(&relay, &ann, &instance, "frobnicate");
    assert_eq!(code, 422, "{body}");
    assert_eq!(body["error"], "unknown instance command \"frobnicate\"");

    // Another user, even of the same org, neither sees nor reaches it.
    let bob = relay.token("bob", "acme");
    assert_eq!(instances(&relay, &bob), Vec::<Value>::new());
    let (code, body) = command(&relay, &bob, &instance, "ping");
    assert_eq!(code, 404, "{body}");
    assert_eq!(
        body["error"],
        format!("no such instance connected: {instance}")
    );

    // The daemon stops: the relay forgets it.
    home.cloudctl_ok(&["down"]);
    wait_for("the instance to leave the list", DEADLINE, || {
        instances(&relay, &ann).is_empty()
    });
    let (code, body) = command(&relay, &ann, &instance, "ping");
    assert_eq!(code, 404, "{body}");

    // Started again on the same state directory, it is the same instance, and answers.
    let status = home.wait_connected();
    assert_eq!(status["relay"]["instance_id"], instance.as_str());
    let list = instances(&relay, &ann);
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["instance"], instance.as_str());
    let (code, body) = command(&relay, &ann, &instance, "ping");
    assert_eq!((code, &body["result"]), (200, &json!("pong")), "{body}");
    home.cloudctl_ok(&["down"]);
}
