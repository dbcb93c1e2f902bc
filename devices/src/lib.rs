//! Device models for tern. Nothing in this crate knows about KVM: devices see port offsets and bytes,
//! raise interrupts through [`IrqLine`], and ask the VMM to stop through [`ExitRequest`].

pub mod bus;
pub mod irq;
pub mod legacy;

pub use bus::{BusError, PioBus, PioDevice};
pub use irq::{ExitRequest, IrqLine, VmExitReason};
