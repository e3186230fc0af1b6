//! Getting a connection as far as registered: which relay (the credentials, re-read at
//! every attempt, or the embedded relay when none are set), its bridge URL, TLS, an
//! access token ([`crate::auth::Keeper`]), the WebSocket upgrade with it, the
//! registration, and claiming the journal's events for the relay and identity that
//! registered. An upgrade refused with 401 is tried once more with a refreshed token.
//!
//! Every way an attempt can fail is sorted here into an [`Ended`]: a permanent refusal
//! (a login the relay no longer accepts, an unusable URL or credentials file), nothing
//! listening, or a failure worth retrying.
//!
//! Architecture invariant: the token goes only into the upgrade's `Authorization` header,
//! never into a log, a status or an error, and plain `http`/`ws` is used only on loopback.
//! Nothing is sent before `Register`, and no journal entry before the journal is claimed
//! for the identity that registered: events queued for another relay or identity are
//! refused here, never sent.

use crate::teleport::transfer::BlobEndpoint;
use std::sync::Arc;

use cloud_protocol::bridge::{self, Channel, FromRelay, ToRelay, BRIDGE_PATH, MAX_BRIDGE_MESSAGE};
use cloud_protocol::ipc::{BridgeState, RelayMode};
use futures_util::StreamExt as _;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

use super::writer::{send, SEND_BATCH};
use super::{Bridge, Ended, Socket, CONNECT_TIMEOUT};
use crate::auth::AuthError;
use crate::credentials::Credentials;
use crate::embedded::EmbeddedRelay;

/// The TLS settings for `wss://`: rustls with the `webpki-roots` certificates.
pub(super) fn tls_config() -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

impl Bridge {
    /// Connects and registers. On success the status is `connected`, the journal belongs to
    /// the identity that registered, and the followed sessions (with the last seq stored
    /// for each) are returned for the rejoin.
    pub(super) async fn connect(&mut self) -> Result<(Socket, Vec<(String, u64)>), Ended> {
        let (credentials, mode) = self.credentials().await?;
        let url = bridge_url(&credentials.relay).map_err(Ended::Refused)?;
        self.link.set_status(|s| {
            s.url = credentials.relay.clone();
            s.mode = mode;
        });
        // The org this connection acts in: the current one (`cloudctl org switch`).
        self.keeper.set_org(self.link.account.current_org());
        let mut access = self
            .keeper
            .access(&credentials.relay, None)
            .await
            .map_err(auth_ended)?;
        let mut socket = match self.open(&url, &access.token).await {
            // Refused by the relay (expired meanwhile, secret changed): refresh once.
            Err(Ended::Unauthorized(_)) => {
                access = self
                    .keeper
                    .access(&credentials.relay, Some(&access.token))
                    .await
                    .map_err(auth_ended)?;
                self.open(&url, &access.token).await.map_err(|e| match e {
                    Ended::Unauthorized(reason) => Ended::Refused(reason),
                    e => e,
                })?
            }
            opened => opened?,
        };
        let refresh_due = crate::auth::refresh_at(&access);
        if !access.orgs.is_empty() {
            self.link.account.set_orgs(access.orgs.clone());
        }

        // Register with the full snapshot, then wait for the verdict.
        let followed = self.link.inbound.followed().unwrap_or_default();
        let (user, org) = self.register(&mut socket, &followed).await?;
        // The journal's events belong to the relay and identity they were queued for: a
        // different one never receives them.
        let owner = match mode {
            RelayMode::Embedded => {
                format!("the embedded relay as {user}/{org}")
            }
            RelayMode::Remote => format!(
                "{} as {user}/{org}",
                credentials.relay.trim_end_matches('/'),
            ),
        };
        if let Err(reason) = self.claim_journal(&owner).await {
            return Err(Ended::Failed {
                reason,
                registered: false,
            });
        }
        tracing::info!(user = %user, org = %org, url = %url, "connected to the relay");
        self.link.metrics.reconnected();
        // Teleport's blob socket is beside the bridge, with the same credentials.
        self.link.set_blob_endpoint(Some(BlobEndpoint {
            base: url.trim_end_matches(BRIDGE_PATH).to_owned(),
            relay: credentials.relay.clone(),
            keeper: Arc::clone(&self.keeper),
            tls: Arc::clone(&self.tls),
        }));
        self.access = Some((credentials.relay.clone(), access, refresh_due));
        self.link.set_status(|s| {
            s.state = BridgeState::Connected;
            s.reason = None;
            s.user = Some(user.clone());
            s.org = Some(org.clone());
        });
        Ok((socket, followed))
    }

    /// The credentials for this attempt: the configured remote relay, else the embedded
    /// one (started on first need, stopped when a remote relay is configured).
    async fn credentials(&mut self) -> Result<(Credentials, RelayMode), Ended> {
        match crate::credentials::load(&self.config_dir) {
            Ok(Some(credentials)) => {
                if let Some(embedded) = self.embedded.take() {
                    self.keeper.set_embedded(None);
                    embedded.stop().await;
                }
                Ok((credentials, RelayMode::Remote))
            }
            Ok(None) => {
                if self.embedded.is_none() {
                    // Its address is not known until it listens: say it is starting.
                    self.link.set_status(|s| {
                        s.mode = RelayMode::Embedded;
                        s.url.clear();
                    });
                    let state_dir = self.state_dir.clone();
                    let started =
                        tokio::task::spawn_blocking(move || EmbeddedRelay::start(&state_dir))
                            .await
                            .map_err(|e| {
                                Ended::Refused(format!("the embedded relay failed: {e}"))
                            })?;
                    // A relay that failed to start may start next time: retry, do not give up.
                    let started = started.map_err(|e| Ended::Failed {
                        reason: e.to_string(),
                        registered: false,
                    })?;
                    // Its key is exchanged like a remote login's, but kept in memory only.
                    self.keeper.set_embedded(Some(started.credentials.clone()));
                    self.embedded = Some(started);
                }
                let embedded = self.embedded.as_ref().expect("just started");
                Ok((embedded.credentials.clone(), RelayMode::Embedded))
            }
            Err(e) => Err(Ended::Refused(e.to_string())),
        }
    }

    /// The WebSocket upgrade at `url` with the access token, within [`CONNECT_TIMEOUT`].
    async fn open(&self, url: &str, token: &str) -> Result<Socket, Ended> {
        let mut request = match url.into_client_request() {
            Ok(request) => request,
            Err(e) => return Err(Ended::Refused(format!("invalid relay URL {url}: {e}"))),
        };
        let Ok(authorization) = format!("Bearer {token}").parse() else {
            return Err(Ended::Refused(
                "the token contains characters a header cannot carry".into(),
            ));
        };
        request.headers_mut().insert("authorization", authorization);
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_BRIDGE_MESSAGE))
            .max_frame_size(Some(MAX_BRIDGE_MESSAGE));
        let connect = tokio_tungstenite::connect_async_tls_with_config(
            request,
            Some(config),
            true,
            Some(tokio_tungstenite::Connector::Rustls(Arc::clone(&self.tls))),
        );
        let connected = tokio::select! {
            _ = self.shutdown.cancelled() => return Err(Ended::Cancelled),
            connected = tokio::time::timeout(CONNECT_TIMEOUT, connect) => connected,
        };
        match connected {
            Err(_) => Err(Ended::Failed {
                reason: format!("connecting to {url} timed out"),
                registered: false,
            }),
            // Refused: only a TCP connect fails this way (a connection that was established
            // and dropped is reset, which goes on the exponential schedule).
            Ok(Err(tungstenite::Error::Io(e)))
                if e.kind() == std::io::ErrorKind::ConnectionRefused =>
            {
                Err(Ended::NothingListening(format!(
                    "cannot connect to {url}: {e}"
                )))
            }
            Ok(Err(tungstenite::Error::Http(response))) if response.status().as_u16() == 401 => {
                Err(Ended::Unauthorized(
                    "the relay rejected a fresh access token (HTTP 401); log in again with `cloudctl login`"
                        .into(),
                ))
            }
            Ok(Err(tungstenite::Error::Http(response))) if response.status().as_u16() == 429 => {
                Err(Ended::RateLimited(super::retry_after(response.headers())))
            }
            Ok(Err(tungstenite::Error::Http(response))) if response.status().as_u16() == 403 => {
                Err(Ended::Refused(
                    "the relay refused this login the bridge (HTTP 403: its API key lacks the sessions:write scope); log in with a key that has it"
                        .into(),
                ))
            }
            Ok(Err(e)) => Err(Ended::Failed {
                reason: format!("cannot connect to {url}: {e}"),
                registered: false,
            }),
            Ok(Ok((socket, _))) => Ok(socket),
        }
    }

    /// Sends the instance snapshot (with the followed sessions) and waits for the verdict.
    /// Returns the user and org the relay registered this instance as.
    async fn register(
        &self,
        socket: &mut Socket,
        followed: &[(String, u64)],
    ) -> Result<(String, String), Ended> {
        let mut snapshot = self.snapshot.clone();
        snapshot.sessions = followed.iter().map(|(s, _)| s.clone()).collect();
        send(socket, Channel::Extension, 0, ToRelay::Register(snapshot)).await?;
        loop {
            let next = tokio::time::timeout(CONNECT_TIMEOUT, socket.next()).await;
            match next {
                Err(_) => {
                    return Err(Ended::Failed {
                        reason: "the relay did not answer the registration".into(),
                        registered: false,
                    })
                }
                Ok(None) => {
                    return Err(Ended::Failed {
                        reason: "the relay closed the connection while registering".into(),
                        registered: false,
                    })
                }
                Ok(Some(Err(e))) => {
                    return Err(Ended::Failed {
                        reason: format!("reading from the relay failed: {e}"),
                        registered: false,
                    })
                }
                Ok(Some(Ok(Message::Binary(bytes)))) => match bridge::decode::<FromRelay>(&bytes) {
                    Ok(envelope) => match envelope.body {
                        FromRelay::Registered { user, org, .. } => {
                            // Its ack says what the relay already holds: trim before resending.
                            self.link.acknowledge(envelope.ack);
                            return Ok((user, org));
                        }
                        FromRelay::Refused {
                            reason,
                            permanent: true,
                        } => return Err(Ended::Refused(reason)),
                        FromRelay::Refused { reason, .. } => {
                            return Err(Ended::Failed {
                                reason,
                                registered: false,
                            })
                        }
                        other => {
                            return Err(Ended::Failed {
                                reason: format!("unexpected {other:?} before registration"),
                                registered: false,
                            })
                        }
                    },
                    Err(e) => {
                        return Err(Ended::Failed {
                            reason: format!("relay sent {e}"),
                            registered: false,
                        })
                    }
                },
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// Makes `owner` (a relay and an identity) the owner of the journal's events. Events
    /// still unacknowledged that were queued for another owner are refused here, never
    /// sent: their waiters, `status` and `sessions` subscribers are told why.
    async fn claim_journal(&self, owner: &str) -> Result<(), String> {
        let link = &self.link;
        let previous = link
            .meta
            .journal_owner()
            .map_err(|e| format!("cannot read whose events the journal holds: {e}"))?;
        if previous.as_deref() == Some(owner) {
            return Ok(());
        }
        if let Some(previous) = previous {
            let reason = format!(
                "not delivered: it was queued for {previous}, and this daemon now talks to {owner}"
            );
            let mut n_refused = 0u64;
            loop {
                let after = link.journal.acked();
                let entries = link
                    .journal
                    .read_after(after, SEND_BATCH)
                    .map_err(|e| format!("cannot read the journal: {e}"))?;
                let Some(&(last, _)) = entries.last() else {
                    break;
                };
                for (seq, event) in entries {
                    link.refuse(seq, reason.clone());
                    link.report_refusal(seq, event.session().to_owned(), reason.clone());
                    n_refused += 1;
                }
                link.acknowledge(last);
            }
            if n_refused > 0 {
                tracing::warn!(n_refused, "refused journaled events queued for {previous}: this daemon now talks to {owner}");
            }
        }
        link.meta
            .set_journal_owner(owner)
            .await
            .map_err(|e| format!("cannot record whose events the journal holds: {e}"))
    }
}

/// How a failure to get an access token ends the attempt.
fn auth_ended(error: AuthError) -> Ended {
    match error {
        AuthError::LoggedOut(reason) => Ended::Refused(reason),
        AuthError::Changed => Ended::Reconnect,
        AuthError::NothingListening(reason) => Ended::NothingListening(reason),
        AuthError::Failed(reason) => Ended::Failed {
            reason,
            registered: false,
        },
    }
}

/// The bridge endpoint of a relay base URL. `https`/`wss` anywhere; `http`/`ws` only on
/// loopback, where there is nothing to encrypt against.
pub fn bridge_url(relay: &str) -> Result<String, String> {
    let relay = relay.trim_end_matches('/');
    let (scheme, rest) = relay
        .split_once("://")
        .ok_or_else(|| format!("invalid relay URL {relay:?}: expected https://host[:port]"))?;
    let secure = match scheme {
        "https" | "wss" => true,
        "http" | "ws" => false,
        other => {
            return Err(format!(
                "invalid relay URL scheme {other:?}: use https (or http on loopback)"
            ))
        }
    };
    let host = rest.split('/').next().unwrap_or("");
    let host_only = host
        .rsplit_once(':')
        .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
        .map(|(h, _)| h)
        .unwrap_or(host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let loopback = host_only == "localhost"
        || host_only
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !secure && !loopback {
        return Err(format!(
            "refusing plain {scheme}:// to {host_only}: tokens travel only over TLS except on loopback; use https://"
        ));
    }
    Ok(format!(
        "{}://{rest}{BRIDGE_PATH}",
        if secure { "wss" } else { "ws" }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_urls() {
        assert_eq!(
            bridge_url("https://relay.example").unwrap(),
            "wss://relay.example/v1/bridge"
        );
        assert_eq!(
            bridge_url("http://127.0.0.1:8080/").unwrap(),
            "ws://127.0.0.1:8080/v1/bridge"
        );
        assert_eq!(
            bridge_url("ws://[::1]:9").unwrap(),
            "ws://[::1]:9/v1/bridge"
        );
        assert!(bridge_url("http://relay.example")
            .unwrap_err()
            .contains("TLS"));
        assert!(bridge_url("ftp://x").is_err());
        assert!(bridge_url("relay.example").is_err());
    }
}
