//! The daemon's teleport watch, for real (daemon, embedded relay, cloudctl, the shell
//! agent): `teleport watch --detach` pushes the worktree, then a local edit (a new
//! directory and a file in it included) reaches the session's workspace while ignored
//! files stay home; the agent's edit comes back by itself; the watch survives a daemon
//! restart and what was edited while no daemon ran is sent at the restart; `teleport
//! stop` ends it.

use std::path::Path;

use cloudd_e2e::{wait_for, Home, DEADLINE};

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// Waits until `path` holds `text`.
fn wait_for_text(what: &str, path: &Path, text: &str) {
    wait_for(what, DEADLINE, || read(path).as_deref() == Some(text));
}

/// The first pending prompt's request id, once the agent has asked.
fn next_prompt(home: &Home, session: &str) -> String {
    let mut request_id = String::new();
    wait_for("the agent's permission prompt", DEADLINE, || {
        let prompts = home.cloudctl_json(&["permissions", session]);
        match prompts[0]["request_id"].as_str() {
            Some(id) => {
                request_id = id.to_owned();
                true
            }
            None => false,
        }
    });
    request_id
}

#[test]
fn a_watch_keeps_the_worktree_and_the_session_in_step_both_ways_across_restarts() {
    let home = Home::new();
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("app");
    std::fs::create_dir_all(root.join("src")).unwrap();
    std::fs::create_dir_all(root.join("target")).unwrap();
    std::fs::write(root.join(".gitignore"), "target/\n").unwrap();
    std::fs::write(root.join("src/a.txt"), "one\n").unwrap();
    std::fs::write(root.join("target/old"), "build output\n").unwrap();
    let created = home.cloudctl_json(&["session", "create"]);
    let session = created["session"]["id"].as_str().unwrap().to_owned();
    let root_arg = root.to_str().unwrap();
    home.teleport_watch_detached(&root, &session);
    let workspace = home.path().join("state/relay/workspaces").join(&session);
    assert_eq!(read(&workspace.join("src/a.txt")).as_deref(), Some("one\n"));
    wait_for("the watch to run", DEADLINE, || {
        home.teleport_link(&root)["watcher"] == "ok"
    });

    // Local edits go up: a changed file, a new directory and a file made in it at once.
    std::fs::write(root.join("src/a.txt"), "two\n").unwrap();
    std::fs::create_dir(root.join("src/deep")).unwrap();
    std::fs::write(root.join("src/deep/b.txt"), "b\n").unwrap();
    std::fs::write(root.join("target/new"), "more build output\n").unwrap();
    wait_for_text(
        "the edit in the workspace",
        &workspace.join("src/a.txt"),
        "two\n",
    );
    wait_for_text(
        "the new directory's file in the workspace",
        &workspace.join("src/deep/b.txt"),
        "b\n",
    );
    // A later edit arrives after the ignored one was written: that one stayed home.
    std::fs::write(root.join("src/c.txt"), "c\n").unwrap();
    wait_for_text("a later edit", &workspace.join("src/c.txt"), "c\n");
    assert!(
        !workspace.join("target").exists(),
        "ignored files stay home"
    );
    wait_for("nothing pending", DEADLINE, || {
        home.teleport_link(&root)["pending"] == 0
    });

    // The agent's edit comes down by itself: its turn ends, the relay records a
    // version and announces it, and the watch pulls it.
    home.cloudctl_ok(&["send", &session, "echo agent > from-agent.txt"]);
    let prompt = next_prompt(&home, &session);
    home.cloudctl_ok(&["allow", &session, &prompt]);
    wait_for_text(
        "the agent's edit in the worktree",
        &root.join("from-agent.txt"),
        "agent\n",
    );

    // The daemon stops; an edit made meanwhile is sent when it starts again.
    home.cloudctl_ok(&["down"]);
    std::fs::write(root.join("src/offline.txt"), "while no daemon ran\n").unwrap();
    home.cloudctl_ok(&["up"]);
    wait_for_text(
        "the edit made while no daemon ran",
        &workspace.join("src/offline.txt"),
        "while no daemon ran\n",
    );
    let resumed = home.teleport_link(&root);
    assert_eq!(resumed["watching"], true, "{resumed}");
    // And it still watches.
    std::fs::write(root.join("src/a.txt"), "three\n").unwrap();
    wait_for_text(
        "an edit after the restart",
        &workspace.join("src/a.txt"),
        "three\n",
    );

    home.cloudctl_ok(&["teleport", "stop", root_arg]);
    let stopped = home.teleport_link(&root);
    assert_eq!(stopped["watching"], false, "{stopped}");
    assert_eq!(stopped["watcher"], "-", "{stopped}");
}
