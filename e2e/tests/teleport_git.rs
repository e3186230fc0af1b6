//! Git travels with teleport, for real: a worktree in a git repository with uncommitted and
//! untracked changes is pushed (daemon, embedded relay, cloudctl, git); the session's
//! workspace is a repository at the same HEAD and branch whose `git status` is the local
//! one; a commit made in the workspace (as the agent would) comes back on pull as
//! `refs/cloudd/<session>` while the local HEAD and branch stay where they were; a later
//! local commit reaches the workspace as new history only.

use std::path::Path;
use std::process::Command;

use cloudd_e2e::Home;

fn git(dir: &Path, args: &[&str]) -> String {
    let output = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "ann")
        .env("GIT_AUTHOR_EMAIL", "ann@example.com")
        .env("GIT_COMMITTER_NAME", "ann")
        .env("GIT_COMMITTER_EMAIL", "ann@example.com")
        .output()
        .expect("git runs");
    assert!(
        output.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[test]
fn the_workspace_is_a_repository_at_the_same_head_and_the_agents_commits_come_back_as_a_ref() {
    let home = Home::new();
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("app");
    std::fs::create_dir(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "trunk"]);
    std::fs::write(repo.join("a.txt"), "one\n").unwrap();
    std::fs::write(repo.join(".gitignore"), "*.log\n").unwrap();
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "one"]);
    let first = git(&repo, &["rev-parse", "HEAD"]);
    // Uncommitted, untracked and ignored changes.
    std::fs::write(repo.join("a.txt"), "one\nedited\n").unwrap();
    std::fs::write(repo.join("new.txt"), "new\n").unwrap();
    std::fs::write(repo.join("debug.log"), "noise\n").unwrap();

    let created = home.cloudctl_json(&["session", "create"]);
    let session = created["session"]["id"].as_str().unwrap().to_owned();
    let repo_arg = repo.to_str().unwrap();
    home.cloudctl_ok(&["teleport", "push", repo_arg, "--session", &session]);

    let workspace = home.path().join("state/relay/workspaces").join(&session);
    assert_eq!(git(&workspace, &["rev-parse", "HEAD"]), first);
    assert_eq!(
        git(&workspace, &["symbolic-ref", "--short", "HEAD"]),
        "trunk"
    );
    assert_eq!(
        git(&workspace, &["status", "--short"]),
        git(&repo, &["status", "--short"]),
        "git status in the workspace is the local one"
    );
    assert_eq!(git(&workspace, &["diff"]), git(&repo, &["diff"]));
    assert!(!workspace.join("debug.log").exists());

    // The agent commits in the workspace.
    git(&workspace, &["add", "."]);
    git(&workspace, &["commit", "-q", "-m", "the agent's work"]);
    let agents = git(&workspace, &["rev-parse", "HEAD"]);
    let shown = home.cloudctl_ok(&["teleport", "pull", repo_arg, "--session", &session]);
    assert!(shown.contains("pulled"), "{shown}");
    let reference = format!("refs/cloudd/{session}");
    assert_eq!(git(&repo, &["rev-parse", &reference]), agents);
    assert_eq!(
        git(&repo, &["rev-parse", "HEAD"]),
        first,
        "HEAD did not move"
    );
    assert_eq!(git(&repo, &["symbolic-ref", "--short", "HEAD"]), "trunk");
    assert_eq!(
        git(&repo, &["rev-parse", "trunk"]),
        first,
        "no branch moved"
    );
    let show = home.cloudctl_ok(&["session", "show", &session]);
    assert!(
        show.contains(&agents[..12]) && show.contains("on trunk"),
        "session show prints HEAD and branch: {show}"
    );

    // A local commit: only the new history goes, and the workspace follows it.
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "two"]);
    let second = git(&repo, &["rev-parse", "HEAD"]);
    home.cloudctl_ok(&["teleport", "push", repo_arg, "--session", &session]);
    assert_eq!(git(&workspace, &["rev-parse", "HEAD"]), second);
    assert_eq!(git(&workspace, &["status", "--short"]), "");
    home.cloudctl_ok(&["down"]);
}

#[test]
fn a_directory_that_is_not_a_repository_teleports_as_plain_files() {
    let home = Home::new();
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("plain.txt"), "x\n").unwrap();
    let created = home.cloudctl_json(&["session", "create"]);
    let session = created["session"]["id"].as_str().unwrap().to_owned();
    home.cloudctl_ok(&[
        "teleport",
        "push",
        work.path().to_str().unwrap(),
        "--session",
        &session,
    ]);
    let workspace = home.path().join("state/relay/workspaces").join(&session);
    assert_eq!(
        std::fs::read_to_string(workspace.join("plain.txt")).unwrap(),
        "x\n"
    );
    assert!(!workspace.join(".git").exists());
    let show = home.cloudctl_ok(&["session", "show", &session]);
    assert!(
        show.contains("snapshot") && !show.contains("HEAD"),
        "{show}"
    );
    home.cloudctl_ok(&["down"]);
}
