//! tern's fuzz targets as plain functions: `libfuzzer/` (cargo-fuzz, coverage-guided) calls them
//! with generated inputs, and `tests/corpus.rs` replays every file under `corpus/<target>/`
//! through them in the ordinary `cargo test` run. A target returns normally for any input; a
//! panic, a hang or unbounded memory is a bug in tern (or in the target's own checks).
//!
//! Structured targets turn the input into well-framed stream sections (the checksums are the
//! harness's job, or the fuzzer would never get past them) so the fuzzing reaches what reads
//! the sections.

pub mod api;
pub mod balloon;
pub mod bytes;
pub mod decoder;
pub mod incoming;
pub mod postcopy;
pub mod seeds;
pub mod snapshot;
pub mod stream;

/// The migration tests' `MigratableVm` without KVM, shared rather than copied.
#[allow(dead_code)]
#[path = "../../migration/tests/common/fake_vm.rs"]
mod fake_vm;

/// A target's body: any input, no panic.
pub type Target = fn(&[u8]);

/// Every target by the name its corpus directory and its cargo-fuzz binary carry.
pub const TARGETS: &[(&str, Target)] = &[
    ("stream", stream::run),
    ("incoming", incoming::run),
    ("postcopy", postcopy::run),
    ("snapshot", snapshot::run),
    ("balloon", balloon::run),
    ("decoder", decoder::run),
    ("api", api::run),
];
