//! Credentials → identities: API keys ([`crate::tokens`]), the access tokens and refresh
//! tokens they are exchanged for, and whether a credential an open connection was
//! authenticated with is still good.
//!
//! - [`signed`]: access tokens (`cat_…`), signed with the relay's secret and verified
//!   without a lookup; they live [`RelayConfig::access_token_ttl`](crate::RelayConfig)
//!   (15 minutes by default).
//! - [`refresh`]: refresh tokens (`crf_…`), stored hashed, rotated at every use, revoked
//!   by family when one is used twice. A family is one machine's login: its owner lists
//!   and revokes them ([`Auth::families`], [`Auth::revoke_family`]).
//! - [`device`]: the device-authorization grant: a machine without credentials gets a
//!   family of its own once a logged-in user (or the operator) approves its user code.
//!
//! An access token is accepted while it has not expired, the API key it descends from is
//! live, its family is not revoked, and its user still belongs to its org
//! ([`crate::orgs`]). An exchange or a refresh may name the org the new access token acts
//! in (the org switch); without one it is the login's default org, or the user's first
//! org once they left that one. A bearer that is not an access token is looked up as an API
//! key, acting in the user's first org. Errors here never contain a token.

pub mod device;
pub mod refresh;
pub mod signed;

use std::path::Path;
use std::time::Duration;

use crate::access::{Identity, Scope};
use crate::orgs::{Members, Role};
use crate::tokens::TokenCache;
use device::{Approval, DecideError, DeviceStore, PollError, Started};
use refresh::{Family, Grant, RefreshError, RefreshStore};
use signed::{Claims, Signer, ACCESS_PREFIX};

/// The default lifetime of an access token.
pub const DEFAULT_ACCESS_TOKEN_TTL: Duration = Duration::from_secs(15 * 60);

/// The device-authorization grant's timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceConfig {
    /// How long a device code waits for a decision.
    pub code_ttl: Duration,
    /// How long clients wait between polls.
    pub poll_interval: Duration,
}

impl Default for DeviceConfig {
    fn default() -> DeviceConfig {
        DeviceConfig {
            code_ttl: device::DEFAULT_DEVICE_CODE_TTL,
            poll_interval: device::DEFAULT_POLL_INTERVAL,
        }
    }
}

/// Why a credential was not accepted. Messages say what to do and never quote it.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Not valid (now): unknown, revoked, expired or forged.
    #[error("{0}")]
    Rejected(String),
    /// The relay could not record a refresh.
    #[error("{0}")]
    Unavailable(String),
    /// The user does not belong to the org asked for.
    #[error("{0}")]
    NotMember(String),
}

/// What an exchange or a refresh answers.
#[derive(Debug)]
pub struct Tokens {
    /// The new access token.
    pub access_token: String,
    /// Its lifetime.
    pub expires_in: Duration,
    /// The family's next refresh token.
    pub refresh_token: String,
    /// Who it is for.
    pub user: String,
    /// The org it acts in.
    pub org: String,
    /// Every org of the API key.
    pub orgs: Vec<String>,
    /// What it may do.
    pub scopes: Vec<Scope>,
}

/// The relay's authority.
#[derive(Debug)]
pub struct Auth {
    /// The API keys.
    pub(crate) keys: TokenCache,
    /// Who belongs to which org.
    pub(crate) members: Members,
    signer: Signer,
    refresh: RefreshStore,
    devices: DeviceStore,
    access_ttl: Duration,
}

impl Auth {
    /// The authority of the relay whose data is in `data_dir`.
    pub fn open(
        data_dir: &Path,
        access_ttl: Duration,
        device_config: DeviceConfig,
    ) -> Result<Auth, String> {
        let signer = Signer::open(data_dir).map_err(|e| e.to_string())?;
        let refresh = RefreshStore::open(data_dir, crate::now_millis()).map_err(|e| {
            format!(
                "cannot read {}: {e}",
                data_dir.join(refresh::REFRESH_FILE).display()
            )
        })?;
        let devices = DeviceStore::open(
            data_dir,
            device_config.code_ttl,
            device_config.poll_interval,
            crate::now_millis(),
        )
        .map_err(|e| {
            format!(
                "cannot read {}: {e}",
                data_dir.join(device::DEVICE_FILE).display()
            )
        })?;
        Ok(Auth {
            keys: TokenCache::open(data_dir),
            members: Members::open(data_dir),
            signer,
            refresh,
            devices,
            access_ttl,
        })
    }

    /// The identity a bearer credential (an access token or an API key) authenticates.
    pub fn authenticate(&self, bearer: &str) -> Result<Identity, AuthError> {
        if bearer.starts_with(ACCESS_PREFIX) {
            let claims = self
                .signer
                .verify(bearer, crate::now_millis())
                .map_err(|e| AuthError::Rejected(format!("{e}: refresh it and try again")))?;
            self.keys.refresh();
            let key = self.keys.live(&claims.key);
            let Some(key) = key.filter(|_| !self.refresh.family_revoked(&claims.family)) else {
                return Err(AuthError::Rejected(
                    "revoked access token: log in again with `cloudctl login`".into(),
                ));
            };
            self.members.refresh();
            if self
                .members
                .role(&claims.user, &claims.org, &key.orgs)
                .is_none()
            {
                return Err(AuthError::Rejected(not_member(&claims.user, &claims.org)));
            }
            return Ok(Identity {
                user: claims.user,
                org: claims.org,
                scopes: claims.scopes,
                key_hash: claims.key,
                family: Some(claims.family),
                expires_at: Some(claims.exp),
            });
        }
        let key = self.keys.authenticate(bearer).ok_or_else(|| {
            AuthError::Rejected(
                "invalid, expired or revoked token: ask the relay's operator for a new API key"
                    .into(),
            )
        })?;
        self.members.refresh();
        let org = self.default_org(&key.user, &key.orgs, &key.orgs[0])?;
        Ok(Identity {
            user: key.user,
            org,
            scopes: key.scopes,
            key_hash: key.hash,
            family: None,
            expires_at: key.expires_at,
        })
    }

    /// Whether the credential `identity` was authenticated with is still good, apart from
    /// its expiry (which connections watch themselves): its API key live, its family not
    /// revoked.
    pub fn is_live(&self, identity: &Identity) -> bool {
        self.keys.live(&identity.key_hash).is_some()
            && !identity
                .family
                .as_deref()
                .is_some_and(|family| self.refresh.family_revoked(family))
    }

    /// Whether the user of `identity` still belongs to its org (open connections check).
    pub fn is_member(&self, identity: &Identity) -> bool {
        let Some(key) = self.keys.live(&identity.key_hash) else {
            return false;
        };
        self.members
            .role(&identity.user, &identity.org, &key.orgs)
            .is_some()
    }

    /// The role of `identity`'s user in its org, if they still belong to it.
    pub fn role(&self, identity: &Identity) -> Option<Role> {
        let key = self.keys.live(&identity.key_hash)?;
        self.members.role(&identity.user, &identity.org, &key.orgs)
    }

    /// Re-reads the token and membership files if they changed; tells open connections to
    /// re-check their credentials when the membership changed (the token cache tells them
    /// itself).
    pub(crate) fn refresh_files(&self) {
        self.keys.refresh();
        if self.members.refresh() {
            self.keys.notify();
        }
    }

    /// `preferred` if the user still belongs to it, else their first org.
    fn default_org(
        &self,
        user: &str,
        key_orgs: &[String],
        preferred: &str,
    ) -> Result<String, AuthError> {
        let orgs = self.members.orgs_of(user, key_orgs);
        if orgs.iter().any(|(org, _)| org == preferred) {
            return Ok(preferred.to_owned());
        }
        orgs.into_iter().next().map(|(org, _)| org).ok_or_else(|| {
            AuthError::Rejected(format!(
                "user {user} belongs to no org: ask the relay's operator to add them (`cloud-relay org add-member ORG {user}`)"
            ))
        })
    }

    /// The org a new access token acts in: `requested` if the user belongs to it (else
    /// [`AuthError::NotMember`]), without one the login's `preferred` org or their first.
    fn choose_org(
        &self,
        user: &str,
        key_orgs: &[String],
        preferred: &str,
        requested: Option<&str>,
    ) -> Result<String, AuthError> {
        self.members.refresh();
        match requested {
            Some(org) if self.members.role(user, org, key_orgs).is_some() => Ok(org.to_owned()),
            Some(org) => Err(AuthError::NotMember(not_member(user, org))),
            None => self.default_org(user, key_orgs, preferred),
        }
    }

    /// Exchanges an API key for an access token (acting in `org`, or the user's default
    /// org) and the first refresh token of a family (a login of the machine called `name`).
    pub fn exchange_key(
        &self,
        api_key: &str,
        name: &str,
        org: Option<&str>,
    ) -> Result<Tokens, AuthError> {
        let key = self.keys.authenticate(api_key).ok_or_else(|| {
            AuthError::Rejected(
                "invalid, expired or revoked API key: ask the relay's operator for a new one"
                    .into(),
            )
        })?;
        let org = self.choose_org(&key.user, &key.orgs, &key.orgs[0], org)?;
        let grant = Grant {
            user: key.user.clone(),
            org: key.orgs[0].clone(),
            scopes: key.scopes.clone(),
            key: key.hash.clone(),
            family: String::new(),
            name: name.chars().take(128).collect(),
            created_at: 0,
        };
        let (grant, refresh_token) = self
            .refresh
            .start_family(grant, crate::now_millis())
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        let orgs = self.org_names(&key.user, &key.orgs);
        Ok(self.tokens(grant, org, refresh_token, orgs))
    }

    fn org_names(&self, user: &str, key_orgs: &[String]) -> Vec<String> {
        self.members
            .orgs_of(user, key_orgs)
            .into_iter()
            .map(|(org, _)| org)
            .collect()
    }

    /// Starts a device authorization for the machine called `name`.
    pub fn start_device(&self, name: &str) -> Result<Started, AuthError> {
        self.devices
            .start(name, crate::now_millis())
            .map_err(AuthError::Unavailable)
    }

    /// A device's poll: once its user code is approved, a family of its own for the
    /// approver's user, org and scopes (the device code is then used up).
    pub fn redeem_device(&self, device_code: &str) -> Result<Tokens, PollError> {
        let (approval, name) = self.devices.poll(device_code, crate::now_millis())?;
        self.keys.refresh();
        let Some(key) = self.keys.live(&approval.key) else {
            return Err(PollError::Denied);
        };
        self.members.refresh();
        let org = self
            .default_org(&approval.user, &key.orgs, &approval.org)
            .map_err(|e| PollError::Unavailable(e.to_string()))?;
        let grant = Grant {
            user: approval.user,
            org: org.clone(),
            scopes: approval.scopes,
            key: approval.key,
            family: String::new(),
            name,
            created_at: 0,
        };
        let (grant, refresh_token) = self
            .refresh
            .start_family(grant, crate::now_millis())
            .map_err(|e| PollError::Unavailable(format!("{e}; try again")))?;
        let orgs = self.org_names(&grant.user, &key.orgs);
        Ok(self.tokens(grant, org, refresh_token, orgs))
    }

    /// Approves the device login with user code `user_code` as `approver` (the new
    /// machine gets its user, org and scopes), or denies it; returns the machine's name.
    pub fn decide_device(
        &self,
        user_code: &str,
        approver: Option<&Identity>,
    ) -> Result<String, DecideError> {
        let approval = approver.map(|identity| Approval {
            user: identity.user.clone(),
            org: identity.org.clone(),
            scopes: identity.scopes.clone(),
            key: identity.key_hash.clone(),
        });
        self.devices
            .decide(user_code, approval, crate::now_millis())
    }

    /// The live logins (refresh-token families) of `user`.
    pub fn families(&self, user: &str) -> Vec<Family> {
        self.refresh.families(user)
    }

    /// Revokes the login `id` of `user` (its next refresh or connect fails); open
    /// connections of it re-check and end.
    pub fn revoke_family(&self, user: &str, id: &str) -> Result<Option<Family>, AuthError> {
        let revoked = self
            .refresh
            .revoke_family(user, id)
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        if revoked.is_some() {
            self.keys.notify();
        }
        Ok(revoked)
    }

    /// Rotates a refresh token: a new access token (acting in `org`, or the login's default
    /// org) and the family's next refresh token. An org the user does not belong to is
    /// refused before the token is used, so the login stays good.
    pub fn refresh(&self, refresh_token: &str, org: Option<&str>) -> Result<Tokens, AuthError> {
        let rejected =
            |what: &str| AuthError::Rejected(format!("{what}: log in again with `cloudctl login`"));
        if let Some(requested) = org {
            if let Some(grant) = self.refresh.peek(refresh_token, crate::now_millis()) {
                self.keys.refresh();
                if let Some(key) = self.keys.live(&grant.key) {
                    self.choose_org(&grant.user, &key.orgs, &grant.org, Some(requested))?;
                }
            }
        }
        let (grant, refresh_token) = match self.refresh.rotate(refresh_token, crate::now_millis()) {
            Ok(rotated) => rotated,
            Err(RefreshError::Reused { .. }) => {
                // Open connections of the family re-check and end.
                self.keys.notify();
                return Err(rejected(
                    "this refresh token was already used, so every token of its login is now revoked",
                ));
            }
            Err(RefreshError::Invalid) => {
                return Err(rejected("unknown, expired or revoked refresh token"))
            }
            Err(e) => return Err(AuthError::Unavailable(e.to_string())),
        };
        self.keys.refresh();
        let Some(key) = self.keys.live(&grant.key) else {
            return Err(rejected("the API key this login came from was revoked"));
        };
        // Checked again after the rotation: a removal may have come in between, and the
        // new refresh token must not be lost to it (the next refresh names another org).
        let org = match self.choose_org(&grant.user, &key.orgs, &grant.org, org) {
            Ok(org) => org,
            Err(AuthError::NotMember(_)) => self.default_org(&grant.user, &key.orgs, &grant.org)?,
            Err(e) => return Err(e),
        };
        let orgs = self.org_names(&grant.user, &key.orgs);
        Ok(self.tokens(grant, org, refresh_token, orgs))
    }

    fn tokens(
        &self,
        grant: Grant,
        org: String,
        refresh_token: String,
        orgs: Vec<String>,
    ) -> Tokens {
        let iat = crate::now_millis();
        let claims = Claims {
            user: grant.user,
            org,
            scopes: grant.scopes,
            key: grant.key,
            family: grant.family,
            iat,
            exp: iat + self.access_ttl.as_millis() as u64,
        };
        Tokens {
            access_token: self.signer.sign(&claims),
            expires_in: self.access_ttl,
            refresh_token,
            user: claims.user,
            org: claims.org,
            orgs,
            scopes: claims.scopes,
        }
    }
}

/// Why a user cannot act in `org`, and what to do.
fn not_member(user: &str, org: &str) -> String {
    format!(
        "user {user} is not a member of org {org}: switch with `cloudctl org switch ORG` (see `cloudctl org list`) or ask an admin to add you"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orgs::{add_member, remove_member};
    use crate::tokens::{create, NewKey};

    /// An exchange or a refresh may name any org of the user, and nothing else; a refusal
    /// leaves the refresh token usable; a removal ends the org's access tokens at once and
    /// moves the login's next tokens to an org the user still belongs to.
    #[test]
    fn tokens_act_in_the_orgs_their_user_belongs_to() {
        let dir = tempfile::tempdir().unwrap();
        let auth = Auth::open(
            dir.path(),
            DEFAULT_ACCESS_TOKEN_TTL,
            DeviceConfig::default(),
        )
        .unwrap();
        let key = create(dir.path(), &NewKey::new("alice", "acme")).unwrap();
        assert!(matches!(
            auth.exchange_key(&key, "test", Some("beta")),
            Err(AuthError::NotMember(_))
        ));
        add_member(dir.path(), "beta", "alice", Role::Member).unwrap();
        let tokens = auth.exchange_key(&key, "test", Some("beta")).unwrap();
        assert_eq!(tokens.org, "beta");
        assert_eq!(tokens.orgs, ["acme", "beta"]);
        let identity = auth.authenticate(&tokens.access_token).unwrap();
        assert_eq!(identity.org, "beta");
        // Refused before the refresh token is used: it still works afterwards.
        let refused = auth.refresh(&tokens.refresh_token, Some("gamma"));
        match refused {
            Err(AuthError::NotMember(message)) => {
                assert!(message.contains("cloudctl org switch"), "{message}");
                assert!(!message.contains("crf_") && !message.contains("cat_"));
            }
            other => panic!("{other:?}"),
        }
        let next = auth.refresh(&tokens.refresh_token, Some("acme")).unwrap();
        assert_eq!(next.org, "acme");
        // Removed from beta: beta's access token stops working, the API key acts in acme.
        remove_member(dir.path(), "beta", "alice").unwrap();
        assert!(auth.authenticate(&tokens.access_token).is_err());
        assert!(!auth.is_member(&identity));
        assert_eq!(auth.authenticate(&key).unwrap().org, "acme");
        assert!(matches!(
            auth.refresh(&next.refresh_token, Some("beta")),
            Err(AuthError::NotMember(_))
        ));
        // Removed from the key's own org too: no org left.
        remove_member(dir.path(), "acme", "alice").unwrap();
        assert!(auth.authenticate(&key).is_err());
    }
}
