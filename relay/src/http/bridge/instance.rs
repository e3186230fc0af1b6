//! This connection in the instance registry ([`crate::instances`]), once registered:
//! heartbeats are recorded there, and instance commands from it are sent to the daemon,
//! each as a `Command` with an id of this connection's (counting from 1), and completed by
//! the daemon's `CommandResult`. When the connection ends it leaves the registry (unless
//! a reconnect of the same instance replaced it there first) and fails every command it
//! was given and did not answer.
//!
//! Every queue is bounded: the registry's queue of commands for this connection, and the
//! commands awaiting an answer (a caller that stopped waiting is forgotten at the next
//! command).

use axum::extract::ws::WebSocket;
use cloud_protocol::bridge::FromRelay;

use super::{Connection, End};
use crate::instances::{CommandError, InstanceCommand};

impl Connection {
    /// Records a heartbeat of the registered instance.
    pub(super) fn heartbeat(&self) {
        if let Some(instance) = &self.instance_id {
            self.shared.instances.heartbeat(
                &self.identity.user,
                instance,
                self.connection,
                crate::now_millis(),
            );
        }
    }

    /// Queues an instance command for the daemon; its `CommandResult` completes `reply`.
    pub(super) async fn command(
        &mut self,
        socket: &mut WebSocket,
        InstanceCommand { name, reply }: InstanceCommand,
    ) -> Result<(), End> {
        // Forget the callers that stopped waiting, so a daemon that never answers costs
        // only the commands still awaited.
        self.pending.retain(|_, reply| !reply.is_closed());
        self.last_command += 1;
        let id = self.last_command;
        tracing::debug!(
            user = %self.identity.user,
            instance = self.instance_id.as_deref().unwrap_or("-"),
            id,
            name = %name,
            "instance command"
        );
        self.pending.insert(id, reply);
        self.send(socket, FromRelay::Command { id, name }).await
    }

    /// Completes the command the daemon answered.
    pub(super) fn command_result(&mut self, id: u64, result: Result<String, String>) {
        tracing::debug!(id, ok = result.is_ok(), "instance command answered");
        // A caller that stopped waiting (timed out) has nobody to tell.
        if let Some(reply) = self.pending.remove(&id) {
            let _ = reply.send(result.map_err(CommandError::Failed));
        }
    }

    /// Leaves the instance registry (unless a reconnect replaced this connection there
    /// already) and fails every command this connection was given and did not answer.
    pub(super) fn end_commands(&mut self, end: &End) {
        let Some(instance) = &self.instance_id else {
            return;
        };
        self.shared
            .instances
            .unregister(&self.identity.user, instance, self.connection);
        let error = match end {
            End::Shutdown => CommandError::ShuttingDown,
            End::Closed | End::Refused(_) => CommandError::Disconnected(instance.clone()),
        };
        self.commands.close();
        for (_, reply) in self.pending.drain() {
            let _ = reply.send(Err(error.clone()));
        }
        while let Ok(command) = self.commands.try_recv() {
            let _ = command.reply.send(Err(error.clone()));
        }
    }
}
