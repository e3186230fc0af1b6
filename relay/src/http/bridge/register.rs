//! The `Register` handshake: the first message of a connection must be `Register` (within
//! [`REGISTER_TIMEOUT`]), from a daemon whose bridge version this relay speaks. It is
//! answered with `Registered` carrying the instance's current ack (the core's), so the
//! daemon can trim its journal before sending anything, then the instance's stored
//! refusals (each as `EventRefused`) and a plain `Ack`.
//!
//! A refusal is reported before any envelope whose ack covers it is read: `Registered`'s
//! ack is held below the stored refusals, and the `Ack` after them carries the rest. So a
//! refusal lost with an earlier connection is never reported as delivered.
//!
//! Once registered, the connection is in the instance registry ([`crate::instances`])
//! under (token user, instance id), replacing an earlier connection of the same instance.

use std::time::{Duration, Instant};

use axum::extract::ws::WebSocket;
use cloud_protocol::bridge::{FromRelay, ToRelay, BRIDGE_VERSION};

use super::{Connection, End};
use crate::core::Command;

/// How long a new connection may take to register.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);

impl Connection {
    /// Waits for `Register`, checks it, and answers `Registered`, then the instance's stored
    /// refusals (each as `EventRefused`) and an `Ack` if it has any.
    pub(super) async fn register(&mut self, socket: &mut WebSocket) -> Result<(), End> {
        let envelope = loop {
            let message = tokio::select! {
                _ = self.cancel.cancelled() => return Err(End::Shutdown),
                message = tokio::time::timeout(REGISTER_TIMEOUT, socket.recv()) => match message {
                    Ok(message) => message,
                    Err(_) => return Err(End::Refused("no registration".to_owned())),
                },
            };
            self.last_seen = Instant::now();
            if let Some(envelope) = self.decode(socket, message).await? {
                break envelope;
            }
        };
        let ToRelay::Register(snapshot) = envelope.body else {
            return Err(self
                .refuse(
                    socket,
                    "the first bridge message must be Register".to_owned(),
                    false,
                )
                .await);
        };
        if snapshot.bridge_version < BRIDGE_VERSION {
            return Err(self
                .refuse(
                    socket,
                    format!(
                        "bridge version {} is too old: this relay needs {BRIDGE_VERSION}; upgrade cloudd",
                        snapshot.bridge_version
                    ),
                    true,
                )
                .await);
        }
        tracing::info!(
            user = %self.identity.user,
            instance = %snapshot.instance_id,
            hostname = %snapshot.hostname,
            daemon_version = %snapshot.daemon_version,
            "bridge registered"
        );
        // The instance's current ack, so the daemon can trim its journal before sending
        // anything, and its stored refusals, which an earlier connection may have lost.
        // The daemon chooses its instance id; scoping the dedup key by the token's user
        // keeps another user's daemon from ever colliding with (or poisoning) it.
        let dedup_key = format!("{}/{}", self.identity.user, snapshot.instance_id);
        let instance = dedup_key.clone();
        let registration = self
            .shared
            .call(|reply| Command::Register { instance, reply })
            .await
            .map_err(|e| End::Refused(e.to_string()))?;
        self.ack = registration.ack;
        self.instance = Some(dedup_key);
        if let Some(commands) = self.commands_sender.take() {
            let replaced = self.shared.instances.register(
                &self.identity.user,
                &snapshot,
                self.connection,
                commands,
                crate::now_millis(),
            );
            if replaced {
                tracing::info!(
                    user = %self.identity.user,
                    instance = %snapshot.instance_id,
                    "the instance reconnected: this connection replaces its earlier one"
                );
            }
        }
        self.hostname = snapshot.hostname.clone();
        self.instance_id = Some(snapshot.instance_id);
        // The daemon releases every event up to `Registered`'s ack as delivered, so it
        // must stay below the stored refusals until they have been reported; the `Ack`
        // after them carries the rest. Refusals the daemon knew already are harmless.
        let registered_ack = match registration.refusals.first() {
            Some(&(first, _)) => self.ack.min(first.saturating_sub(1)),
            None => self.ack,
        };
        self.send_acked(
            socket,
            registered_ack,
            FromRelay::Registered {
                user: self.identity.user.clone(),
                org: self.identity.org.clone(),
                relay_version: crate::VERSION.to_owned(),
            },
        )
        .await?;
        if registration.refusals.is_empty() {
            return Ok(());
        }
        for (seq, reason) in registration.refusals {
            self.send(socket, FromRelay::EventRefused { seq, reason })
                .await?;
        }
        self.send(socket, FromRelay::Ack).await
    }
}
