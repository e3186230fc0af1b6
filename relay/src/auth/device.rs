//! The device-authorization grant (the shape of RFC 8628): a machine without credentials
//! asks for a device code and a short user code, shows the user code, and polls with the
//! device code; a logged-in user (or the relay's operator) approves or denies the user
//! code; the next poll gets the machine tokens of its own — a new refresh-token family
//! for the approver's user, org and scopes ([`crate::auth::Auth::redeem_device`]).
//!
//! `DATA/device.jsonl` (0600) is a log of changes — started, approved, denied, redeemed —
//! shared by the server and `cloud-relay device approve|deny` (which may run while the
//! server does): every operation takes `device.lock`, reads the log, decides and appends,
//! so neither loses the other's change. Pending authorizations expire (10 minutes by
//! default) and a device code is redeemed once. The log is compacted (expired entries
//! dropped) when the server opens it.
//!
//! Device codes (`cdc_` + 40 random hex digits) and user codes are stored as blake3
//! hashes only. This module never logs either, and no error quotes one.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::access::Scope;
use crate::tokens::{open_private, random_token, token_hash};

/// The log's name in the data directory.
pub const DEVICE_FILE: &str = "device.jsonl";

/// The lock every reader-writer of the log holds.
const LOCK_FILE: &str = "device.lock";

/// Every device code starts with this.
pub const DEVICE_PREFIX: &str = "cdc_";

/// How long a device code waits for a decision, by default.
pub const DEFAULT_DEVICE_CODE_TTL: Duration = Duration::from_secs(10 * 60);

/// How long a client waits between polls, by default (RFC 8628's default).
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// What a `slow_down` adds to a device code's interval (RFC 8628, 3.5).
pub const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);

/// The most authorizations pending at once: an unauthenticated endpoint must not grow
/// the log without bound.
pub const MAX_PENDING: usize = 1_000;

/// User codes are made of these: consonants only (no vowels, so no words; no 0/O or 1/I
/// to confuse), easy to read out and type.
const USER_CODE_ALPHABET: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";

/// Characters in a user code (shown as `ABCD-EFGH`).
const USER_CODE_LEN: usize = 8;

/// A log line longer than this is damage, not a record.
const MAX_LINE: usize = 64 * 1024;

/// What an approval grants the new machine: the approver's identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// The user the machine logs in as.
    pub user: String,
    /// The org it acts in.
    pub org: String,
    /// What its access tokens may do.
    pub scopes: Vec<Scope>,
    /// The hash of the API key the login descends from (revoking it cuts the machine off).
    pub key: String,
}

/// One line of the log.
#[derive(Debug, Serialize, Deserialize)]
enum Change {
    Started {
        device: String,
        user_code: String,
        name: String,
        expires_at: u64,
    },
    Approved {
        user_code: String,
        approval: Approval,
    },
    Denied {
        user_code: String,
    },
    Redeemed {
        device: String,
    },
}

/// A pending (or decided, not yet redeemed) authorization.
#[derive(Debug, Clone)]
struct Pending {
    device: String,
    user_code: String,
    name: String,
    expires_at: u64,
    decision: Option<Option<Approval>>,
    redeemed: bool,
}

/// A new authorization, for the machine that asked.
#[derive(Debug)]
pub struct Started {
    /// The secret the machine polls with.
    pub device_code: String,
    /// What the user types on the approving machine, `ABCD-EFGH`.
    pub user_code: String,
    /// How long the codes live.
    pub expires_in: Duration,
    /// How long to wait between polls.
    pub interval: Duration,
}

/// Why a poll got no tokens: RFC 8628's error codes ([`PollError::code`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PollError {
    /// Not decided yet: poll again after the interval.
    #[error("the login is not approved yet: approve it with `cloudctl device approve CODE` on a logged-in machine")]
    Pending,
    /// Polled sooner than the interval: the interval grows by [`SLOW_DOWN_STEP`].
    #[error("polling too fast: wait the interval between polls")]
    SlowDown,
    /// Past its lifetime.
    #[error("the login code expired: run `cloudctl login --relay URL` again for a new one")]
    Expired,
    /// Denied by the user.
    #[error("the login was denied: run `cloudctl login --relay URL` again if that was a mistake")]
    Denied,
    /// Unknown, or already redeemed.
    #[error("unknown or already used device code: run `cloudctl login --relay URL` again")]
    Invalid,
    /// The log could not be read or written.
    #[error("{0}")]
    Unavailable(String),
}

impl PollError {
    /// The `error` of the token endpoint's answer (RFC 8628, 3.5).
    pub fn code(&self) -> &'static str {
        match self {
            PollError::Pending => "authorization_pending",
            PollError::SlowDown => "slow_down",
            PollError::Expired => "expired_token",
            PollError::Denied => "access_denied",
            PollError::Invalid => "invalid_grant",
            PollError::Unavailable(_) => "temporarily_unavailable",
        }
    }
}

/// Why a decision on a user code was not taken. Messages quote the user code only as the
/// user typed it back to them, never a device code.
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    /// No pending login has it.
    #[error("no pending login has code {0}: check the code the new machine shows, or run `cloudctl login --relay URL` there again")]
    Unknown(String),
    /// Decided before.
    #[error("the login with code {0} was already approved or denied")]
    AlreadyDecided(String),
    /// Past its lifetime.
    #[error(
        "the login code {0} expired: run `cloudctl login --relay URL` on the new machine again"
    )]
    Expired(String),
    /// The log could not be read or written.
    #[error("{0}")]
    Unavailable(String),
}

/// The relay's device authorizations.
#[derive(Debug)]
pub struct DeviceStore {
    dir: PathBuf,
    ttl: Duration,
    interval: Duration,
    /// Per device code (hash): when it was last polled, and its interval now. In memory:
    /// only the server answers polls.
    polls: Mutex<HashMap<String, (u64, Duration)>>,
}

impl DeviceStore {
    /// The authorizations in `data_dir`, compacted (expired ones dropped) as of `now`.
    pub fn open(
        data_dir: &Path,
        ttl: Duration,
        interval: Duration,
        now: u64,
    ) -> Result<DeviceStore, String> {
        let store = DeviceStore::for_commands(data_dir, ttl, interval);
        store
            .locked(|pending| {
                pending.retain(|p| p.expires_at > now);
                // Rewrite what is left, then rename it over the log.
                let temporary = data_dir.join(format!("{DEVICE_FILE}.tmp"));
                let mut file = open_private(
                    &temporary,
                    OpenOptions::new().write(true).create(true).truncate(true),
                )?;
                let mut text = Vec::new();
                for p in pending.iter() {
                    for change in p.changes() {
                        line(&mut text, &change);
                    }
                }
                file.write_all(&text)?;
                file.sync_all()?;
                std::fs::rename(&temporary, data_dir.join(DEVICE_FILE))?;
                Ok(((), Vec::new()))
            })
            .map_err(|e| e.to_string())?;
        Ok(store)
    }

    /// The store as `cloud-relay device approve|deny` uses it (no compaction).
    pub fn for_commands(data_dir: &Path, ttl: Duration, interval: Duration) -> DeviceStore {
        DeviceStore {
            dir: data_dir.to_owned(),
            ttl,
            interval,
            polls: Mutex::new(HashMap::new()),
        }
    }

    /// Starts an authorization for the machine called `name`.
    pub fn start(&self, name: &str, now: u64) -> Result<Started, String> {
        let device_code = random_token(DEVICE_PREFIX).map_err(|e| e.to_string())?;
        let device = token_hash(&device_code);
        let user_code = self
            .locked(|pending| {
                let live = pending.iter().filter(|p| p.expires_at > now).count();
                if live >= MAX_PENDING {
                    return Err(std::io::Error::other(
                        "too many logins are waiting for approval: try again in a few minutes",
                    ));
                }
                let user_code = loop {
                    let code = user_code().map_err(std::io::Error::other)?;
                    let hash = token_hash(&code);
                    if !pending.iter().any(|p| p.user_code == hash) {
                        break code;
                    }
                };
                let change = Change::Started {
                    device: device.clone(),
                    user_code: token_hash(&user_code),
                    name: name.chars().take(128).collect(),
                    expires_at: now + self.ttl.as_millis() as u64,
                };
                Ok((user_code, vec![change]))
            })
            .map_err(|e| e.to_string())?;
        self.polls
            .lock()
            .unwrap()
            .insert(device, (now, self.interval));
        Ok(Started {
            device_code,
            user_code: display(&user_code),
            expires_in: self.ttl,
            interval: self.interval,
        })
    }

    /// A poll with `device_code`: the approval (once: the code is redeemed by it), or why
    /// not. Polling sooner than the code's interval answers [`PollError::SlowDown`] and
    /// lengthens the interval.
    pub fn poll(&self, device_code: &str, now: u64) -> Result<(Approval, String), PollError> {
        let device = token_hash(device_code);
        {
            // Only codes this server handed out or saw pending are tracked (one started
            // before a restart is tracked from its first poll on).
            let mut polls = self.polls.lock().unwrap();
            if let Some((last, interval)) = polls.get_mut(&device) {
                // A client waits the interval after the previous answer, so two polls
                // arrive at least that far apart; 50 ms allows for clock granularity.
                let too_soon = now.saturating_add(50) < *last + interval.as_millis() as u64;
                *last = now;
                if too_soon {
                    *interval += SLOW_DOWN_STEP;
                    return Err(PollError::SlowDown);
                }
            }
        }
        let outcome = self.locked(|pending| {
            let Some(p) = pending.iter().find(|p| p.device == device) else {
                return Ok((Err(PollError::Invalid), Vec::new()));
            };
            if p.redeemed {
                return Ok((Err(PollError::Invalid), Vec::new()));
            }
            if p.expires_at <= now {
                return Ok((Err(PollError::Expired), Vec::new()));
            }
            match &p.decision {
                None => Ok((Err(PollError::Pending), Vec::new())),
                Some(None) => Ok((Err(PollError::Denied), Vec::new())),
                Some(Some(approval)) => Ok((
                    Ok((approval.clone(), p.name.clone())),
                    vec![Change::Redeemed {
                        device: device.clone(),
                    }],
                )),
            }
        });
        match outcome {
            Ok(result) => {
                let mut polls = self.polls.lock().unwrap();
                if matches!(result, Err(PollError::Pending)) {
                    polls.entry(device).or_insert((now, self.interval));
                } else {
                    polls.remove(&device);
                }
                result
            }
            Err(e) => Err(PollError::Unavailable(format!(
                "cannot use the device logins ({e}); try again"
            ))),
        }
    }

    /// Approves (`Some`) or denies (`None`) the login whose user code is `typed`; returns
    /// the name the new machine gave.
    pub fn decide(
        &self,
        typed: &str,
        approval: Option<Approval>,
        now: u64,
    ) -> Result<String, DecideError> {
        let normal = normalise(typed);
        let shown = display(&normal);
        let hash = token_hash(&normal);
        let outcome = self.locked(|pending| {
            let Some(p) = pending.iter().find(|p| p.user_code == hash && !p.redeemed) else {
                return Ok((Err(DecideError::Unknown(shown.clone())), Vec::new()));
            };
            if p.expires_at <= now {
                return Ok((Err(DecideError::Expired(shown.clone())), Vec::new()));
            }
            if p.decision.is_some() {
                return Ok((Err(DecideError::AlreadyDecided(shown.clone())), Vec::new()));
            }
            let change = match approval {
                Some(approval) => Change::Approved {
                    user_code: hash.clone(),
                    approval,
                },
                None => Change::Denied {
                    user_code: hash.clone(),
                },
            };
            Ok((Ok(p.name.clone()), vec![change]))
        });
        match outcome {
            Ok(result) => result,
            Err(e) => Err(DecideError::Unavailable(format!(
                "cannot use the device logins in {} ({e}); try again",
                self.dir.display()
            ))),
        }
    }

    /// Runs `f` over the log's authorizations under the lock; appends (and flushes) the
    /// changes it returns.
    fn locked<T>(
        &self,
        f: impl FnOnce(&mut Vec<Pending>) -> std::io::Result<(T, Vec<Change>)>,
    ) -> std::io::Result<T> {
        crate::tokens::create_dir(&self.dir).map_err(std::io::Error::other)?;
        let lock = open_private(
            &self.dir.join(LOCK_FILE),
            OpenOptions::new().write(true).create(true),
        )?;
        lock.lock()?;
        let path = self.dir.join(DEVICE_FILE);
        let mut pending = read(&path)?;
        let (value, changes) = f(&mut pending)?;
        if !changes.is_empty() {
            let mut text = Vec::new();
            for change in &changes {
                line(&mut text, change);
            }
            let mut file = open_private(&path, OpenOptions::new().append(true).create(true))?;
            file.write_all(&text)?;
            file.sync_data()?;
        }
        Ok(value)
    }
}

impl Pending {
    fn changes(&self) -> Vec<Change> {
        let mut changes = vec![Change::Started {
            device: self.device.clone(),
            user_code: self.user_code.clone(),
            name: self.name.clone(),
            expires_at: self.expires_at,
        }];
        match &self.decision {
            Some(Some(approval)) => changes.push(Change::Approved {
                user_code: self.user_code.clone(),
                approval: approval.clone(),
            }),
            Some(None) => changes.push(Change::Denied {
                user_code: self.user_code.clone(),
            }),
            None => {}
        }
        if self.redeemed {
            changes.push(Change::Redeemed {
                device: self.device.clone(),
            });
        }
        changes
    }
}

/// The authorizations in the log (a torn or overlong line is skipped).
fn read(path: &Path) -> std::io::Result<Vec<Pending>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut pending: Vec<Pending> = Vec::new();
    for line in BufReader::new(file).split(b'\n') {
        let line = line?;
        if line.len() > MAX_LINE {
            continue;
        }
        match serde_json::from_slice::<Change>(&line) {
            Ok(Change::Started {
                device,
                user_code,
                name,
                expires_at,
            }) => pending.push(Pending {
                device,
                user_code,
                name,
                expires_at,
                decision: None,
                redeemed: false,
            }),
            Ok(Change::Approved {
                user_code,
                approval,
            }) => {
                if let Some(p) = pending.iter_mut().find(|p| p.user_code == user_code) {
                    p.decision.get_or_insert(Some(approval));
                }
            }
            Ok(Change::Denied { user_code }) => {
                if let Some(p) = pending.iter_mut().find(|p| p.user_code == user_code) {
                    p.decision.get_or_insert(None);
                }
            }
            Ok(Change::Redeemed { device }) => {
                if let Some(p) = pending.iter_mut().find(|p| p.device == device) {
                    p.redeemed = true;
                }
            }
            Err(_) => {}
        }
    }
    Ok(pending)
}

fn line(text: &mut Vec<u8>, change: &Change) {
    serde_json::to_writer(&mut *text, change).expect("a change always serialises");
    text.push(b'\n');
}

/// A random user code, without its dash.
fn user_code() -> Result<String, String> {
    let mut code = String::with_capacity(USER_CODE_LEN);
    while code.len() < USER_CODE_LEN {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).map_err(|e| format!("cannot generate a code: {e}"))?;
        // Bytes past the largest multiple of the alphabet's size are dropped: no bias.
        let limit = 256 - 256 % USER_CODE_ALPHABET.len();
        for byte in bytes {
            if (byte as usize) < limit && code.len() < USER_CODE_LEN {
                code.push(USER_CODE_ALPHABET[byte as usize % USER_CODE_ALPHABET.len()] as char);
            }
        }
    }
    Ok(code)
}

/// A typed user code as stored: upper case, without dashes or spaces.
fn normalise(typed: &str) -> String {
    typed
        .chars()
        .filter(|c| !matches!(c, '-' | ' '))
        .take(64)
        .collect::<String>()
        .to_ascii_uppercase()
}

/// `ABCDEFGH` → `ABCD-EFGH`.
fn display(code: &str) -> String {
    if code.len() == USER_CODE_LEN && code.is_ascii() {
        format!("{}-{}", &code[..4], &code[4..])
    } else {
        code.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn approval() -> Approval {
        Approval {
            user: "alice".into(),
            org: "acme".into(),
            scopes: vec![Scope::SessionsRead, Scope::SessionsWrite],
            key: "k".into(),
        }
    }

    const TTL: Duration = Duration::from_secs(600);
    const INTERVAL: Duration = Duration::from_secs(5);

    #[test]
    fn a_login_is_pending_then_approved_then_redeemed_once_and_stored_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let store = DeviceStore::open(dir.path(), TTL, INTERVAL, 0).unwrap();
        let started = store.start("laptop", 0).unwrap();
        assert!(started.device_code.starts_with(DEVICE_PREFIX));
        assert_eq!(started.user_code.len(), 9);
        assert_eq!(&started.user_code[4..5], "-");
        assert_eq!(
            store.poll(&started.device_code, 5_000),
            Err(PollError::Pending)
        );
        // The operator's command, another store on the same directory, approves it; the
        // code is typed in lower case without its dash.
        let typed = started.user_code.replace('-', "").to_lowercase();
        let other = DeviceStore::for_commands(dir.path(), TTL, INTERVAL);
        assert_eq!(
            other.decide(&typed, Some(approval()), 6_000).unwrap(),
            "laptop"
        );
        assert!(matches!(
            other.decide(&typed, None, 6_000),
            Err(DecideError::AlreadyDecided(_))
        ));
        let (granted, name) = store.poll(&started.device_code, 10_000).unwrap();
        assert_eq!((granted, name.as_str()), (approval(), "laptop"));
        assert_eq!(
            store.poll(&started.device_code, 20_000),
            Err(PollError::Invalid)
        );
        let text = std::fs::read_to_string(dir.path().join(DEVICE_FILE)).unwrap();
        assert!(!text.contains(&started.device_code));
        assert!(!text.contains(&started.user_code.replace('-', "")));
        // A restart keeps the redemption.
        let store = DeviceStore::open(dir.path(), TTL, INTERVAL, 30_000).unwrap();
        assert_eq!(
            store.poll(&started.device_code, 40_000),
            Err(PollError::Invalid)
        );
    }

    #[test]
    fn polling_too_fast_slows_down_and_denied_and_expired_codes_say_so() {
        let dir = tempfile::tempdir().unwrap();
        let store = DeviceStore::open(dir.path(), TTL, INTERVAL, 0).unwrap();
        let started = store.start("a", 0).unwrap();
        assert_eq!(
            store.poll(&started.device_code, 1_000),
            Err(PollError::SlowDown)
        );
        // The interval is now 10 s from the last poll.
        assert_eq!(
            store.poll(&started.device_code, 9_000),
            Err(PollError::SlowDown)
        );
        // ... and 15 s after that one.
        assert_eq!(
            store.poll(&started.device_code, 24_000),
            Err(PollError::Pending)
        );
        store.decide(&started.user_code, None, 25_000).unwrap();
        assert_eq!(
            store.poll(&started.device_code, 40_000),
            Err(PollError::Denied)
        );

        let late = store.start("b", 0).unwrap();
        let expired = TTL.as_millis() as u64;
        assert!(matches!(
            store.decide(&late.user_code, Some(approval()), expired),
            Err(DecideError::Expired(_))
        ));
        assert_eq!(
            store.poll(&late.device_code, expired),
            Err(PollError::Expired)
        );
        assert!(matches!(
            store.decide("BCDF-GHJK", Some(approval()), 0),
            Err(DecideError::Unknown(_))
        ));
        assert_eq!(store.poll("cdc_nope", 0), Err(PollError::Invalid));
        // Compaction at the next open drops what expired.
        let store = DeviceStore::open(dir.path(), TTL, INTERVAL, expired + 1).unwrap();
        assert!(std::fs::read_to_string(dir.path().join(DEVICE_FILE))
            .unwrap()
            .is_empty());
        drop(store);
    }

    proptest::proptest! {
        /// Any bytes as the log (damage, a torn line, an overlong one): the store opens,
        /// starts and answers polls, and never panics.
        #[test]
        fn an_arbitrary_log_never_panics(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096),
            long in proptest::prelude::any::<bool>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut bytes = bytes;
            if long {
                bytes.extend(std::iter::repeat_n(b'x', MAX_LINE + 1));
            }
            std::fs::write(dir.path().join(DEVICE_FILE), &bytes).unwrap();
            let store = DeviceStore::open(dir.path(), TTL, INTERVAL, 0).unwrap();
            let started = store.start("m", 0).unwrap();
            proptest::prop_assert_eq!(
                store.poll(&started.device_code, 10_000),
                Err(PollError::Pending)
            );
            let _ = store.decide(&String::from_utf8_lossy(&bytes), None, 0);
        }
    }

    #[test]
    fn user_codes_use_the_alphabet_only() {
        for _ in 0..100 {
            let code = user_code().unwrap();
            assert_eq!(code.len(), USER_CODE_LEN);
            assert!(
                code.bytes().all(|b| USER_CODE_ALPHABET.contains(&b)),
                "{code}"
            );
        }
        assert_eq!(normalise(" abcd-efgh "), "ABCDEFGH");
    }
}
