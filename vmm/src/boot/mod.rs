//! Getting a guest ready to run: kernel loading, boot parameters, MP table and the boot vCPU state.

mod bss;
pub mod loader;
pub mod mptable;
pub mod multiboot;
pub mod params;
pub mod regs;

pub use loader::{is_multiboot, load_guest, BootError, EntryState};
