//! The closed set of events that move the daemon's lifecycle, consumed in one place: the
//! core loop in [`crate::daemon::run`]. Producers (the signal task, connections) only send
//! them; this module does nothing but name them.

/// Everything that moves the daemon's state.
#[derive(Debug)]
pub enum CoreEvent {
    /// A signal arrived.
    Signal(Signal),
    /// A client asked the daemon to shut down.
    ShutdownRequested {
        /// Who asked, for the log.
        by: String,
    },
}

/// A signal the daemon reacts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Drain and exit 0.
    Terminate,
    /// Drain and exit 0 (Ctrl-C in the foreground).
    Interrupt,
    /// Reload the configuration file.
    Hangup,
}
