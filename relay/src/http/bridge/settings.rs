//! Settings on a daemon's connection: the settings of its user and of the org it acts in,
//! sent after registering and again whenever they change (only when they differ from what
//! was sent last), and the daemon's writes (`ToRelay::Settings`), answered with
//! `SettingsReply`. The write itself (checks, versions, the file) is [`crate::settings`]'s.

use std::sync::Arc;

use axum::extract::ws::WebSocket;
use cloud_protocol::bridge::FromRelay;
use cloud_protocol::settings::{SettingRefusal, SettingWrite};

use super::{Connection, End};
use crate::access::Scope;
use crate::settings::Writer;

impl Connection {
    /// Sends the daemon its settings, if they changed since they were last sent.
    pub(super) async fn send_settings(&mut self, socket: &mut WebSocket) -> Result<(), End> {
        let snapshot = self
            .shared
            .settings
            .snapshot(&self.identity.user, &self.identity.org);
        if self.last_settings.as_ref() == Some(&snapshot) {
            return Ok(());
        }
        self.last_settings = Some(snapshot.clone());
        self.send(socket, FromRelay::Settings(snapshot)).await
    }

    /// Carries out a daemon's write and answers it.
    pub(super) async fn write_setting(
        &mut self,
        socket: &mut WebSocket,
        id: u64,
        write: SettingWrite,
    ) -> Result<(), End> {
        self.flush(socket).await?;
        let shared = Arc::clone(&self.shared);
        let identity = self.identity.clone();
        // It writes the settings file: off the async threads.
        let result = tokio::task::spawn_blocking(move || {
            shared.auth.refresh_files();
            let writer = Writer {
                user: &identity.user,
                org: &identity.org,
                role: shared.auth.role(&identity),
                operator: identity.may(Scope::Admin),
            };
            shared.settings.write(writer, write)
        })
        .await
        .unwrap_or_else(|_| {
            Err(SettingRefusal {
                reason: "the relay could not store the setting; try again".into(),
                current: None,
            })
        });
        self.send(socket, FromRelay::SettingsReply { id, result })
            .await
    }
}
