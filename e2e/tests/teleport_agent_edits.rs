//! The relay watches a teleported workspace while its agent runs, for real (daemon,
//! embedded relay, cloudctl, the shell agent): an edit the agent makes in the middle of a
//! long turn is announced as a version and reaches the developer's worktree through the
//! daemon's watch before the turn ends; a push's own writes into the workspace (its files,
//! its git history and HEAD) make no version of the agent's, while an edit made after
//! them does.

use std::ffi::CString;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use cloudd_e2e::{wait_for, Home, DEADLINE};

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn git(dir: &Path, args: &[&str]) -> String {
    let output = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=e2e", "-c", "user.email=e2e@localhost"])
        .args(args)
        .output()
        .expect("run git (it must be installed for these tests)");
    assert!(output.status.success(), "git {args:?}: {output:?}");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn wait_for_text(what: &str, path: &Path, text: &str) {
    wait_for(what, DEADLINE, || read(path).as_deref() == Some(text));
}

fn create_session(home: &Home) -> String {
    let created = home.cloudctl_json(&["session", "create", "--task", "teleport"]);
    created["session"]["id"].as_str().unwrap().to_owned()
}

fn workspace(home: &Home, session: &str) -> PathBuf {
    home.paths.state_dir.join("relay/workspaces").join(session)
}

/// The snapshot lines of the session's log (`snapshot vN (…)`), in order.
fn snapshots(home: &Home, session: &str) -> Vec<String> {
    home.cloudctl_ok(&["attach", session, "--since", "0", "--no-follow"])
        .lines()
        .filter_map(|line| line.split_once("] ").map(|(_, rest)| rest.to_owned()))
        .filter(|rest| rest.contains(": snapshot v"))
        .collect()
}

/// Asks the shell agent to run `command` and allows it.
fn agent_runs(home: &Home, session: &str, command: &str) {
    home.cloudctl_ok(&["send", session, command]);
    home.allow_command(session, command);
}

#[test]
fn an_edit_the_agent_makes_mid_turn_comes_back_before_the_turn_ends() {
    let home = Home::new();
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("app");
    write(&root.join("src/a.txt"), "one\n");
    let session = create_session(&home);
    home.teleport_watch_detached(&root, &session);
    wait_for("the daemon's watch to run", DEADLINE, || {
        home.teleport_link(&root)["watcher"] == "ok"
    });

    // The agent's turn: an edit, then it waits (without polling) until the test opens the
    // gate, then a second edit and the turn's end.
    let gate = work.path().join("gate");
    let name = CString::new(gate.as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path; mkfifo only reads it.
    assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0, "mkfifo");
    let command = format!(
        "mkdir -p src/new && echo mid > src/new/mid.txt && read line < {} && echo after > after.txt",
        gate.display()
    );
    agent_runs(&home, &session, &command);

    // The edit comes back while the agent still waits at the gate: the relay announced it
    // as a version, and the daemon's watch pulled it.
    wait_for_text(
        "the agent's mid-turn edit in the worktree",
        &root.join("src/new/mid.txt"),
        "mid\n",
    );
    assert!(
        read(&workspace(&home, &session).join("after.txt")).is_none(),
        "the turn is still under way"
    );
    let versions = snapshots(&home, &session);
    assert!(
        versions
            .iter()
            .any(|v| v.starts_with("agent: snapshot v") && v.contains("the agent's edits")),
        "{versions:?}"
    );

    // The gate opens (the open waits for the agent's side): the turn goes on and ends.
    let mut opened = std::fs::OpenOptions::new().write(true).open(&gate).unwrap();
    opened.write_all(b"go\n").unwrap();
    drop(opened);
    wait_for_text(
        "the agent's last edit in the worktree",
        &root.join("after.txt"),
        "after\n",
    );
    // Every version after the daemon's push is the agent's.
    let versions = snapshots(&home, &session);
    assert!(
        versions[0].contains("snapshot v1 (pushed by"),
        "{versions:?}"
    );
    assert!(
        versions[1..]
            .iter()
            .all(|v| v.contains("the agent's edits")),
        "{versions:?}"
    );
}

/// The files of the pushed tree.
const FILES: usize = 2000;

#[test]
fn a_push_written_into_the_workspace_is_no_version_of_the_agents() {
    let home = Home::new();
    home.wait_connected();
    let session = create_session(&home);
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("app");
    // Enough files that writing them takes longer than a watch waits under a stream of
    // events (so a capture falls in the middle of a materialisation, were it not held
    // off), in many directories.
    let files: Vec<String> = (0..FILES)
        .map(|n| format!("d{:02}/f{n:04}.txt", n % 30))
        .collect();
    for file in &files {
        write(&root.join(file), &format!("{file} one\n"));
    }
    // A repository too: the relay fetches its history and moves the workspace's HEAD.
    git(&root, &["init", "-q", "-b", "main"]);
    git(&root, &["add", "-A"]);
    git(&root, &["commit", "-q", "-m", "one"]);
    let push = || {
        home.cloudctl_ok(&[
            "teleport",
            "push",
            root.to_str().unwrap(),
            "--session",
            &session,
        ])
    };
    push();
    // The first version starts the watch (the agent runs); the second push is written
    // into the watched workspace.
    for file in &files {
        write(&root.join(file), &format!("{file} two\n"));
    }
    git(&root, &["commit", "-q", "-a", "-m", "two"]);
    push();
    let ws = workspace(&home, &session);
    assert_eq!(
        git(&ws, &["rev-parse", "HEAD"]),
        git(&root, &["rev-parse", "HEAD"]),
        "the workspace's repository followed the push"
    );
    let last = &files[FILES - 1];
    assert_eq!(read(&ws.join(last)).unwrap(), format!("{last} two\n"));

    // Then an edit made in the workspace (as the agent would, in one rename) is a version:
    // the first after the pushes, once the watch has seen every event before it.
    let staged = home.path().join("staged");
    std::fs::write(&staged, "made in the session\n").unwrap();
    std::fs::rename(&staged, ws.join("d00/agent.txt")).unwrap();
    let mut versions = Vec::new();
    wait_for(
        "the workspace edit announced as a version",
        DEADLINE,
        || {
            versions = snapshots(&home, &session);
            versions.iter().any(|v| v.contains("the agent's edits"))
        },
    );
    assert_eq!(versions.len(), 3, "{versions:?}");
    assert!(
        versions[0].contains("snapshot v1 (pushed by"),
        "{versions:?}"
    );
    assert!(
        versions[1].contains("snapshot v2 (pushed by"),
        "{versions:?}"
    );
    assert!(
        versions[2].starts_with(&format!(
            "agent: snapshot v3 (the agent's edits; {} files",
            FILES + 1
        )),
        "{versions:?}"
    );
}

/// How many inotify instances the process `pid` holds (one per watch: the embedded
/// relay's workspace watches are the daemon process's).
#[cfg(target_os = "linux")]
fn inotify_instances(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.to_str() == Some("anon_inode:inotify"))
        .count()
}

#[cfg(target_os = "linux")]
#[test]
fn a_workspace_is_watched_only_while_its_agent_runs_and_its_session_lives() {
    let home = Home::new();
    home.wait_connected();
    let pid = home.daemon_pid().expect("the daemon runs");
    let session = create_session(&home);
    let before = inotify_instances(pid);
    let instances = |what: &str, n: usize| {
        wait_for(what, DEADLINE, || inotify_instances(pid) == n);
    };
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("app");
    write(&root.join("a.txt"), "a\n");
    home.cloudctl_ok(&[
        "teleport",
        "push",
        root.to_str().unwrap(),
        "--session",
        &session,
    ]);
    instances("the workspace watched once it has a version", before + 1);

    home.cloudctl_ok(&["session", "pause", &session]);
    instances("the watch dropped with the agent", before);
    home.cloudctl_ok(&["session", "resume", &session]);
    instances("the workspace watched again with a new agent", before + 1);
    // And it captures: an edit in the workspace is announced.
    let ws = workspace(&home, &session);
    let staged = home.path().join("staged");
    std::fs::write(&staged, "b\n").unwrap();
    std::fs::rename(&staged, ws.join("b.txt")).unwrap();
    wait_for("the edit announced", DEADLINE, || {
        snapshots(&home, &session)
            .iter()
            .any(|v| v.contains("the agent's edits"))
    });

    home.cloudctl_ok(&["session", "delete", &session]);
    instances("the watch dropped with the session", before);
}
