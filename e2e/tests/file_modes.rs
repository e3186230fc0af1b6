//! The state directory is the user's alone, with the real daemon, its embedded relay and
//! the real `cloudctl`: after real sends every directory under it is 0700 and every file
//! 0600 (the journal's generations, the store, the embedded relay's data), and a state
//! directory left with looser modes (by an older daemon) is made private at the next start.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use cloudd_e2e::{wait_for, Home, DEADLINE};
use serde_json::Value;

/// Every directory and file under `root` (itself included) whose mode is not 0700 for a
/// directory or 0600 for anything else, with its mode.
fn loose_modes(root: &Path) -> Vec<(PathBuf, u32)> {
    let mut loose = Vec::new();
    let mut pending = vec![root.to_owned()];
    let mut n_files = 0;
    while let Some(path) = pending.pop() {
        // Entries can vanish while the walk runs (the journal trims generations, sled
        // replaces its snapshot files): one listed and then gone is not loose.
        let metadata = match std::fs::symlink_metadata(&path) {
            Ok(metadata) => metadata,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && path != root => continue,
            Err(e) => panic!("{}: {e}", path.display()),
        };
        let mode = metadata.permissions().mode() & 0o7777;
        let want = if metadata.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                pending.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()));
            }
            0o700
        } else {
            n_files += 1;
            0o600
        };
        if mode != want {
            loose.push((path, mode));
        }
    }
    assert!(n_files > 5, "the walk found only {n_files} files");
    loose
}

fn assert_private(home: &Home) {
    let loose = loose_modes(&home.paths.state_dir);
    assert!(
        loose.is_empty(),
        "not private: {:#?}",
        loose
            .iter()
            .map(|(path, mode)| format!("{:o} {}", mode, path.display()))
            .collect::<Vec<_>>()
    );
}

#[test]
fn every_file_under_the_state_dir_is_private_after_real_sends() {
    let home = Home::new();
    home.wait_connected();
    let created = home.cloudctl_json(&["session", "create", "--task", "file modes"]);
    let session = created["session"]["id"].as_str().unwrap().to_owned();
    for n in 0..3 {
        home.cloudctl_ok(&["send", &session, &format!("echo private-{n}")]);
    }
    let mut prompts = Value::Null;
    wait_for("a prompt from the shell agent", DEADLINE, || {
        prompts = home.cloudctl_json(&["permissions", &session]);
        prompts.as_array().is_some_and(|p| !p.is_empty())
    });
    let request = prompts[0]["request_id"].as_str().unwrap();
    home.cloudctl_ok(&["allow", &session, request]);
    for dir in ["store", "journal", "relay"] {
        assert!(home.paths.state_dir.join(dir).is_dir(), "{dir}/ missing");
    }
    assert_private(&home);

    // A state directory an older daemon left readable by others is made private again.
    home.cloudctl_ok(&["down"]);
    for dir in ["store", "journal"] {
        let dir = home.paths.state_dir.join(dir);
        let mut pending = vec![dir];
        while let Some(path) = pending.pop() {
            let mode = if path.is_dir() {
                pending.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
                0o755
            } else {
                0o644
            };
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
    }
    assert!(!loose_modes(&home.paths.state_dir).is_empty());
    home.cloudctl_ok(&["status"]);
    assert_private(&home);
    home.cloudctl_ok(&["down"]);
}
