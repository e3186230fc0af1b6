//! The daemon's access tokens: getting them from the relay (`POST /v1/auth/token`, an API
//! key exchanged once, then the refresh token rotated), keeping the one in use, and when to
//! refresh it.
//!
//! [`Keeper`] is the one place that talks to the token endpoint, and it runs one exchange
//! at a time: two refreshes with the same refresh token would look like theft to the relay
//! and revoke this machine's login. It re-reads the credentials before every exchange
//! (a login or logout in between is obeyed) and writes the rotated refresh token back
//! before handing the access token out. The bridge refreshes at [`refresh_at`] (80% of a
//! token's lifetime) and, when the relay refuses a token, asks once for a fresh one
//! ([`Keeper::access`] with the refused token). Every exchange names the daemon's current
//! org ([`Keeper::set_org`]), so its tokens act in that org, and a token of another org is
//! never reused.
//!
//! It also makes the daemon's other calls to the relay's HTTP API: a device login's start
//! and polls ([`Keeper::start_device`], [`Keeper::poll_device`]) and, as the logged-in
//! user, [`Keeper::api`] (approving device logins, listing and revoking logins).
//!
//! Architecture invariant: tokens and device codes go only into request bodies and
//! `Authorization` headers; [`Access`]'s `Debug` hides the token, and no error here
//! contains one.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cloud_protocol::ipc::RelayMode;
use http_body_util::BodyExt as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use crate::credentials::{self, Credentials};

/// The token endpoint's path.
pub const TOKEN_PATH: &str = "/v1/auth/token";

/// Where a device login starts.
pub const DEVICE_PATH: &str = "/v1/auth/device";

/// The largest token answer read.
const MAX_ANSWER: usize = 64 * 1024;

/// The longest an exchange may take.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(15);

/// The soonest a failed refresh is tried again.
const MIN_RETRY: Duration = Duration::from_millis(100);

/// An access token and its lifetime.
#[derive(Clone, PartialEq, Eq)]
pub struct Access {
    /// The bearer token.
    pub token: String,
    /// When it was received.
    pub obtained: Instant,
    /// How long it lives from then.
    pub lifetime: Duration,
    /// The org it acts in.
    pub org: String,
    /// Every org of its user.
    pub orgs: Vec<String>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl Access {
    /// When it stops working.
    pub fn expires(&self) -> Instant {
        self.obtained + self.lifetime
    }
}

/// When to refresh `access`: at 80% of its lifetime, leaving a fifth of it for the
/// exchange and for a retry or two.
pub fn refresh_at(access: &Access) -> Instant {
    access.obtained + access.lifetime.mul_f64(0.8)
}

/// When to try again after a refresh failed at `now`: half-way to the token's expiry (at
/// least [`MIN_RETRY`] later), so a short relay outage is retried more than once before
/// the token runs out.
pub fn retry_at(access: &Access, now: Instant) -> Instant {
    let left = access.expires().saturating_duration_since(now);
    now + (left / 2).max(MIN_RETRY)
}

/// Why no access token could be had. Messages never contain a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The relay refused this machine's login: only a new `cloudctl login` helps.
    #[error("{0}")]
    LoggedOut(String),
    /// Nothing listens at the relay's address.
    #[error("{0}")]
    NothingListening(String),
    /// The credentials name another relay than the caller's by now (a login or logout):
    /// start again with them.
    #[error("the login changed; connecting with the new one")]
    Changed,
    /// Anything else: worth retrying.
    #[error("{0}")]
    Failed(String),
}

/// The relay's answer to an exchange.
#[derive(serde::Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in_ms: u64,
    refresh_token: String,
    #[serde(default)]
    org: String,
    #[serde(default)]
    orgs: Vec<String>,
}

/// A device login, as the relay started it.
#[derive(serde::Deserialize)]
pub struct DeviceStart {
    /// The secret to poll with (kept by the daemon, never shown).
    pub device_code: String,
    /// What the user approves on another machine.
    pub user_code: String,
    /// How long to wait between polls.
    pub interval_ms: u64,
    /// How long the codes live.
    pub expires_in_ms: u64,
}

impl std::fmt::Debug for DeviceStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceStart")
            .field("user_code", &self.user_code)
            .finish_non_exhaustive()
    }
}

/// What one poll of a device login found.
#[derive(PartialEq, Eq)]
pub enum DevicePoll {
    /// Approved: the first refresh token of this machine's login.
    Approved(String),
    /// Not decided yet.
    Pending,
    /// Polled too soon.
    SlowDown,
    /// Denied, expired or unknown: the relay's reason.
    Refused(String),
}

impl std::fmt::Debug for DevicePoll {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DevicePoll::Approved(_) => f.write_str("Approved(..)"),
            DevicePoll::Pending => f.write_str("Pending"),
            DevicePoll::SlowDown => f.write_str("SlowDown"),
            DevicePoll::Refused(reason) => write!(f, "Refused({reason:?})"),
        }
    }
}

/// The access token in use, and the credentials it came from.
struct Held {
    relay: String,
    refresh_token: String,
    access: Access,
}

/// Gets, keeps and refreshes the daemon's access token.
pub struct Keeper {
    /// Where `credentials.toml` lives.
    config_dir: PathBuf,
    /// TLS for `https://` relays (the bridge's).
    tls: Arc<rustls::ClientConfig>,
    /// The embedded relay's credentials while it runs (kept in memory only).
    embedded: std::sync::Mutex<Option<Credentials>>,
    /// The token in use; its lock is held for a whole exchange.
    held: tokio::sync::Mutex<Option<Held>>,
    /// The org tokens are asked for (none: the login's default).
    org: std::sync::Mutex<Option<String>>,
    /// This machine's name, given to the relay for the login's name.
    hostname: String,
}

impl std::fmt::Debug for Keeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keeper")
            .field("config_dir", &self.config_dir)
            .finish_non_exhaustive()
    }
}

impl Keeper {
    /// A keeper for the credentials in `config_dir`.
    pub fn new(config_dir: PathBuf, tls: Arc<rustls::ClientConfig>) -> Keeper {
        Keeper {
            config_dir,
            tls,
            embedded: std::sync::Mutex::new(None),
            held: tokio::sync::Mutex::new(None),
            org: std::sync::Mutex::new(None),
            hostname: hostname::get()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }

    /// Sets the org the next tokens act in (a held token of another org is not reused).
    pub fn set_org(&self, org: Option<String>) {
        *self.org.lock().unwrap() = org;
    }

    /// Sets (or clears) the embedded relay's credentials, used when there is no file.
    pub fn set_embedded(&self, credentials: Option<Credentials>) {
        *self.embedded.lock().unwrap() = credentials;
    }

    /// The credentials to use now: the file's, else the embedded relay's.
    fn load(&self) -> Result<Option<(Credentials, RelayMode)>, AuthError> {
        match credentials::load(&self.config_dir) {
            Ok(Some(credentials)) => Ok(Some((credentials, RelayMode::Remote))),
            Ok(None) => Ok(self
                .embedded
                .lock()
                .unwrap()
                .clone()
                .map(|credentials| (credentials, RelayMode::Embedded))),
            Err(e) => Err(AuthError::LoggedOut(e.to_string())),
        }
    }

    /// An access token for `relay` from the current credentials: the one in use while it
    /// is not due for a refresh (and is not `refused`, a token the relay just turned
    /// down), else a fresh one. Credentials for another relay by now (a login or logout
    /// since the caller chose `relay`) fail, to be retried with the new ones.
    pub async fn access(&self, relay: &str, refused: Option<&str>) -> Result<Access, AuthError> {
        let mut held = self.held.lock().await;
        let Some((mut credentials, mode)) = self.load()? else {
            return Err(AuthError::LoggedOut(
                "not logged in: run `cloudctl login --relay URL`".into(),
            ));
        };
        if credentials.relay != relay {
            return Err(AuthError::Changed);
        }
        let org = self.org.lock().unwrap().clone();
        if let Some(current) = held.as_ref() {
            let same_login = current.relay == credentials.relay
                && credentials.refresh_token.as_deref() == Some(current.refresh_token.as_str())
                && org.as_ref().is_none_or(|org| *org == current.access.org);
            let refused = refused == Some(current.access.token.as_str());
            if same_login && !refused && Instant::now() < refresh_at(&current.access) {
                return Ok(current.access.clone());
            }
        }
        *held = None;
        let answer = match (&credentials.refresh_token, &credentials.api_key) {
            (Some(refresh_token), api_key) => {
                let refreshed = self
                    .exchange(
                        &credentials.relay,
                        serde_json::json!({"grant_type": "refresh_token", "refresh_token": refresh_token, "org": org}),
                    )
                    .await;
                match (refreshed, api_key) {
                    // The embedded relay's key is always at hand: start a new login.
                    (Err(AuthError::LoggedOut(_)), Some(api_key)) => {
                        self.exchange_key(&credentials.relay, api_key, org.as_deref())
                            .await?
                    }
                    (refreshed, _) => refreshed?,
                }
            }
            (None, Some(api_key)) => {
                self.exchange_key(&credentials.relay, api_key, org.as_deref())
                    .await?
            }
            (None, None) => {
                return Err(AuthError::LoggedOut(
                    "the credentials file holds no login: run `cloudctl login --relay URL`".into(),
                ))
            }
        };
        let access = Access {
            token: answer.access_token,
            obtained: Instant::now(),
            lifetime: Duration::from_millis(answer.expires_in_ms),
            org: answer.org,
            orgs: answer.orgs,
        };
        let used = credentials
            .refresh_token
            .replace(answer.refresh_token.clone());
        match mode {
            RelayMode::Remote => {
                // The key is not kept once exchanged: the refresh token is this login now.
                credentials.api_key = None;
                // Unless a logout or another login replaced the file meanwhile.
                let now_on_disk = credentials::load(&self.config_dir).ok().flatten();
                if now_on_disk.as_ref().map(|c| (&c.relay, &c.refresh_token))
                    == Some((&credentials.relay, &used))
                {
                    credentials::save(&self.config_dir, &credentials).map_err(|e| {
                        AuthError::Failed(format!(
                            "cannot save the refreshed login ({e}); if this persists, run `cloudctl login` again"
                        ))
                    })?;
                }
            }
            RelayMode::Embedded => *self.embedded.lock().unwrap() = Some(credentials.clone()),
        }
        *held = Some(Held {
            relay: credentials.relay,
            refresh_token: answer.refresh_token,
            access: access.clone(),
        });
        Ok(access)
    }

    async fn exchange_key(
        &self,
        relay: &str,
        api_key: &str,
        org: Option<&str>,
    ) -> Result<TokenAnswer, AuthError> {
        self.exchange(
            relay,
            serde_json::json!({"grant_type": "api_key", "api_key": api_key, "name": self.hostname, "org": org}),
        )
        .await
    }

    /// One request to `relay`'s HTTP API, within [`EXCHANGE_TIMEOUT`]: its status and body.
    async fn call(
        &self,
        relay: &str,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, Vec<u8>), AuthError> {
        let endpoint = Endpoint::parse(relay).map_err(AuthError::LoggedOut)?;
        let call = Call {
            method,
            path,
            bearer,
            body: body.map(|b| b.to_string()).unwrap_or_default(),
        };
        tokio::time::timeout(EXCHANGE_TIMEOUT, send(&endpoint, call, &self.tls))
            .await
            .map_err(|_| AuthError::Failed(format!("the request to {relay} timed out")))?
    }

    /// Starts a device login at `relay`, named after this machine.
    pub async fn start_device(&self, relay: &str) -> Result<DeviceStart, AuthError> {
        let body = serde_json::json!({"name": self.hostname});
        match self
            .call(relay, "POST", DEVICE_PATH, None, Some(body))
            .await?
        {
            (200, body) => parse_device_start(&body).map_err(AuthError::Failed),
            (404, _) => Err(AuthError::Failed(format!(
                "the relay at {relay} has no device login: log in with `cloudctl login --relay {relay} --token KEY`"
            ))),
            (status, body) => Err(AuthError::Failed(format!(
                "the relay refused to start a device login (HTTP {status}: {})",
                relay_message(&body)
            ))),
        }
    }

    /// Polls a device login once.
    pub async fn poll_device(
        &self,
        relay: &str,
        device_code: &str,
    ) -> Result<DevicePoll, AuthError> {
        let body = serde_json::json!({"grant_type": "device_code", "device_code": device_code});
        let (status, body) = self
            .call(relay, "POST", TOKEN_PATH, None, Some(body))
            .await?;
        parse_poll(status, &body)
    }

    /// A request to the relay's API as the logged-in user: with the current access token,
    /// refreshed once if the relay refuses it. Its status and JSON body.
    pub async fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, serde_json::Value), AuthError> {
        // The embedded relay has no other users or machines: these calls are for a
        // remote one.
        let Some((credentials, RelayMode::Remote)) = self.load()? else {
            return Err(AuthError::LoggedOut(
                "this machine is not logged in to a relay (it uses the embedded one): run `cloudctl login --relay URL` first".into(),
            ));
        };
        let relay = credentials.relay;
        let mut access = self.access(&relay, None).await?;
        let mut retried = false;
        loop {
            let (status, answer) = self
                .call(&relay, method, path, Some(&access.token), body.clone())
                .await?;
            if status == 401 && !retried {
                retried = true;
                access = self.access(&relay, Some(&access.token)).await?;
                continue;
            }
            if answer.len() > MAX_ANSWER {
                return Err(AuthError::Failed("the relay's answer is too large".into()));
            }
            let value = serde_json::from_slice(&answer).unwrap_or_default();
            return Ok((status, value));
        }
    }

    /// One `POST /v1/auth/token`.
    async fn exchange(
        &self,
        relay: &str,
        body: serde_json::Value,
    ) -> Result<TokenAnswer, AuthError> {
        let answer = self
            .call(relay, "POST", TOKEN_PATH, None, Some(body))
            .await
            .map_err(|e| match e {
                AuthError::Failed(reason) if reason.ends_with("timed out") => {
                    AuthError::Failed(format!("the token exchange with {relay} timed out"))
                }
                e => e,
            })?;
        match answer {
            (200, body) => parse_answer(&body).map_err(AuthError::Failed),
            // Not a member of the org asked for: the relay says what to do.
            (403, body) => Err(AuthError::LoggedOut(relay_message(&body))),
            (401, body) => Err(AuthError::LoggedOut(format!(
                "the relay refused this machine's login ({}); run `cloudctl login --relay {relay}` again",
                relay_message(&body)
            ))),
            (status, body) => Err(AuthError::Failed(format!(
                "the token exchange failed (HTTP {status}: {})",
                relay_message(&body)
            ))),
        }
    }
}

/// A token answer's fields, from at most [`MAX_ANSWER`] bytes.
fn parse_answer(body: &[u8]) -> Result<TokenAnswer, String> {
    if body.len() > MAX_ANSWER {
        return Err("the relay's token answer is too large".into());
    }
    let answer: TokenAnswer = serde_json::from_slice(body).map_err(|_| {
        "the relay's token answer is not valid JSON of the expected shape".to_owned()
    })?;
    if answer.expires_in_ms == 0 || answer.access_token.is_empty() {
        return Err("the relay's token answer has no usable access token".into());
    }
    Ok(answer)
}

/// A device login's start, from at most [`MAX_ANSWER`] bytes.
fn parse_device_start(body: &[u8]) -> Result<DeviceStart, String> {
    if body.len() > MAX_ANSWER {
        return Err("the relay's answer is too large".into());
    }
    let start: DeviceStart = serde_json::from_slice(body)
        .map_err(|_| "the relay's device login answer is not of the expected shape".to_owned())?;
    if start.interval_ms == 0 || start.user_code.is_empty() || start.user_code.len() > 64 {
        return Err("the relay's device login answer has no usable code".into());
    }
    Ok(start)
}

/// A device poll's answer: its HTTP status and (at most [`MAX_ANSWER`] bytes of) body.
fn parse_poll(status: u16, body: &[u8]) -> Result<DevicePoll, AuthError> {
    match status {
        200 => Ok(DevicePoll::Approved(
            parse_answer(body).map_err(AuthError::Failed)?.refresh_token,
        )),
        400 if body.len() <= MAX_ANSWER => {
            let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            Ok(match value["error"].as_str() {
                Some("authorization_pending") => DevicePoll::Pending,
                Some("slow_down") => DevicePoll::SlowDown,
                _ => DevicePoll::Refused(relay_description(&value)),
            })
        }
        status => Err(AuthError::Failed(format!(
            "the relay could not answer the device login (HTTP {status}: {}); try again",
            relay_message(body)
        ))),
    }
}

/// A device poll refusal's `error_description`, cut short (it never carries a code).
fn relay_description(value: &serde_json::Value) -> String {
    value["error_description"]
        .as_str()
        .unwrap_or("the relay refused the device login")
        .chars()
        .take(200)
        .collect()
}

/// The `error` of a relay's JSON error answer, cut short (a relay never puts a token in
/// it; a foreign server's page is not shown whole).
fn relay_message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "no explanation".into())
        .chars()
        .take(200)
        .collect()
}

/// Where the token endpoint is.
struct Endpoint {
    secure: bool,
    host: String,
    port: u16,
    /// `host[:port]`, for the `Host` header.
    authority: String,
    /// The relay's path prefix (empty, or `/base`).
    prefix: String,
}

impl Endpoint {
    fn parse(relay: &str) -> Result<Endpoint, String> {
        // The same rules as the bridge: TLS except on loopback.
        crate::bridge::bridge_url(relay)?;
        let relay = relay.trim_end_matches('/');
        let (scheme, rest) = relay.split_once("://").expect("checked by bridge_url");
        let secure = matches!(scheme, "https" | "wss");
        let (authority, prefix) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let parsed: http::uri::Authority = authority
            .parse()
            .map_err(|_| format!("invalid relay URL {relay:?}: expected https://host[:port]"))?;
        Ok(Endpoint {
            secure,
            host: parsed
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port: parsed.port_u16().unwrap_or(if secure { 443 } else { 80 }),
            authority: authority.to_owned(),
            prefix: prefix.to_owned(),
        })
    }
}

/// One HTTP request: its method, path under the relay's prefix, bearer and JSON body.
struct Call<'a> {
    method: &'a str,
    path: &'a str,
    bearer: Option<&'a str>,
    body: String,
}

/// Sends `call` to the endpoint; returns the status and (at most [`MAX_ANSWER`] bytes of)
/// the body.
async fn send(
    endpoint: &Endpoint,
    call: Call<'_>,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<(u16, Vec<u8>), AuthError> {
    let address = format!("{}:{}", endpoint.host, endpoint.port);
    let tcp = match tokio::net::TcpStream::connect((endpoint.host.as_str(), endpoint.port)).await {
        Ok(tcp) => tcp,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Err(AuthError::NothingListening(format!(
                "cannot connect to {address}: {e}"
            )))
        }
        Err(e) => {
            return Err(AuthError::Failed(format!(
                "cannot connect to {address}: {e}"
            )))
        }
    };
    let _ = tcp.set_nodelay(true);
    if !endpoint.secure {
        return request(tcp, endpoint, call).await;
    }
    let name = rustls::pki_types::ServerName::try_from(endpoint.host.clone())
        .map_err(|e| AuthError::Failed(format!("invalid relay host {}: {e}", endpoint.host)))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::clone(tls))
        .connect(name, tcp)
        .await
        .map_err(|e| AuthError::Failed(format!("TLS with {address} failed: {e}")))?;
    request(stream, endpoint, call).await
}

async fn request<S>(
    stream: S,
    endpoint: &Endpoint,
    call: Call<'_>,
) -> Result<(u16, Vec<u8>), AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let fail = |e: &dyn std::fmt::Display| {
        AuthError::Failed(format!("the request to {} failed: {e}", endpoint.authority))
    };
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| fail(&e))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut request = hyper::Request::builder()
        .method(call.method)
        .uri(format!("{}{}", endpoint.prefix, call.path))
        .header(hyper::header::HOST, endpoint.authority.as_str())
        .header(hyper::header::CONTENT_TYPE, "application/json");
    if let Some(bearer) = call.bearer {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {bearer}"));
    }
    let request = request
        .body(http_body_util::Full::new(hyper::body::Bytes::from(
            call.body,
        )))
        .map_err(|e| fail(&e))?;
    let response = sender.send_request(request).await.map_err(|e| fail(&e))?;
    let status = response.status().as_u16();
    let body = http_body_util::Limited::new(response.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| fail(&e))?
        .to_bytes();
    Ok((status, body.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn access(lifetime: Duration) -> Access {
        Access {
            token: "cat_x".into(),
            obtained: Instant::now(),
            lifetime,
            org: String::new(),
            orgs: Vec::new(),
        }
    }

    /// A 2-second token is refreshed at 1.6 s, not before; a failed refresh is retried
    /// half-way to expiry, and never sooner than 100 ms.
    #[tokio::test(start_paused = true)]
    async fn refreshes_are_scheduled_at_80_percent_and_retried_before_expiry() {
        let access = access(Duration::from_secs(2));
        let due = refresh_at(&access);
        let waited =
            tokio::time::timeout(Duration::from_millis(1_599), tokio::time::sleep_until(due)).await;
        assert!(waited.is_err(), "not due before 80% of the lifetime");
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(Instant::now() >= due);
        assert_eq!(
            retry_at(&access, Instant::now()) - Instant::now(),
            Duration::from_millis(200)
        );
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(
            retry_at(&access, Instant::now()),
            Instant::now() + MIN_RETRY
        );
        // A 15-minute token: at 12 minutes.
        let long = super::tests::access(Duration::from_secs(900));
        assert_eq!(refresh_at(&long) - long.obtained, Duration::from_secs(720));
        // Debug never shows the token.
        assert!(!format!("{long:?}").contains("cat_"));
    }

    #[test]
    fn endpoints() {
        let endpoint = Endpoint::parse("https://relay.example/base/").unwrap();
        assert!(endpoint.secure);
        assert_eq!(
            (endpoint.host.as_str(), endpoint.port),
            ("relay.example", 443)
        );
        assert_eq!(endpoint.prefix, "/base");
        let endpoint = Endpoint::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!((endpoint.secure, endpoint.port), (false, 8080));
        assert_eq!(endpoint.authority, "127.0.0.1:8080");
        assert!(Endpoint::parse("http://relay.example").is_err());
    }

    proptest! {
        /// Any bytes as a token answer: an error or an answer, never a panic, and an
        /// error never quotes the body.
        #[test]
        fn arbitrary_answers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            if let Err(message) = parse_answer(&bytes) {
                prop_assert!(!message.contains("crf_") && !message.contains("cat_"));
            }
            let _ = relay_message(&bytes);
            if let Err(message) = parse_device_start(&bytes) {
                prop_assert!(!message.contains("cdc_"));
            }
            for status in [200, 400, 503] {
                match parse_poll(status, &bytes) {
                    Ok(DevicePoll::Refused(message)) | Err(AuthError::Failed(message)) => {
                        prop_assert!(message.chars().count() <= 300);
                    }
                    _ => {}
                }
            }
        }

        /// The relay's refusals of a poll map to RFC 8628's outcomes.
        #[test]
        fn poll_answers_map_to_their_outcomes(description in "[a-z ]{0,40}") {
            let body = |error: &str| {
                serde_json::json!({"error": error, "error_description": description}).to_string()
            };
            prop_assert_eq!(
                parse_poll(400, body("authorization_pending").as_bytes()).unwrap(),
                DevicePoll::Pending
            );
            prop_assert_eq!(
                parse_poll(400, body("slow_down").as_bytes()).unwrap(),
                DevicePoll::SlowDown
            );
            prop_assert_eq!(
                parse_poll(400, body("access_denied").as_bytes()).unwrap(),
                DevicePoll::Refused(description.clone())
            );
        }
    }
}
