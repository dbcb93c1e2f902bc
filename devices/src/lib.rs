//! Device models for tern. Nothing in this crate knows about KVM: devices see port offsets and bytes,
//! raise interrupts through [`IrqLine`], and ask the VMM to stop through [`ExitRequest`].

pub mod bus;
pub mod irq;
pub mod legacy;
pub mod state;
pub mod virtio;

pub use bus::{BusError, MmioBus, MmioDevice, PioBus, PioDevice};
pub use irq::{ExitRequest, IrqLine, VmExitReason};
pub use state::{RestoreError, Stateful};
