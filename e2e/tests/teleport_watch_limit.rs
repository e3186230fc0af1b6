//! The inotify watch limit, for real: the daemon runs in a user namespace of its own whose
//! limit (`/proc/sys/user/max_inotify_watches`, per namespace, so the machine's is not
//! touched) is below the worktree's directory count. `teleport status` says the watcher
//! is degraded, with the fix, and an edit in a directory left unwatched still reaches the
//! session's workspace (the periodic rescan): never silently stale.

use std::path::Path;
use std::process::Command;

use cloudd_e2e::{wait_for, Home, DEADLINE};

/// The watches the daemon may hold: fewer than the worktree's 30 directories.
const LIMIT: usize = 8;

/// Whether this machine lets a test make a user namespace and set its inotify limit.
fn user_namespace_with_a_limit() -> Result<(), String> {
    let output = Command::new("unshare")
        .args(["-Ur", "sh", "-c"])
        .arg(format!("echo {LIMIT} > /proc/sys/user/max_inotify_watches"))
        .output()
        .map_err(|e| format!("unshare: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

#[test]
fn a_worktree_past_the_watch_limit_is_reported_with_its_fix_and_still_kept_in_step() {
    if let Err(why) = user_namespace_with_a_limit() {
        // CI runs it: there the namespace must be available.
        assert!(
            std::env::var_os("CI").is_none(),
            "no user namespace with its own inotify limit: {why}"
        );
        eprintln!("not run here: no user namespace with its own inotify limit ({why})");
        return;
    }
    let home = Home::new();
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("app");
    for i in 0..30 {
        let dir = root.join(format!("d{i:02}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("f.txt"), "one\n").unwrap();
    }

    let _daemon = home.spawn_daemon_under(&[
        "unshare".into(),
        "-Ur".into(),
        "sh".into(),
        "-c".into(),
        format!("echo {LIMIT} > /proc/sys/user/max_inotify_watches && exec \"$0\""),
    ]);

    let created = home.cloudctl_json(&["session", "create"]);
    let session = created["session"]["id"].as_str().unwrap().to_owned();
    home.teleport_watch_detached(&root, &session);
    let workspace = home.path().join("state/relay/workspaces").join(&session);
    assert_eq!(read(&workspace.join("d29/f.txt")).as_deref(), Some("one\n"));

    let mut watcher = String::new();
    wait_for("the watcher to report the limit", DEADLINE, || {
        watcher = home.teleport_link(&root)["watcher"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        watcher.contains("watch limit")
    });
    assert!(watcher.starts_with("degraded"), "{watcher}");
    assert!(
        watcher.contains("sysctl fs.inotify.max_user_watches=524288"),
        "{watcher}"
    );
    let human = home.cloudctl_ok(&["teleport", "status"]);
    assert!(human.contains("max_user_watches"), "{human}");

    // An edit in the last directory alone (the watches go to the first ones the walk
    // finds, so it has none; no event elsewhere starts a rescan) arrives by the periodic
    // rescan; then every directory's.
    std::fs::write(root.join("d29/f.txt"), "alone\n").unwrap();
    wait_for("the unwatched edit in the workspace", DEADLINE, || {
        read(&workspace.join("d29/f.txt")).as_deref() == Some("alone\n")
    });
    for i in 0..30 {
        std::fs::write(root.join(format!("d{i:02}/f.txt")), format!("two {i}\n")).unwrap();
    }
    wait_for("every edit in the workspace", DEADLINE, || {
        (0..30)
            .all(|i| read(&workspace.join(format!("d{i:02}/f.txt"))) == Some(format!("two {i}\n")))
    });
}
