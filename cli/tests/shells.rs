//! `cloudctl completions` and `cloudctl man`, run as the real binary and checked with the
//! real tools: bash loads and runs the completion script, `man -l` renders the pages
//! without warnings. The subcommands they must cover are read from `cloudctl --help`, so
//! a new subcommand is checked without touching this file.

use std::path::Path;
use std::process::{Command, Output};

fn cloudctl(args: &[&str]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_cloudctl"))
        .args(args)
        // Neither command may need a daemon or a usable socket location.
        .env("CLOUDD_HOME", "/nonexistent/cloudctl-shells-test")
        .output()
        .unwrap();
    assert!(output.status.success(), "cloudctl {args:?}: {output:?}");
    output
}

fn stdout(args: &[&str]) -> String {
    String::from_utf8(cloudctl(args).stdout).unwrap()
}

/// The visible subcommands of `cloudctl ARGS`, from its `--help` (without `help`).
fn subcommands(args: &[&str]) -> Vec<String> {
    let mut args = args.to_vec();
    args.push("--help");
    let help = stdout(&args);
    let commands = help
        .split("Commands:\n")
        .nth(1)
        .unwrap_or_else(|| panic!("no commands in {help}"));
    let names: Vec<String> = commands
        .lines()
        .take_while(|line| line.starts_with("  "))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect();
    assert!(names.len() > 3, "{help}");
    names
}

/// Runs `script` in bash (not interactive, no bash-completion package needed).
fn bash(script: &str) -> Output {
    Command::new("bash")
        .args(["--norc", "--noprofile", "-c", script])
        .output()
        .expect("bash must be installed")
}

#[test]
fn the_bash_completion_script_loads_and_completes_subcommands() {
    let script = stdout(&["completions", "bash"]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cloudctl.bash");
    std::fs::write(&file, &script).unwrap();

    let check = bash(&format!("bash -n {}", file.display()));
    assert!(check.status.success(), "bash -n: {check:?}");

    // Loaded, it defines the completion function and registers it for cloudctl.
    let loaded = bash(&format!(
        "source {} && declare -F _cloudctl && complete -p cloudctl",
        file.display()
    ));
    assert!(loaded.status.success(), "{loaded:?}");
    let registered = String::from_utf8_lossy(&loaded.stdout);
    assert!(registered.contains("-F _cloudctl"), "{registered}");

    // And it completes, called as bash calls it (command, current word, previous word):
    // every top-level subcommand from an empty word, and a nested one.
    let complete = |words: &str, cword: usize| {
        let output = bash(&format!(
            "source {} && COMP_WORDS=({words}) && COMP_CWORD={cword} && _cloudctl cloudctl \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\" && printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            file.display()
        ));
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    let top: Vec<String> = complete("cloudctl ''", 1)
        .lines()
        .map(str::to_owned)
        .collect();
    for command in subcommands(&[]) {
        assert!(top.contains(&command), "{command} not completed: {top:?}");
    }
    let nested = complete("cloudctl session cr", 2);
    assert_eq!(nested.trim(), "create", "{nested}");
}

#[test]
fn the_zsh_and_fish_scripts_name_every_subcommand() {
    let commands = subcommands(&[]);
    for shell in ["zsh", "fish"] {
        let script = stdout(&["completions", shell]);
        assert!(script.contains("cloudctl"), "{shell}: {script}");
        for command in &commands {
            assert!(
                script.contains(&format!("'{command}:"))
                    || script.contains(&format!("-a \"{command}\"")),
                "{shell} script lacks {command}"
            );
        }
    }
    // Any shell clap_complete knows is refused by clap, not by a panic.
    let output = Command::new(env!("CARGO_BIN_EXE_cloudctl"))
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{output:?}");
}

/// Renders a man page file with `man -l`, with groff's warnings on; returns the text.
fn render(page: &Path) -> String {
    let output = Command::new("man")
        .args(["--warnings", "--nh", "--nj", "-l"])
        .arg(page)
        .env("MANWIDTH", "100")
        .env("MANPAGER", "cat")
        .env("LC_ALL", "C.UTF-8")
        .output()
        .expect("man (man-db) must be installed: .ci/run installs it");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stderr.trim().is_empty(),
        "man -l {}: {output:?}",
        page.display()
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn the_man_page_renders_without_warnings_and_names_every_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("cloudctl.1");
    std::fs::write(&page, cloudctl(&["man"]).stdout).unwrap();
    let text = render(&page);
    assert!(text.contains("NAME"), "{text}");
    assert!(text.contains("SUBCOMMANDS"), "{text}");
    for command in subcommands(&[]) {
        assert!(
            text.contains(&format!("cloudctl-{command}(1)")),
            "the man page lacks {command}:\n{text}"
        );
    }
}

#[test]
fn man_out_dir_writes_a_page_for_every_subcommand_that_the_main_page_names() {
    let top = tempfile::tempdir().unwrap();
    // Created if missing.
    let dir = top.path().join("share/man/man1");
    let said = stdout(&["man", "--out-dir", dir.to_str().unwrap()]);
    assert!(said.contains("wrote the man pages"), "{said}");
    let mut pages = vec!["cloudctl.1".to_owned()];
    for command in subcommands(&[]) {
        pages.push(format!("cloudctl-{command}.1"));
        if matches!(command.as_str(), "session" | "service" | "teleport") {
            for nested in subcommands(&[&command]) {
                pages.push(format!("cloudctl-{command}-{nested}.1"));
            }
        }
    }
    for page in &pages {
        let path = dir.join(page);
        assert!(path.exists(), "{page} was not written");
        let text = render(&path);
        let name = page.trim_end_matches(".1");
        assert!(text.contains(name), "{page}:\n{text}");
    }
}
