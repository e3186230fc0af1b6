//! Logging: `tracing-subscriber` with a reloadable filter, written to stderr in the
//! foreground or to `cloudd.log` in the state directory when detached, and fed to the
//! clients subscribed to the `log` topic.
//!
//! The filter comes from `CLOUDD_LOG`, else the config file's `log`, else `info`; SIGHUP
//! re-applies the config file's value unless `CLOUDD_LOG` is set. Nothing secret is ever
//! passed to a log macro, so the feed needs no redaction.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use cloud_protocol::ipc::{LogRecord, Notification};
use tokio::sync::broadcast;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

/// The environment variable that overrides the log filter.
pub const LOG_ENV: &str = "CLOUDD_LOG";

/// How many log records a `log` subscriber may fall behind before it is cut off.
pub const LOG_FEED_CAPACITY: usize = 4096;

/// The installed logging, kept by the daemon to change the filter and reach the feed.
#[derive(Debug)]
pub struct Logging {
    /// Swaps the filter on reload.
    reload: reload::Handle<EnvFilter, Registry>,
    /// Log records for `log` subscribers.
    pub feed: broadcast::Sender<Arc<Notification>>,
    /// The filter in effect, as text.
    filter: String,
    /// The log file, when detached.
    pub log_file: Option<PathBuf>,
}

/// Logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// The filter text is not valid.
    #[error("invalid log filter {filter:?}: {message}")]
    Filter {
        /// The filter text.
        filter: String,
        /// What the parser said.
        message: String,
    },
    /// The log file could not be opened.
    #[error("cannot open log file {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A global subscriber is already installed.
    #[error("logging is already initialised")]
    AlreadyInitialised,
}

/// Which filter applies: `CLOUDD_LOG`, else the config's, else `info`.
fn choose_filter(config_filter: Option<&str>) -> String {
    std::env::var(LOG_ENV)
        .ok()
        .filter(|v| !v.is_empty())
        .or_else(|| config_filter.map(str::to_owned))
        .unwrap_or_else(|| "info".into())
}

fn parse_filter(filter: &str) -> Result<EnvFilter, LoggingError> {
    EnvFilter::try_new(filter).map_err(|e| LoggingError::Filter {
        filter: filter.to_owned(),
        message: e.to_string(),
    })
}

impl Logging {
    /// Installs the global subscriber. `log_file` is where a detached daemon writes.
    pub fn init(
        log_file: Option<&Path>,
        config_filter: Option<&str>,
    ) -> Result<Logging, LoggingError> {
        let filter = choose_filter(config_filter);
        let (filter_layer, reload) = reload::Layer::new(parse_filter(&filter)?);
        let (writer, ansi) = match log_file {
            Some(path) => {
                let mut options = OpenOptions::new();
                options.create(true).append(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                let file = options.open(path).map_err(|source| LoggingError::File {
                    path: path.to_owned(),
                    source,
                })?;
                (BoxMakeWriter::new(std::sync::Mutex::new(file)), false)
            }
            None => (
                BoxMakeWriter::new(std::io::stderr),
                std::io::IsTerminal::is_terminal(&std::io::stderr()),
            ),
        };
        let (feed, _) = broadcast::channel(LOG_FEED_CAPACITY);
        tracing_subscriber::registry()
            .with(filter_layer)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(writer)
                    .with_ansi(ansi),
            )
            .with(FeedLayer { feed: feed.clone() })
            .try_init()
            .map_err(|_| LoggingError::AlreadyInitialised)?;
        Ok(Logging {
            reload,
            feed,
            filter,
            log_file: log_file.map(Path::to_owned),
        })
    }

    /// Re-applies the filter after the config file changed. Returns the filter in effect.
    pub fn reload(&mut self, config_filter: Option<&str>) -> Result<&str, LoggingError> {
        let filter = choose_filter(config_filter);
        if filter != self.filter {
            let parsed = parse_filter(&filter)?;
            self.reload
                .reload(parsed)
                .map_err(|e| LoggingError::Filter {
                    filter: filter.clone(),
                    message: e.to_string(),
                })?;
            self.filter = filter;
        }
        Ok(&self.filter)
    }

    /// The filter in effect.
    pub fn filter(&self) -> &str {
        &self.filter
    }
}

/// Sends every record that passes the filter to the `log` subscribers, when there are any.
struct FeedLayer {
    feed: broadcast::Sender<Arc<Notification>>,
}

impl<S: Subscriber> Layer<S> for FeedLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if self.feed.receiver_count() == 0 {
            return;
        }
        let mut visitor = MessageVisitor(String::new());
        event.record(&mut visitor);
        let metadata = event.metadata();
        let record = LogRecord {
            unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            level: metadata.level().to_string(),
            target: metadata.target().to_owned(),
            message: visitor.0,
        };
        // A send only fails when the last subscriber left meanwhile: nothing to do.
        let _ = self.feed.send(Arc::new(Notification::Log(record)));
    }
}

/// Renders the message first, then the other fields as `name=value`.
struct MessageVisitor(String);

impl Visit for MessageVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let fields = std::mem::take(&mut self.0);
            let _ = write!(self.0, "{value:?}");
            if !fields.is_empty() {
                self.0.push(' ');
                self.0.push_str(fields.trim_start());
            }
        } else {
            let _ = write!(self.0, " {}={:?}", field.name(), value);
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            let _ = write!(self.0, " {}={}", field.name(), value);
        }
    }
}
