//! The agents that run in sessions' workspaces: [`process`] starts, feeds, reads and stops
//! an agent process for the core; [`shell`] is the built-in agent, a program of its own
//! (`cloud-relay shell-agent`, `cloudd shell-agent`) that the relay runs like any other.
//!
//! Nothing here touches the store or decides a session's status: agents report, the core
//! decides.

pub mod process;
pub mod shell;
