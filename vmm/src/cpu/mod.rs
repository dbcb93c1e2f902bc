//! vCPUs: CPUID and MSR policy, LAPIC setup, and the run loop each vCPU thread executes.

pub mod cpuid;
pub mod lapic;
pub mod msrs;
pub mod vcpu;

pub use cpuid::PvFeatures;
pub use vcpu::{Vcpu, VcpuContext};
