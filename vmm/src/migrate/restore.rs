//! Restoring a snapshot file (`--incoming file:PATH`): `eager` reads every stored page into RAM
//! before the guest runs; `lazy` registers RAM with userfaultfd and serves each page from the
//! file on first touch while a background pass places the rest (Firecracker's UFFD restore, Cloud
//! Hypervisor's ondemand). Pages are checked against the snapshot's index either way; a bad one
//! stops the guest with a clear error, never maps garbage.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use devices::VmExitReason;
use migration::progress::MigrationState;
use migration::snapshot::Snapshot;
use migration::{MigratableVm, PAGE_SIZE};

use super::flows::IncomingError;
use crate::builder::build_for_incoming;
use crate::lazy::{self, FaultObserver, LazyOptions, PageSource};
use crate::machine::HostOptions;
use crate::vm::Vm;

/// How `--incoming file:` brings RAM back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum RestoreMode {
    /// Read every stored page before the guest runs.
    #[default]
    Eager,
    /// Run at once; pages come from the file on first touch and in the background.
    Lazy,
}

/// Pages from an opened snapshot, checked; each stored page after `delay` (slow storage).
struct SnapshotSource(Arc<Snapshot>, std::time::Duration);

impl PageSource for SnapshotSource {
    fn fetch(&mut self, gpa: u64, page: &mut [u8]) -> std::io::Result<bool> {
        let stored = self.0.read_page(gpa, page).map_err(std::io::Error::other)?;
        if stored && !self.1.is_zero() {
            std::thread::sleep(self.1);
        }
        Ok(stored)
    }
}

pub fn restore(path: &Path, opts: &HostOptions, start: Instant) -> Result<Vm, IncomingError> {
    let t0 = Instant::now();
    let mut snap = Snapshot::open(path)?;
    let state = snap
        .state
        .take()
        .ok_or_else(|| IncomingError::Restore(migration::VmSideError("no state".into())))?;
    let vm = build_for_incoming(&snap.config, opts, None, start)?;
    let snap = Arc::new(snap);
    let stored = snap.stored_pages();
    match opts.restore {
        RestoreMode::Eager => {
            // Populate runs of stored pages in bulk first: far cheaper here than a fault a page.
            let mut run: Option<(u64, u64)> = None;
            for gpa in snap.stored().chain(std::iter::once(u64::MAX)) {
                match run {
                    Some((start, end)) if end == gpa => run = Some((start, end + PAGE_SIZE as u64)),
                    _ => {
                        if let Some((start, end)) = run {
                            vm.inner.prepare_ram(start, end - start);
                        }
                        run = Some((gpa, gpa.saturating_add(PAGE_SIZE as u64)));
                    }
                }
            }
            let mut page = vec![0u8; PAGE_SIZE];
            for gpa in snap.stored() {
                snap.read_page(gpa, &mut page)
                    .map_err(|e| migration::VmSideError(e.to_string()))?;
                vm.inner.write_ram(gpa, &page)?;
            }
        }
        RestoreMode::Lazy => {
            let exit = vm.inner.exit.clone();
            let options = LazyOptions {
                prefault: snap.stored().collect(),
                on_fatal: Some(Box::new(move |why| {
                    exit.request(VmExitReason::Crash(format!("snapshot restore: {why}")))
                })),
            };
            let observer = vm.inner.apf.clone().map(|a| a as Arc<dyn FaultObserver>);
            let source = Box::new(SnapshotSource(snap.clone(), opts.restore_delay));
            let lazy = lazy::start(&vm.inner.mem, source, observer, options)
                .map_err(crate::vm::VmError::from)?;
            *devices::bus::lock(&vm.inner.restore_lazy) = Some(lazy);
        }
    }
    vm.inner.restore_state(state)?;
    vm.inner.resume()?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    vm.inner.migration.update(|s| {
        s.state = MigrationState::Completed;
        s.role = migration::progress::Role::Destination;
        s.endpoint = format!("file:{}", path.display());
        s.pages_full = stored as u64;
        s.total_ms = ms;
    });
    eprintln!(
        "tern: restored {} ({:?}): {stored} pages stored, guest running after {ms:.1} ms",
        path.display(),
        opts.restore
    );
    Ok(vm)
}
