//! The KSM stress test (after KVM-autotest's KSM test): guests running the built-in `ksm`
//! suite, driven over COM2 sockets through the seed's phases while the host measures merging.
//!
//! - [`plan`]: options and guest sizing from host memory and the overcommit ratio.
//! - [`sysfs`]: ksmd's settings (saved, set, restored on every exit path) and counters.
//! - [`host`]: /proc readings (MemAvailable, per-process merged pages) and the stop signal.
//! - [`guest`]: one tern running the allocator, and its line protocol.
//! - [`phases`]: the phases, the memory guard, the report.

pub mod guest;
pub mod host;
pub mod phases;
pub mod plan;
pub mod report;
pub mod sysfs;

use std::path::PathBuf;

/// Everything that ends a KSM run early.
#[derive(Debug, thiserror::Error)]
pub enum KsmError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: unexpected content `{content}`")]
    Parse { path: PathBuf, content: String },
    #[error("KSM is not available on this host ({0} missing; needs CONFIG_KSM)")]
    NoKsm(PathBuf),
    #[error("guest {guest}: {reason}")]
    Guest { guest: usize, reason: String },
    #[error("host memory guard: {0}")]
    HostMemory(String),
    #[error("stopped by {0}")]
    Interrupted(&'static str),
    #[error("starting tern: {0}")]
    Spawn(std::io::Error),
    #[error("{0}")]
    Plan(#[from] plan::PlanError),
    #[error("setting up: {0}")]
    Setup(String),
}

impl KsmError {
    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| KsmError::Io { what, path, source }
    }
}
