//! The git state a snapshot records: the commit HEAD points at and its branch, read with
//! the git CLI (which knows worktrees, packed refs and every repository layout). A
//! directory that is not in a git repository, or a machine without git, has none.
//!
//! This module must never change a repository: it only asks.

use std::path::Path;
use std::process::Command;

use cloud_protocol::teleport::GitState;

/// Runs `git -C root args…` and returns its trimmed output, `None` on any failure.
fn git(root: &Path, args: &[&str]) -> Option<String> {
    let output = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(args)
        .env("GIT_OPTIONAL_LOCKS", "0")
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?;
    Some(text.trim().to_owned())
}

/// HEAD and its branch in the repository `root` belongs to, if any (blocking: call it off
/// the socket's thread).
pub fn state(root: &Path) -> Option<GitState> {
    let head = git(root, &["rev-parse", "--verify", "-q", "HEAD"])?;
    if head.len() < 40 || !head.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let branch = git(root, &["symbolic-ref", "-q", "--short", "HEAD"]).filter(|b| !b.is_empty());
    Some(GitState { head, branch })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_directory_has_no_git_state_and_a_repository_has_its_head() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(state(dir.path()), None);
        let run = |args: &[&str]| {
            let ok = Command::new("git")
                .arg("-C")
                .arg(dir.path())
                .args(args)
                .env("GIT_AUTHOR_NAME", "t")
                .env("GIT_AUTHOR_EMAIL", "t@example.com")
                .env("GIT_COMMITTER_NAME", "t")
                .env("GIT_COMMITTER_EMAIL", "t@example.com")
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "git {args:?}");
        };
        run(&["init", "-q", "-b", "trunk"]);
        // No commit yet: no HEAD to record.
        assert_eq!(state(dir.path()), None);
        std::fs::write(dir.path().join("f"), "x").unwrap();
        run(&["add", "f"]);
        run(&["commit", "-q", "-m", "one"]);
        let found = state(dir.path()).unwrap();
        assert_eq!(found.branch.as_deref(), Some("trunk"));
        assert_eq!(found.head.len(), 40);
        run(&["checkout", "-q", "--detach"]);
        assert_eq!(state(dir.path()).unwrap().branch, None);
    }
}
