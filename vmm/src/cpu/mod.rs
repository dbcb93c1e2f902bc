//! vCPUs: CPUID and MSR policy, LAPIC setup, the run loop each vCPU thread executes and the
//! controller's handle on it.

pub mod cpuid;
pub mod handle;
pub mod lapic;
pub mod msrs;
pub mod records;
pub mod state;
pub mod vcpu;

pub use cpuid::PvFeatures;
pub use handle::VcpuHandle;
pub use vcpu::{Vcpu, VcpuContext};
