//! The registry of connected daemon instances, and instance commands.
//!
//! Each bridge connection registers its instance here once the daemon's `Register` is
//! accepted, keyed by the token's user and the instance id (the dedup table's key, so
//! another user's daemon can never be reached through it), and removes it when the
//! connection ends: only if the entry is still its own, because a reconnect of the same
//! instance replaces it first. An entry holds what the daemon said about itself, when it
//! connected, its last heartbeat, and the sending side of its connection's command queue.
//!
//! [`Instances::command`] sends a command to one instance and waits for its answer: the
//! connection sends it as a `FromRelay::Command` and completes the reply on the matching
//! `ToRelay::CommandResult`, or fails it when the connection ends. REST lists instances
//! and sends commands through here.
//!
//! Architecture invariant: a user only ever sees and commands their own instances. Every
//! queue is bounded: the command queue of a connection, and its pending commands (a caller
//! that stopped waiting is forgotten at the next command).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use cloud_protocol::bridge::InstanceSnapshot;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

/// How many commands may wait for one connection; callers wait beyond that.
pub const COMMAND_QUEUE: usize = 64;

/// A connected instance, as `GET /v1/instances` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceInfo {
    /// The instance id the daemon registered (stable for its state directory).
    pub instance: String,
    /// The daemon's machine.
    pub hostname: String,
    /// The daemon's version.
    pub daemon_version: String,
    /// The daemon's bridge version.
    pub bridge_version: u32,
    /// Its registered worktrees (always empty for now).
    pub worktrees: Vec<String>,
    /// The sessions it followed when it registered.
    pub sessions: Vec<String>,
    /// When this connection registered (milliseconds since the Unix epoch).
    pub connected_at: u64,
    /// Its last `Heartbeat` on this connection (milliseconds since the Unix epoch); none
    /// before the first (daemons send one every 20 s).
    pub last_heartbeat_at: Option<u64>,
}

/// A command for one connection: its name and where its answer goes.
#[derive(Debug)]
pub struct InstanceCommand {
    /// The command's name (`ping`, `refresh`, ...).
    pub name: String,
    /// The daemon's answer, or why there is none.
    pub reply: CommandReply,
}

/// Where a command's answer goes.
pub type CommandReply = oneshot::Sender<Result<String, CommandError>>;

/// Why an instance command has no successful answer. The messages are shown to users as
/// they are.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The daemon answered with an error (its own message).
    #[error("{0}")]
    Failed(String),
    /// No such instance of this user is connected.
    #[error("no such instance connected: {0}")]
    NotConnected(String),
    /// The connection ended before the daemon answered.
    #[error("instance {0} disconnected before answering; the command may or may not have run")]
    Disconnected(String),
    /// The daemon did not answer in time.
    #[error("instance {instance} did not answer within {} s", timeout.as_secs())]
    Timeout {
        /// The instance.
        instance: String,
        /// How long it had.
        timeout: Duration,
    },
    /// The relay is shutting down.
    #[error("the relay is shutting down; retry shortly")]
    ShuttingDown,
}

/// A registered instance.
#[derive(Debug)]
struct Entry {
    /// The connection that registered it.
    connection: u64,
    /// What is shown.
    info: InstanceInfo,
    /// The connection's command queue.
    commands: mpsc::Sender<InstanceCommand>,
}

/// The connected instances of every user.
#[derive(Debug, Default)]
pub struct Instances {
    /// By (token user, instance id).
    entries: Mutex<BTreeMap<(String, String), Entry>>,
    /// The last connection id handed out.
    last_connection: AtomicU64,
}

impl Instances {
    /// How many instances are connected, of every user.
    pub fn count(&self) -> usize {
        self.entries.lock().expect("instances lock poisoned").len()
    }

    /// A new id for a bridge connection, never handed out before.
    pub fn connection_id(&self) -> u64 {
        self.last_connection.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Registers `snapshot` for `user`, served by `connection`, replacing any earlier
    /// connection of the same instance; returns whether one was replaced.
    pub fn register(
        &self,
        user: &str,
        snapshot: &InstanceSnapshot,
        connection: u64,
        commands: mpsc::Sender<InstanceCommand>,
        now: u64,
    ) -> bool {
        let info = InstanceInfo {
            instance: snapshot.instance_id.clone(),
            hostname: snapshot.hostname.clone(),
            daemon_version: snapshot.daemon_version.clone(),
            bridge_version: snapshot.bridge_version,
            worktrees: snapshot.worktrees.clone(),
            sessions: snapshot.sessions.clone(),
            connected_at: now,
            last_heartbeat_at: None,
        };
        let entry = Entry {
            connection,
            info,
            commands,
        };
        self.entries
            .lock()
            .unwrap()
            .insert((user.to_owned(), snapshot.instance_id.clone()), entry)
            .is_some()
    }

    /// Records a heartbeat of `connection`'s instance.
    pub fn heartbeat(&self, user: &str, instance: &str, connection: u64, now: u64) {
        let mut entries = self.entries.lock().unwrap();
        if let Some(entry) = entries.get_mut(&(user.to_owned(), instance.to_owned())) {
            if entry.connection == connection {
                entry.info.last_heartbeat_at = Some(now);
            }
        }
    }

    /// Removes the instance if `connection` still serves it; returns whether it did.
    pub fn unregister(&self, user: &str, instance: &str, connection: u64) -> bool {
        let mut entries = self.entries.lock().unwrap();
        let key = (user.to_owned(), instance.to_owned());
        if entries
            .get(&key)
            .is_some_and(|e| e.connection == connection)
        {
            entries.remove(&key);
            true
        } else {
            false
        }
    }

    /// The user's connected instances, by instance id.
    pub fn list(&self, user: &str) -> Vec<InstanceInfo> {
        self.entries
            .lock()
            .unwrap()
            .iter()
            .filter(|((owner, _), _)| owner == user)
            .map(|(_, entry)| entry.info.clone())
            .collect()
    }

    /// Sends command `name` to the user's instance and waits at most `timeout` for its
    /// answer.
    pub async fn command(
        &self,
        user: &str,
        instance: &str,
        name: String,
        timeout: Duration,
    ) -> Result<String, CommandError> {
        let commands = self
            .entries
            .lock()
            .unwrap()
            .get(&(user.to_owned(), instance.to_owned()))
            .map(|entry| entry.commands.clone())
            .ok_or_else(|| CommandError::NotConnected(instance.to_owned()))?;
        let (reply, answer) = oneshot::channel();
        let exchange = async {
            commands
                .send(InstanceCommand { name, reply })
                .await
                .map_err(|_| CommandError::NotConnected(instance.to_owned()))?;
            answer
                .await
                .unwrap_or_else(|_| Err(CommandError::Disconnected(instance.to_owned())))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(CommandError::Timeout {
                    instance: instance.to_owned(),
                    timeout,
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use cloud_protocol::bridge::BRIDGE_VERSION;

    use super::*;

    fn snapshot(instance: &str) -> InstanceSnapshot {
        InstanceSnapshot {
            instance_id: instance.to_owned(),
            hostname: "host".to_owned(),
            daemon_version: "1.2.3".to_owned(),
            bridge_version: BRIDGE_VERSION,
            worktrees: vec![],
            sessions: vec!["s-1".to_owned()],
        }
    }

    #[test]
    fn a_reconnect_replaces_and_only_the_owner_unregisters() {
        let instances = Instances::default();
        let (first, second) = (instances.connection_id(), instances.connection_id());
        assert_ne!(first, second);
        let (sender, _receiver) = mpsc::channel(1);
        assert!(!instances.register("ann", &snapshot("i-1"), first, sender.clone(), 10));
        assert!(instances.register("ann", &snapshot("i-1"), second, sender.clone(), 20));
        // The replaced connection ends: the entry is the new connection's and stays.
        assert!(!instances.unregister("ann", "i-1", first));
        instances.heartbeat("ann", "i-1", first, 25);
        instances.heartbeat("ann", "i-1", second, 30);
        let list = instances.list("ann");
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].instance, "i-1");
        assert_eq!(list[0].hostname, "host");
        assert_eq!(list[0].sessions, ["s-1"]);
        assert_eq!(list[0].connected_at, 20);
        assert_eq!(list[0].last_heartbeat_at, Some(30));
        assert!(instances.unregister("ann", "i-1", second));
        assert!(instances.list("ann").is_empty());
    }

    #[test]
    fn users_see_only_their_own_instances() {
        let instances = Instances::default();
        let (sender, _receiver) = mpsc::channel(1);
        instances.register("ann", &snapshot("i-1"), 1, sender.clone(), 0);
        instances.register("bob", &snapshot("i-1"), 2, sender.clone(), 0);
        instances.register("ann", &snapshot("i-2"), 3, sender, 0);
        let ann: Vec<String> = instances
            .list("ann")
            .into_iter()
            .map(|i| i.instance)
            .collect();
        assert_eq!(ann, ["i-1", "i-2"]);
        assert_eq!(instances.list("bob").len(), 1);
        assert!(instances.list("cat").is_empty());
        // Bob's entry is his alone: ann's unregistering cannot remove it.
        assert!(!instances.unregister("ann", "i-1", 2));
        assert_eq!(instances.list("bob").len(), 1);
    }

    #[tokio::test]
    async fn commands_are_answered_refused_or_time_out() {
        let instances = Instances::default();
        let timeout = Duration::from_millis(50);
        assert_eq!(
            instances
                .command("ann", "i-1", "ping".to_owned(), timeout)
                .await,
            Err(CommandError::NotConnected("i-1".to_owned()))
        );

        let (sender, mut receiver) = mpsc::channel(COMMAND_QUEUE);
        instances.register("ann", &snapshot("i-1"), 1, sender, 0);
        let connection = tokio::spawn(async move {
            // Answer the first, fail the second, drop the third unanswered, then end.
            let command = receiver.recv().await.unwrap();
            assert_eq!(command.name, "ping");
            let _ = command.reply.send(Ok("pong".to_owned()));
            let command = receiver.recv().await.unwrap();
            let _ = command
                .reply
                .send(Err(CommandError::Failed("unknown".to_owned())));
            let unanswered = receiver.recv().await.unwrap();
            let command = receiver.recv().await.unwrap();
            drop(command);
            drop(unanswered);
        });
        let long = Duration::from_secs(20);
        assert_eq!(
            instances
                .command("ann", "i-1", "ping".to_owned(), long)
                .await,
            Ok("pong".to_owned())
        );
        assert_eq!(
            instances.command("ann", "i-1", "x".to_owned(), long).await,
            Err(CommandError::Failed("unknown".to_owned()))
        );
        // Another user cannot reach it.
        assert_eq!(
            instances
                .command("bob", "i-1", "ping".to_owned(), long)
                .await,
            Err(CommandError::NotConnected("i-1".to_owned()))
        );
        assert!(matches!(
            instances
                .command("ann", "i-1", "slow".to_owned(), timeout)
                .await,
            Err(CommandError::Timeout { .. })
        ));
        assert_eq!(
            instances.command("ann", "i-1", "y".to_owned(), long).await,
            Err(CommandError::Disconnected("i-1".to_owned()))
        );
        connection.await.unwrap();
        // The connection is gone but still registered: sending fails at once.
        assert_eq!(
            instances.command("ann", "i-1", "z".to_owned(), long).await,
            Err(CommandError::NotConnected("i-1".to_owned()))
        );
    }
}
