//! A hostile relay's answer to a pull: the real daemon and `cloudctl`, the real relay, and
//! between the daemon and the relay a proxy that rewrites paths in what the relay sends
//! (same-length byte substitutions, so every frame stays well formed): `..`, an absolute
//! path, a `.git` component, and a file under a symlink that points out of the root.
//! Nothing is written outside the worktree's root, the pull says what it refused, and the
//! daemon carries on serving (a clean pull through the same proxy works before and after).
//!
//! The trees are pushed by a second daemon of the same user, connected to the relay
//! directly, so the relay stores and serves them as it would any tree.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;

use cloudd_e2e::{Home, Relay};

/// Forwards every connection to `target`; what comes back has each `(from, to)` of
/// `rules` replaced (the same length each, so lengths and frames stay as they were).
fn rewriting_proxy(target: u16, rules: Vec<(Vec<u8>, Vec<u8>)>) -> u16 {
    for (from, to) in &rules {
        assert_eq!(from.len(), to.len(), "a rule changes a length");
    }
    let rules = Arc::new(rules);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                continue;
            };
            let (mut client_in, mut server_out) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut client_in, &mut server_out);
                let _ = server_out.shutdown(std::net::Shutdown::Write);
            });
            let rules = Arc::clone(&rules);
            std::thread::spawn(move || rewrite(server, client, &rules));
        }
    });
    port
}

/// Copies `from` to `to`, rewriting as `rules` say. A tail of a read that could begin a
/// pattern waits for the next read (or 20 ms of quiet), so a pattern split between two
/// reads is still found and nothing else waits.
fn rewrite(mut from: TcpStream, mut to: TcpStream, rules: &[(Vec<u8>, Vec<u8>)]) {
    from.set_read_timeout(Some(std::time::Duration::from_millis(20)))
        .unwrap();
    let mut pending: Vec<u8> = Vec::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let (n, quiet) = match from.read(&mut buffer) {
            Ok(n) => (n, false),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                (usize::MAX, true)
            }
            Err(_) => (0, false),
        };
        let ended = n == 0;
        if !quiet && !ended {
            pending.extend_from_slice(&buffer[..n]);
        }
        for (pattern, replacement) in rules {
            let mut at = 0;
            while let Some(found) = pending[at..]
                .windows(pattern.len())
                .position(|w| w == pattern.as_slice())
            {
                let start = at + found;
                pending[start..start + pattern.len()].copy_from_slice(replacement);
                at = start + pattern.len();
            }
        }
        // The longest tail that is the start of a pattern waits, unless nothing more comes.
        let held = if quiet || ended {
            0
        } else {
            (1..pending.len().min(64))
                .rev()
                .find(|&k| {
                    let tail = &pending[pending.len() - k..];
                    rules
                        .iter()
                        .any(|(pattern, _)| pattern.len() > k && pattern.starts_with(tail))
                })
                .unwrap_or(0)
        };
        let ready = pending.len() - held;
        if to.write_all(&pending[..ready]).is_err() {
            return;
        }
        pending.drain(..ready);
        if ended {
            let _ = to.shutdown(std::net::Shutdown::Write);
            return;
        }
    }
}

fn write(path: &Path, bytes: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temp paths")
}

fn create_session(home: &Home) -> String {
    let created = home.cloudctl_json(&["session", "create", "--task", "hostile"]);
    created["session"]["id"].as_str().unwrap().to_owned()
}

/// Pushes the tree at `dir` to a new session of `home`'s; returns the session.
fn pushed(home: &Home, dir: &Path) -> String {
    let session = create_session(home);
    home.cloudctl_ok(&[
        "--json",
        "teleport",
        "push",
        path_str(dir),
        "--session",
        &session,
    ]);
    session
}

/// `teleport pull` into `dir`: its outcome's problems, or its error.
fn pull(home: &Home, dir: &Path, session: &str) -> Result<Vec<String>, String> {
    let outcome = home.teleport_outcome(&["pull", path_str(dir), "--session", session])?;
    Ok(outcome["problems"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_str().map(str::to_owned))
        .collect())
}

/// Every path under `dir`, relative, sorted (symlinks not followed).
fn listing(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            out.push(path.strip_prefix(root).unwrap().display().to_string());
            if std::fs::symlink_metadata(&path).unwrap().is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
fn a_hostile_relays_paths_write_nothing_outside_the_root() {
    let relay = Relay::start();
    let work = tempfile::Builder::new()
        .prefix("th")
        .tempdir_in("/tmp")
        .unwrap();
    let outside = work.path().join("outside");
    write(&outside.join("victim"), "still here\n");
    // An absolute path as long as its stand-in, which nothing else here contains.
    let absolute = format!("/tmp/abs-{}", std::process::id());
    let stand_in = format!("xtmp/abs-{}", std::process::id());
    assert!(!Path::new(&absolute).exists());

    // The trees, pushed by a daemon that talks to the relay directly.
    let pusher = Home::new();
    pusher.cloudctl_ok(&[
        "login",
        "--relay",
        &relay.url(),
        "--token",
        &relay.token("ann", "acme"),
    ]);
    pusher.wait_connected();
    let tree = |name: &str, files: &[(&str, &str)]| {
        let dir = work.path().join("pushed").join(name);
        for (path, text) in files {
            write(&dir.join(path), text);
        }
        dir
    };
    let clean = pushed(&pusher, &tree("clean", &[("ok.txt", "fine\n")]));
    let dotdot = pushed(&pusher, &tree("dotdot", &[("zz/dotdot-1", "pwned\n")]));
    let absolute_session = pushed(&pusher, &tree("absolute", &[(&stand_in, "pwned\n")]));
    let git = pushed(
        &pusher,
        &tree("git", &[("zzzz/config", "[core]\n\tpwned = true\n")]),
    );
    let linked = tree(
        "symlink",
        &[("evjl/pwned", "pwned\n"), ("evjl/deeper/pwned", "pwned\n")],
    );
    std::os::unix::fs::symlink(&outside, linked.join("evil")).unwrap();
    let symlink = pushed(&pusher, &linked);

    // The daemon under attack reaches the relay only through the rewriting proxy.
    let rules: Vec<(Vec<u8>, Vec<u8>)> = [
        ("zz/dotdot-1", "../dotdot-1"),
        (stand_in.as_str(), absolute.as_str()),
        ("zzzz/config", ".git/config"),
        ("evjl/", "evil/"),
    ]
    .iter()
    .map(|(from, to)| (from.as_bytes().to_vec(), to.as_bytes().to_vec()))
    .collect();
    let proxy = rewriting_proxy(relay.port, rules);
    let home = Home::new();
    home.cloudctl_ok(&[
        "login",
        "--relay",
        &format!("http://127.0.0.1:{proxy}"),
        "--token",
        &relay.token("ann", "acme"),
    ]);
    home.wait_connected();

    // Through the proxy, a clean pull works: what fails below fails for its paths.
    let root = |name: &str| {
        let dir = work.path().join("roots").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    };
    let clean_root = root("clean");
    assert_eq!(pull(&home, &clean_root, &clean), Ok(Vec::new()));
    assert_eq!(
        std::fs::read_to_string(clean_root.join("ok.txt")).unwrap(),
        "fine\n"
    );

    // A tree with `..`, an absolute path or a `.git` component is refused whole.
    for (name, session) in [
        ("dotdot", &dotdot),
        ("absolute", &absolute_session),
        ("git", &git),
    ] {
        let dir = root(name);
        let pulled = pull(&home, &dir, session);
        // The daemon refuses the relay's whole message, and says so.
        assert!(
            pulled
                .as_ref()
                .is_err_and(|e| e.contains("the relay sent a malformed bridge message")),
            "the {name} tree: {pulled:?}"
        );
        assert_eq!(listing(&dir), Vec::<String>::new(), "the {name} tree wrote");
        home.cloudctl_ok(&["ping"]);
        home.wait_connected();
    }
    assert!(!work.path().join("roots").join("dotdot-1").exists());
    assert!(!Path::new(&absolute).exists());

    // A file under a symlink out of the root: the link is written as a link, nothing
    // through it, and what was refused is named.
    let dir = root("symlink");
    let problems = pull(&home, &dir, &symlink).expect("the symlink's tree is pulled");
    for name in ["evil/pwned", "evil/deeper/pwned"] {
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with(name) && p.contains("evil is a symlink")),
            "{name} is not reported: {problems:?}"
        );
    }
    assert!(std::fs::symlink_metadata(dir.join("evil"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(listing(&outside), vec!["victim".to_owned()]);
    assert_eq!(
        std::fs::read_to_string(outside.join("victim")).unwrap(),
        "still here\n"
    );
    home.wait_connected();

    // The daemon is unharmed: a clean pull through the same proxy still works.
    let again = root("again");
    assert_eq!(pull(&home, &again, &clean), Ok(Vec::new()));
    assert_eq!(
        std::fs::read_to_string(again.join("ok.txt")).unwrap(),
        "fine\n"
    );
    assert_eq!(listing(&outside), vec!["victim".to_owned()]);
    assert_eq!(
        listing(work.path())
            .iter()
            .filter(|p| !p.starts_with("pushed")
                && !p.starts_with("roots")
                && !p.starts_with("outside"))
            .count(),
        0,
        "something landed beside the roots: {:?}",
        listing(work.path())
    );
}
