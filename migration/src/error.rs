//! The migration's error, on both sides: what went wrong and (on the source, `end_state`) who
//! owns the guest afterwards.

use thiserror::Error;

use crate::progress::MigrationState;
use crate::stream::StreamError;
use crate::VmSideError;

#[derive(Debug, Error)]
pub enum MigrationError {
    #[error("cannot reach {endpoint}: {source}")]
    Connect {
        endpoint: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("VM: {0}")]
    Vm(#[from] VmSideError),
    #[error("the destination refused the migration: {0}")]
    Rejected(String),
    /// Source: the destination fell silent or cannot be reached on a connection it needs.
    #[error("no answer from the destination: {0}")]
    NoAnswer(String),
    /// Destination: the source fell silent, or a connection of its never came.
    #[error("no answer from the source: {0}")]
    NoSource(String),
    /// A thread this side needs could not start.
    #[error("cannot start the {what}: {source}")]
    Spawn {
        what: &'static str,
        source: std::io::Error,
    },
    /// Source: postcopy broke after the switch; this side keeps every page.
    #[error("postcopy failed after the switch: {0}; the guest stays paused here with all its memory (state postcopy-paused)")]
    PostcopyBroken(String),
    /// Destination: postcopy broke after the switch. Pages are still missing here; the caller
    /// says how many.
    #[error("{0}")]
    PostcopyCut(String),
    #[error("the destination did not confirm it resumed the guest: {0}; it may be running there, so this copy stays paused (state postmigrate)")]
    Unconfirmed(String),
    #[error("the migration was cancelled (migrate-cancel on the source)")]
    Cancelled,
    #[error("local migration refused: {0}")]
    LocalRefused(String),
    /// Destination: channels still owe a pass but deliver nothing (heartbeats keep them alive).
    #[error("RAM channel(s) {channels:?} delivered nothing of pass {pass} for {secs:.1} s")]
    ChannelStalled {
        channels: Vec<usize>,
        pass: u32,
        secs: f64,
    },
    #[error("cannot pick a migration id: {0}")]
    Identity(std::io::Error),
    #[error("RAM channel {index}: {source}")]
    Channel {
        index: usize,
        source: Box<MigrationError>,
    },
}

impl MigrationError {
    /// The state a failure leaves the source in: whether the destination may own the guest.
    pub(crate) fn end_state(&self) -> MigrationState {
        match self {
            MigrationError::PostcopyBroken(_) => MigrationState::PostcopyPaused,
            MigrationError::Unconfirmed(_) => MigrationState::Postmigrate,
            MigrationError::Cancelled => MigrationState::Cancelled,
            _ => MigrationState::Failed,
        }
    }
}
