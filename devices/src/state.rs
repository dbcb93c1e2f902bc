//! Device migration state: a device whose state must move with the guest saves it as a serde
//! record of its own (defined next to the device) and restores from one. The VMM lists such
//! devices by name; it never looks inside their records.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A device with migration state.
pub trait Stateful {
    /// The device's record, as it crosses in a migration stream or snapshot.
    type State: Serialize + DeserializeOwned;
    /// Captures the state (the VM is paused).
    fn save(&self) -> Self::State;
    /// Replaces the state with a saved one; the device's host side (backends, interrupts) stays.
    /// A record this device cannot take is refused whole, leaving the device as it was.
    fn restore(&mut self, state: &Self::State) -> Result<(), RestoreError>;
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Transport(#[from] crate::virtio::mmio::TransportError),
}
