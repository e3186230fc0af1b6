//! Git, through the git CLI (which knows worktrees, packed refs and every repository
//! layout): the state a snapshot records (HEAD and its branch), and the history that
//! travels as `git bundle`s. A directory that is not in a git repository, or a machine
//! without git, has no state, and its tree teleports as plain files.
//!
//! Only [`receive`] and [`set_head`] change a repository, and only in the ways their docs
//! say: a daemon's pull fetches into `refs/cloudd/<session>` and never moves HEAD or a
//! branch; the relay's workspace repository follows the pushed HEAD.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

use cloud_protocol::teleport::GitState;

/// Runs `git -C root args…`: its trimmed output, or why it failed.
fn run(root: &Path, args: &[&OsStr]) -> Result<String, String> {
    let output = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(args)
        .env("GIT_OPTIONAL_LOCKS", "0")
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if !output.status.success() {
        let words: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        return Err(format!(
            "git {} failed: {}",
            words.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

fn git(root: &Path, args: &[&str]) -> Option<String> {
    let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    run(root, &args).ok()
}

/// Whether `head` looks like a full object name.
fn is_object_name(head: &str) -> bool {
    (head.len() == 40 || head.len() == 64) && head.bytes().all(|b| b.is_ascii_hexdigit())
}

/// HEAD and its branch in the repository `root` belongs to, if any (blocking: call it off
/// the socket's thread). `bundle` is left `None`.
pub fn state(root: &Path) -> Option<GitState> {
    let head = git(root, &["rev-parse", "--verify", "-q", "HEAD"])?;
    if !is_object_name(&head) {
        return None;
    }
    let branch = git(root, &["symbolic-ref", "-q", "--short", "HEAD"]).filter(|b| !b.is_empty());
    Some(GitState {
        head,
        branch,
        bundle: None,
    })
}

/// Whether the repository at `root` has the commit `head`.
pub fn has_commit(root: &Path, head: &str) -> bool {
    is_object_name(head) && git(root, &["cat-file", "-e", &format!("{head}^{{commit}}")]).is_some()
}

/// Writes to `out` a bundle of `rev` (a ref name: `HEAD`, or `refs/...`) without the
/// commits reachable from `have` that this repository has (all history when none).
/// Returns `false` when there is nothing new to bundle.
pub fn bundle(root: &Path, rev: &str, have: &[String], out: &Path) -> Result<bool, String> {
    let mut args: Vec<&OsStr> = vec![
        OsStr::new("bundle"),
        OsStr::new("create"),
        OsStr::new("-q"),
        out.as_os_str(),
        OsStr::new(rev),
    ];
    let excluded: Vec<String> = have
        .iter()
        .filter(|h| has_commit(root, h))
        .map(|h| format!("^{h}"))
        .collect();
    args.extend(excluded.iter().map(OsStr::new));
    match run(root, &args) {
        Ok(_) => Ok(true),
        Err(e) if e.contains("empty bundle") => Ok(false),
        Err(e) => Err(e),
    }
}

/// Fetches the bundle `file` (whose ref is `rev`) into the repository at `root` as the ref
/// `into` (`refs/...`), creating the repository first when `init` and there is none.
/// Never moves HEAD or a branch.
pub fn receive(root: &Path, file: &Path, rev: &str, into: &str, init: bool) -> Result<(), String> {
    if init && !root.join(".git").exists() {
        run(root, &[OsStr::new("init"), OsStr::new("-q")])?;
    }
    let refspec = format!("+{rev}:{into}");
    run(
        root,
        &[
            OsStr::new("fetch"),
            OsStr::new("-q"),
            OsStr::new("--no-tags"),
            file.as_os_str(),
            OsStr::new(&refspec),
        ],
    )
    .map(drop)
}

/// Points the ref `name` (`refs/...`, never a branch) at `head`, which the repository has.
pub fn set_ref(root: &Path, name: &str, head: &str) -> Result<(), String> {
    if !name.starts_with("refs/") || name.starts_with("refs/heads/") {
        return Err(format!("{name} is not a ref teleport may set"));
    }
    run(
        root,
        &[OsStr::new("update-ref"), OsStr::new(name), OsStr::new(head)],
    )
    .map(drop)
}

/// Points HEAD at `head` (on `branch`, moved there, when given; detached otherwise) and
/// makes the index HEAD's tree, leaving every file as it is: `git status` then shows the
/// worktree's changes against HEAD. For the relay's workspace repository only.
pub fn set_head(root: &Path, head: &str, branch: Option<&str>) -> Result<(), String> {
    if !has_commit(root, head) {
        return Err(format!("the repository does not have commit {head}"));
    }
    match branch {
        Some(branch) => {
            let name = format!("refs/heads/{branch}");
            git(root, &["check-ref-format", &name])
                .ok_or_else(|| format!("{branch:?} is not a branch name"))?;
            run(
                root,
                &[
                    OsStr::new("update-ref"),
                    OsStr::new(&name),
                    OsStr::new(head),
                ],
            )?;
            run(
                root,
                &[
                    OsStr::new("symbolic-ref"),
                    OsStr::new("HEAD"),
                    OsStr::new(&name),
                ],
            )?;
        }
        None => {
            run(
                root,
                &[
                    OsStr::new("update-ref"),
                    OsStr::new("--no-deref"),
                    OsStr::new("HEAD"),
                    OsStr::new(head),
                ],
            )?;
        }
    }
    run(root, &[OsStr::new("reset"), OsStr::new("-q")]).map(drop)
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
        run(&["checkout", "-q", "trunk"]);

        // History travels as bundles, into a ref that moves nothing else.
        let first = state(dir.path()).unwrap().head;
        let file = dir.path().join("bundle");
        assert!(bundle(dir.path(), "HEAD", &[], &file).unwrap());
        let other = tempfile::tempdir().unwrap();
        receive(other.path(), &file, "HEAD", "refs/cloudd/s-1", true).unwrap();
        assert!(has_commit(other.path(), &first));
        set_head(other.path(), &first, Some("trunk")).unwrap();
        assert_eq!(
            state(other.path()).unwrap().branch.as_deref(),
            Some("trunk")
        );
        // Nothing new since `first`: no bundle.
        assert!(!bundle(dir.path(), "HEAD", std::slice::from_ref(&first), &file).unwrap());
        std::fs::write(dir.path().join("f"), "y").unwrap();
        run(&["commit", "-q", "-am", "two"]);
        let second = state(dir.path()).unwrap().head;
        assert!(bundle(dir.path(), "HEAD", std::slice::from_ref(&first), &file).unwrap());
        receive(other.path(), &file, "HEAD", "refs/cloudd/s-1", false).unwrap();
        assert!(has_commit(other.path(), &second));
        // The receiving side's HEAD did not move.
        assert_eq!(state(other.path()).unwrap().head, first);
        std::fs::remove_file(&file).unwrap();
    }
}
