//! What the IPC handlers and the bridge share: the relay connection's status, the stores
//! the bridge fills, the waiters for deliveries and relay replies, and the feeds that push
//! session activity to clients.
//!
//! Handlers never talk to the network: they write the journal, read the stores, and send
//! [`BridgeCommand`]s over a bounded channel; the bridge task does the rest.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloud_protocol::bridge::RelayRequest;
use cloud_protocol::ipc::{BridgeState, Notification, RelayMode, RelayStatus};
use cloud_protocol::session::Session;
use cloud_protocol::settings::{SettingRecord, SettingRefusal, SettingWrite};
use cloud_protocol::teleport::{TeleportReply, TeleportRequest};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::journal::Journal;
use crate::sessions::inbound::Inbound;
use crate::sessions::replica::Replica;
use crate::store::{Meta, Refusals};
use crate::teleport::transfer::BlobEndpoint;

/// How many refusal reasons are remembered for `Delivery` requests that come late.
const REMEMBERED_REFUSALS: usize = 1024;

/// How many idempotency keys of recent events are remembered (a repeat of an older one is
/// recognised by the relay, which keeps them longer).
const REMEMBERED_KEYS: usize = 65_536;

/// How many replica notifications a client may fall behind.
pub const SESSIONS_FEED_CAPACITY: usize = 1024;

/// How many session log notifications a client may fall behind.
pub const SESSION_FEED_CAPACITY: usize = 4096;

/// What handlers ask of the bridge.
#[derive(Debug)]
pub enum BridgeCommand {
    /// Follow a session (send a join if connected).
    Join {
        /// The session.
        session: String,
    },
    /// A session-management request, answered on `reply` (an error when unreachable).
    Request {
        /// The request.
        request: RelayRequest,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<Option<Session>, String>>,
    },
    /// Stop following a session (send a leave if connected).
    Leave {
        /// The session.
        session: String,
    },
    /// The credentials changed: reconnect now (also after a permanent refusal).
    Reconnect,
    /// A teleport request, answered on `reply` (an error when unreachable).
    Teleport {
        /// The request.
        request: TeleportRequest,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<TeleportReply, String>>,
    },
    /// A settings write, answered on `reply` (a refusal when unreachable).
    Settings {
        /// The write.
        write: SettingWrite,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<SettingRecord, SettingRefusal>>,
    },
}

/// How long a teleport request waits for the relay's answer (a commit of a large tree
/// takes a while to write).
pub const TELEPORT_DEADLINE: Duration = Duration::from_secs(120);

/// How long a teleport request waits for a bridge that is connecting.
pub const TELEPORT_CONNECT_WAIT: Duration = Duration::from_secs(10);

/// The outcome of a journaled event, as the relay reported it.
pub type Delivery = Result<(), String>;

/// Shared between handlers and the bridge.
#[derive(Debug)]
pub struct Link {
    /// The outbound journal.
    pub journal: Arc<Journal>,
    /// The followed sessions' logs.
    pub inbound: Inbound,
    /// The session replica.
    pub replica: Replica,
    /// The current org, the user's orgs, the settings copy.
    pub account: crate::account::Account,
    /// The relay connection, as status shows it.
    status: watch::Sender<RelayStatus>,
    /// Commands to the bridge.
    pub commands: mpsc::Sender<BridgeCommand>,
    /// Waiters for the relay's verdict on journaled events, by seq.
    waiters: Mutex<BTreeMap<u64, Vec<oneshot::Sender<Delivery>>>>,
    /// Recently refused events and why, by seq.
    refused: Mutex<BTreeMap<u64, String>>,
    /// The durable facts: whose events the journal holds, the refusal tally.
    pub meta: Meta,
    /// How many events were refused, and the latest reason (as `status` shows them).
    refusals: Mutex<Refusals>,
    /// Idempotency keys of recent events and their seqs, oldest first.
    keys: Mutex<(HashMap<String, u64>, VecDeque<String>)>,
    /// Session log entries as they arrive: (session, entry).
    pub session_feed: broadcast::Sender<Arc<Notification>>,
    /// Replica changes, relay status changes, refused events.
    pub sessions_feed: broadcast::Sender<Arc<Notification>>,
    /// How many reconnects (credential changes) the bridge has taken up: a status seen
    /// after it grows belongs to an attempt with the new credentials.
    epoch: std::sync::atomic::AtomicU64,
    /// Where the relay's blob socket is, while the bridge is connected.
    blob_endpoint: Mutex<Option<BlobEndpoint>>,
    /// The daemon's health figures (`cloudctl metrics`).
    pub metrics: crate::metrics::Metrics,
    /// The bridge's access tokens, for the requests that call the relay's HTTP API
    /// (device logins); set once the bridge is made.
    pub keeper: std::sync::OnceLock<Arc<crate::auth::Keeper>>,
    /// The sessions local clients are attached to, which the bridge reports to the relay.
    pub attachments: crate::sessions::attachments::Attachments,
}

/// The idempotency keys of the events the journal still holds, so a client that retries
/// after a crash gets the event it queued before, not a second one. (Keys of events
/// already acknowledged are the relay's to recognise.)
fn unacknowledged_keys(journal: &Journal) -> (HashMap<String, u64>, VecDeque<String>) {
    let mut keys = (HashMap::new(), VecDeque::new());
    let mut after = journal.acked();
    loop {
        let entries = match journal.read_after(after, 4096) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::error!("cannot read the journal's idempotency keys: {e}");
                break;
            }
        };
        let Some(&(last, _)) = entries.last() else {
            break;
        };
        for (seq, event) in entries {
            if let Some(key) = event.key() {
                keys.0.insert(key.to_owned(), seq);
                keys.1.push_back(key.to_owned());
            }
        }
        after = last;
    }
    while keys.1.len() > REMEMBERED_KEYS {
        if let Some(oldest) = keys.1.pop_front() {
            keys.0.remove(&oldest);
        }
    }
    keys
}

impl Link {
    /// A link in its initial state; returns the receiving end of the command channel for
    /// the bridge.
    pub fn new(
        journal: Arc<Journal>,
        inbound: Inbound,
        replica: Replica,
        (meta, account): (Meta, crate::account::Account),
        mode: RelayMode,
        url: String,
        instance_id: String,
    ) -> (Link, mpsc::Receiver<BridgeCommand>) {
        let (commands, commands_rx) = mpsc::channel(256);
        let keys = unacknowledged_keys(&journal);
        let refusals = meta.refusals().unwrap_or_else(|e| {
            tracing::error!("cannot read the refusal tally: {e}");
            Refusals::default()
        });
        let (status, _) = watch::channel(RelayStatus {
            mode,
            url,
            state: BridgeState::Connecting,
            reason: None,
            user: None,
            org: None,
            journal_depth: journal.depth(),
            instance_id,
            refused_events: refusals.count,
            last_refusal: refusals.latest.clone(),
        });
        let (session_feed, _) = broadcast::channel(SESSION_FEED_CAPACITY);
        let (sessions_feed, _) = broadcast::channel(SESSIONS_FEED_CAPACITY);
        (
            Link {
                journal,
                inbound,
                replica,
                account,
                status,
                commands,
                waiters: Mutex::new(BTreeMap::new()),
                refused: Mutex::new(BTreeMap::new()),
                meta,
                refusals: Mutex::new(refusals),
                keys: Mutex::new(keys),
                session_feed,
                sessions_feed,
                epoch: std::sync::atomic::AtomicU64::new(0),
                blob_endpoint: Mutex::new(None),
                metrics: crate::metrics::Metrics::default(),
                keeper: std::sync::OnceLock::new(),
                attachments: Default::default(),
            },
            commands_rx,
        )
    }

    /// Sets (connected) or clears (disconnected) where the relay's blob socket is.
    pub fn set_blob_endpoint(&self, endpoint: Option<BlobEndpoint>) {
        *self
            .blob_endpoint
            .lock()
            .expect("blob endpoint lock poisoned") = endpoint;
    }

    /// Where the relay's blob socket is, if the bridge is connected.
    pub fn blob_endpoint(&self) -> Option<BlobEndpoint> {
        self.blob_endpoint
            .lock()
            .expect("blob endpoint lock poisoned")
            .clone()
    }

    /// Asks the relay a teleport question through the bridge, waiting (bounded) for a
    /// bridge that is connecting.
    pub async fn teleport_request(
        &self,
        request: TeleportRequest,
    ) -> Result<TeleportReply, String> {
        let mut watch = self.watch_status();
        let _ = tokio::time::timeout(
            TELEPORT_CONNECT_WAIT,
            watch.wait_for(|s| matches!(s.state, BridgeState::Connected | BridgeState::Refused)),
        )
        .await;
        drop(watch);
        let status = self.status();
        if status.state != BridgeState::Connected {
            return Err(format!(
                "{} is not connected ({}); try again when `cloudctl status` shows it connected",
                status.describe(),
                status.reason.as_deref().unwrap_or("no reason given")
            ));
        }
        let (reply, answer) = oneshot::channel();
        self.commands
            .send_timeout(
                BridgeCommand::Teleport { request, reply },
                TELEPORT_CONNECT_WAIT,
            )
            .await
            .map_err(|_| "the bridge is too busy to take the request; try again".to_owned())?;
        match tokio::time::timeout(TELEPORT_DEADLINE, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err("the bridge dropped the request (the connection ended)".to_owned()),
            Err(_) => Err(format!(
                "the relay did not answer within {TELEPORT_DEADLINE:?}"
            )),
        }
    }

    /// The relay connection now.
    pub fn status(&self) -> RelayStatus {
        let mut status = self.status.borrow().clone();
        status.journal_depth = self.journal.depth();
        let refusals = self.refusals.lock().expect("refusals lock poisoned");
        status.refused_events = refusals.count;
        status.last_refusal.clone_from(&refusals.latest);
        status
    }

    /// The seq of the event queued with idempotency key `key`, or, when there is none, the
    /// seq `queue` gives a new one (remembered under the key). Check and insert happen
    /// under one lock, so two requests with one key queue one event. An event the journal
    /// refused does not count: a retry of its key queues it.
    pub fn queue_once<E>(
        &self,
        key: Option<&str>,
        queue: impl FnOnce() -> Result<u64, E>,
    ) -> Result<(u64, bool), E> {
        let Some(key) = key else {
            return queue().map(|seq| {
                self.metrics.queued(seq);
                (seq, true)
            });
        };
        let mut keys = self.keys.lock().expect("keys lock poisoned");
        // A repeat is the first event, unless the journal refused that one (a full disk):
        // then it was never queued, and the retry queues it.
        if let Some(&seq) = keys.0.get(key) {
            if self.journal.refusal(seq).is_none() {
                return Ok((seq, false));
            }
            keys.0.remove(key);
        }
        let seq = queue()?;
        self.metrics.queued(seq);
        keys.0.insert(key.to_owned(), seq);
        keys.1.push_back(key.to_owned());
        while keys.1.len() > REMEMBERED_KEYS {
            if let Some(oldest) = keys.1.pop_front() {
                keys.0.remove(&oldest);
            }
        }
        Ok((seq, true))
    }

    /// Counts a refusal the user has not been told about (`status` shows the tally), and
    /// tells `sessions` subscribers.
    pub fn report_refusal(&self, seq: u64, session: String, reason: String) {
        self.metrics.refused();
        {
            let mut refusals = self.refusals.lock().expect("refusals lock poisoned");
            refusals.count += 1;
            refusals.latest = Some(reason.clone());
            if let Err(e) = self.meta.set_refusals(&refusals) {
                tracing::error!("cannot store the refusal tally: {e}");
            }
        }
        let _ = self
            .sessions_feed
            .send(Arc::new(Notification::EventRefused {
                seq,
                session,
                reason,
            }));
    }

    /// Follows the relay connection's changes.
    pub fn watch_status(&self) -> watch::Receiver<RelayStatus> {
        self.status.subscribe()
    }

    /// Whether the replica is live (the bridge is connected).
    pub fn connected(&self) -> bool {
        self.status.borrow().state == BridgeState::Connected
    }

    /// Changes the status and tells `sessions` subscribers.
    pub fn set_status(&self, change: impl FnOnce(&mut RelayStatus)) {
        self.status.send_modify(change);
        let _ = self
            .sessions_feed
            .send(Arc::new(Notification::Relay(self.status())));
    }

    /// The bridge took up a reconnect: what follows is an attempt with fresh credentials.
    pub fn begin_epoch(&self) {
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// How many reconnects the bridge has taken up.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Waits for the relay's verdict on event `seq`, up to `deadline`. `None` on timeout.
    pub async fn delivery(&self, seq: u64, deadline: Duration) -> Option<Delivery> {
        let receiver = {
            let mut waiters = self.waiters.lock().expect("waiters lock poisoned");
            if let Some(reason) = self
                .refused
                .lock()
                .expect("refused lock poisoned")
                .get(&seq)
            {
                return Some(Err(reason.clone()));
            }
            if seq <= self.journal.acked() {
                return Some(Ok(()));
            }
            let (sender, receiver) = oneshot::channel();
            waiters.entry(seq).or_default().push(sender);
            receiver
        };
        match tokio::time::timeout(deadline, receiver).await {
            Ok(Ok(delivery)) => Some(delivery),
            _ => {
                // Gave up waiting: do not leave a dead waiter behind.
                let mut waiters = self.waiters.lock().expect("waiters lock poisoned");
                if let Some(senders) = waiters.get_mut(&seq) {
                    senders.retain(|sender| !sender.is_closed());
                    if senders.is_empty() {
                        waiters.remove(&seq);
                    }
                }
                None
            }
        }
    }

    /// The relay refused event `seq`: remember why and tell its waiters. Returns whether
    /// it is news (the relay re-reports its recent refusals at every registration).
    pub fn refuse(&self, seq: u64, reason: String) -> bool {
        let (waiters, news) = {
            let mut waiters = self.waiters.lock().expect("waiters lock poisoned");
            let mut refused = self.refused.lock().expect("refused lock poisoned");
            let news = refused.insert(seq, reason.clone()).is_none();
            while refused.len() > REMEMBERED_REFUSALS {
                refused.pop_first();
            }
            (waiters.remove(&seq).unwrap_or_default(), news)
        };
        for waiter in waiters {
            let _ = waiter.send(Err(reason.clone()));
        }
        news
    }

    /// The relay acknowledged everything up to `seq`: trim the journal and release the
    /// waiters of events it did not refuse.
    pub fn acknowledge(&self, seq: u64) {
        let acked = self.journal.acked();
        if seq <= acked {
            return;
        }
        let depth = self.journal.depth();
        let written = self.journal.last_written();
        if seq > written {
            // The relay holds more of this instance than its journal ever wrote (a state
            // directory restored from a backup, or a copied one): move the journal past it,
            // or new events would reuse seqs the relay skips as duplicates.
            tracing::warn!(relay_ack = seq, journal = written, "the relay acknowledged events this journal never wrote; skipping its sequence ahead");
            if let Err(e) = self.journal.skip_to(seq) {
                tracing::error!("cannot move the journal's sequence: {e}");
                return;
            }
        }
        if let Err(e) = self.journal.trim(seq) {
            tracing::error!("cannot trim the journal: {e}");
        }
        {
            // What left the journal, less what the relay refused, was delivered.
            let refused = self.refused.lock().expect("refused lock poisoned");
            let n_refused = refused.range(acked + 1..=seq).count() as u64;
            let n_delivered = depth
                .saturating_sub(self.journal.depth())
                .saturating_sub(n_refused);
            self.metrics
                .acknowledged(seq, n_delivered, |seq| refused.contains_key(&seq));
        }
        let delivered = {
            let mut waiters = self.waiters.lock().expect("waiters lock poisoned");
            let rest = waiters.split_off(&(seq + 1));
            std::mem::replace(&mut *waiters, rest)
        };
        for (_, senders) in delivered {
            for sender in senders {
                let _ = sender.send(Ok(()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloud_protocol::bridge::Outbound;

    #[tokio::test]
    async fn refused_events_are_never_reported_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::open(&dir.path().join("store")).unwrap();
        let journal = Journal::open(&dir.path().join("journal"), &db).unwrap();
        tokio::spawn(Arc::clone(&journal).run_flusher());
        for n in 0..10 {
            let event = Outbound::UserMessage {
                session: "s-1".into(),
                text: format!("{n}"),
                key: None,
            };
            journal.append(event).await.unwrap();
        }
        let (link, _commands) = Link::new(
            journal,
            Inbound::open(&db).unwrap(),
            Replica::open(&db).unwrap(),
            (
                Meta::open(&db).unwrap(),
                crate::account::Account::open(&db).unwrap(),
            ),
            RelayMode::Embedded,
            String::new(),
            "i-test".into(),
        );
        let link = Arc::new(link);
        let waiter = {
            let link = Arc::clone(&link);
            tokio::spawn(async move { link.delivery(7, Duration::from_secs(5)).await })
        };
        tokio::task::yield_now().await;
        // What the bridge does for: refusal 5, refusal 7, ack 10.
        link.refuse(5, "viewers cannot send".into());
        link.acknowledge(4);
        link.refuse(7, "viewers cannot send".into());
        link.acknowledge(6);
        link.acknowledge(10);
        assert_eq!(
            waiter.await.unwrap(),
            Some(Err("viewers cannot send".into()))
        );
        assert_eq!(link.delivery(8, Duration::ZERO).await, Some(Ok(())));
        assert_eq!(link.journal.depth(), 0);
    }

    #[tokio::test]
    async fn an_ack_beyond_the_journal_moves_its_sequence_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::open(&dir.path().join("store")).unwrap();
        let journal = Journal::open(&dir.path().join("journal"), &db).unwrap();
        tokio::spawn(Arc::clone(&journal).run_flusher());
        let (link, _commands) = Link::new(
            Arc::clone(&journal),
            Inbound::open(&db).unwrap(),
            Replica::open(&db).unwrap(),
            (
                Meta::open(&db).unwrap(),
                crate::account::Account::open(&db).unwrap(),
            ),
            RelayMode::Embedded,
            String::new(),
            "i-test".into(),
        );
        link.acknowledge(500);
        let event = Outbound::Interrupt {
            session: "s-1".into(),
            key: None,
        };
        assert_eq!(journal.append(event).await.unwrap(), 501);
        assert_eq!(journal.read_after(500, 10).unwrap().len(), 1);
    }
}
