//! Settings sync with real processes: one `cloud-relay`, two machines of the same user
//! (two daemons, each with its own home and login), the real `cloudctl`.

use cloudd_e2e::{wait_for, Home, Relay, DEADLINE};
use serde_json::Value;

fn login(home: &Home, relay: &Relay) {
    let key = relay.token("alice", "acme");
    home.cloudctl_ok(&["login", "--relay", &relay.url(), "--token", &key]);
    home.wait_connected();
}

/// `cloudctl settings get KEY --json`'s one row.
fn get(home: &Home, key: &str) -> Value {
    home.cloudctl_json(&["settings", "get", key])[0].clone()
}

/// A write on machine 1 reaches machine 2's daemon live, and machine 2 still has it once
/// the relay is gone (after a daemon restart too); a write naming a stale version is
/// refused with the current value; an org admin's lock overrides a flag, the local config
/// and the user's setting at `session create`, while an unlocked org setting is below the
/// user's, which is below config.toml, which is below a flag.
#[test]
fn settings_reach_every_machine_and_resolve_by_precedence() {
    let mut relay = Relay::start();
    relay.admin(&["org", "add-member", "acme", "alice", "--role", "admin"]);
    let one = Home::new();
    let _one_daemon = one.spawn_daemon();
    login(&one, &relay);
    let two = Home::new();
    login(&two, &relay);

    // Built-in defaults, then the org's (unlocked) below the user's.
    assert_eq!(get(&two, "network")["source"], "default");
    let org = one.cloudctl_json(&["settings", "set", "--org", "network", "full"]);
    assert_eq!(org[0]["version"], 1, "{org}");
    let user = one.cloudctl_json(&["settings", "set", "network", "limited"]);
    assert_eq!(user[0]["source"], "user", "{user}");
    one.cloudctl_ok(&["settings", "set", "visibility", "team"]);
    one.cloudctl_ok(&["settings", "set", "feature.fast-path", "on"]);
    wait_for("machine 2 to receive the settings", DEADLINE, || {
        get(&two, "network")["value"] == "limited"
            && get(&two, "visibility")["value"] == "team"
            && get(&two, "feature.fast-path")["value"] == "on"
    });
    assert_eq!(get(&two, "visibility")["source"], "user");
    let org_view = two.cloudctl_json(&["settings", "get", "--org"]);
    assert_eq!(org_view[0]["value"], "full", "{org_view}");
    let created = two.cloudctl_json(&["session", "create", "--task", "defaults"]);
    assert_eq!(created["session"]["visibility"], "team", "{created}");
    assert_eq!(created["session"]["network_access"], "limited", "{created}");

    // config.toml is above the user's setting, a flag above config.toml.
    std::fs::create_dir_all(&two.paths.config_dir).unwrap();
    std::fs::write(
        two.paths.config_dir.join("config.toml"),
        "[settings]\nvisibility = \"private\"\n",
    )
    .unwrap();
    assert_eq!(get(&two, "visibility")["source"], "config");
    let created = two.cloudctl_json(&["session", "create", "--task", "config"]);
    assert_eq!(created["session"]["visibility"], "private", "{created}");
    let created = two.cloudctl_json(&[
        "session",
        "create",
        "--task",
        "flag",
        "--visibility",
        "public",
    ]);
    assert_eq!(created["session"]["visibility"], "public", "{created}");

    // A write of a stale version is refused with the current value.
    let stale = two.cloudctl(&[
        "settings",
        "set",
        "visibility",
        "public",
        "--if-version",
        "0",
    ]);
    assert!(!stale.status.success());
    let stderr = String::from_utf8_lossy(&stale.stderr);
    assert!(
        stderr.contains("it is now \"team\" (version 1") && stderr.contains("--if-version 1"),
        "{stderr}"
    );
    // Without --if-version the write replaces the version this machine has seen.
    let replaced = two.cloudctl_json(&["settings", "set", "visibility", "public"]);
    assert_eq!(replaced[0]["version"], 2, "{replaced}");
    let stale = one.cloudctl(&[
        "settings",
        "set",
        "visibility",
        "private",
        "--if-version",
        "1",
    ]);
    assert!(String::from_utf8_lossy(&stale.stderr).contains("it is now \"public\" (version 2"));

    // The org admin locks network = none: it wins over the user's setting, config.toml and
    // a flag, on the other machine too.
    std::fs::write(
        two.paths.config_dir.join("config.toml"),
        "[settings]\nnetwork = \"full\"\n",
    )
    .unwrap();
    let locked = one.cloudctl_json(&[
        "settings",
        "set",
        "--org",
        "--lock",
        "network",
        "none",
        "--if-version",
        "1",
    ]);
    assert_eq!(locked[0]["source"], "org_locked", "{locked}");
    wait_for("machine 2 to receive the lock", DEADLINE, || {
        get(&two, "network")["source"] == "org_locked"
    });
    let created =
        two.cloudctl_json(&["session", "create", "--task", "locked", "--network", "full"]);
    assert_eq!(created["session"]["network_access"], "none", "{created}");
    assert!(two
        .cloudctl_ok(&["settings", "get", "network"])
        .contains("org (locked)"));
    // The relay holds the lock too, for a client that does not apply it.
    let key = relay.token("alice", "acme");
    let body = serde_json::json!({"task": "rest", "network_access": "full"});
    let (code, session) = relay.http("POST", "/v1/sessions", &key, Some(&body));
    assert_eq!(code, 201, "{session}");
    assert_eq!(session["network_access"], "none", "{session}");

    // Offline: the relay stops; machine 2 answers from its copy, also after a restart.
    relay.kill();
    wait_for("machine 2 to notice", DEADLINE, || {
        two.cloudctl_json(&["status"])["relay"]["state"] != "connected"
    });
    assert_eq!(get(&two, "network")["value"], "none");
    two.cloudctl_ok(&["down"]);
    let after_restart = get(&two, "network");
    assert_eq!(after_restart["value"], "none", "{after_restart}");
    assert_eq!(after_restart["source"], "org_locked", "{after_restart}");
    assert_eq!(get(&two, "feature.fast-path")["value"], "on");
    // A write needs the relay, and says so.
    let offline = two.cloudctl(&["settings", "set", "visibility", "team"]);
    assert!(!offline.status.success());
    assert!(String::from_utf8_lossy(&offline.stderr).contains("cloudctl status"));
}
