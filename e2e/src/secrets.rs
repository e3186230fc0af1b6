//! The grep for secrets: every test that handles tokens collects what `cloudctl` printed
//! ([`Outputs`]) and checks it, the daemon's log and the relay's log for anything shaped
//! like a token or a device code ([`assert_no_tokens`]).

use std::process::Output;

use serde_json::Value;

use crate::{Home, Relay};

/// The prefixes of API keys, access tokens, refresh tokens and device codes.
pub const TOKEN_PREFIXES: [&str; 4] = ["crt_", "cat_", "crf_", "cdc_"];

/// Everything the CLI printed, for the token grep.
#[derive(Debug, Default)]
pub struct Outputs(pub Vec<String>);

impl Outputs {
    /// Runs `cloudctl ARGS`, keeping what it printed.
    pub fn run(&mut self, home: &Home, args: &[&str]) -> Output {
        let output = home.cloudctl(args);
        self.0
            .push(String::from_utf8_lossy(&output.stdout).into_owned());
        self.0
            .push(String::from_utf8_lossy(&output.stderr).into_owned());
        output
    }

    /// Like [`Outputs::run`], asserting success; returns stdout.
    pub fn ok(&mut self, home: &Home, args: &[&str]) -> String {
        let output = self.run(home, args);
        assert!(
            output.status.success(),
            "cloudctl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// Like [`Outputs::ok`] with `--json`, parsed.
    pub fn json(&mut self, home: &Home, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.ok(home, &all)).unwrap()
    }
}

/// Whether `text` holds something shaped like a token: a prefix and 8 hex digits or more.
pub fn token_in(text: &str) -> Option<&str> {
    TOKEN_PREFIXES.iter().find_map(|prefix| {
        text.match_indices(prefix).find_map(|(at, _)| {
            let rest = &text[at + prefix.len()..];
            let n_hex = rest.chars().take_while(char::is_ascii_hexdigit).count();
            (n_hex >= 8).then(|| &text[at..(at + prefix.len() + n_hex).min(text.len())])
        })
    })
}

/// No log and no output holds a token, neither one of `secrets` nor anything shaped
/// like one.
pub fn assert_no_tokens(home: &Home, relay: &Relay, outputs: &Outputs, secrets: &[&str]) {
    let daemon_log = home.read_daemon_log();
    let relay_log = relay.log();
    assert!(daemon_log.contains("DEBUG"), "the daemon logs at debug");
    assert!(relay_log.contains("DEBUG"), "the relay logs at debug");
    let texts = [
        ("the daemon's log", &daemon_log),
        ("the relay's log", &relay_log),
    ]
    .into_iter()
    .chain(outputs.0.iter().map(|o| ("a cloudctl output", o)));
    for (what, text) in texts {
        if let Some(token) = token_in(text) {
            panic!("{what} holds a token ({}…)", &token[..6]);
        }
        for secret in secrets {
            assert!(!text.contains(secret), "{what} holds a secret");
        }
    }
}
