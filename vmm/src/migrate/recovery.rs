//! Postcopy recovery (after QEMU's postcopy-paused / postcopy-recover): when the connection breaks
//! after the switch both sides pause; `migrate-recover URI` makes the destination listen anew
//! (`migration::destination::recover`) and `migrate URI --resume` reconnects the source (here),
//! which then sends the pages still missing.

use std::sync::Arc;

use devices::VmExitReason;
use migration::destination::recover::{claim_paused, RecoveryError};
use migration::error::MigrationError;
use migration::lifecycle::Command;
use migration::progress::summary;
use migration::transport::Endpoint;

use super::flows::OnDone;
use crate::vm::VmInner;

/// Source: reconnects a paused postcopy to `endpoint` and finishes it, in the background; its
/// push keeps to `bandwidth` (`--postcopy-bandwidth`) as the first one did.
pub fn reconnect(
    vm: &Arc<VmInner>,
    endpoint: Endpoint,
    bandwidth: Option<u64>,
    on_done: OnDone,
) -> Result<(), RecoveryError> {
    claim_paused(&vm.migration, Command::MigrateResume)?;
    let vm = vm.clone();
    std::thread::Builder::new()
        .name("migration".into())
        .spawn(move || {
            crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Migration);
            let result = migration::postcopy::recover::recover(&*vm, &endpoint, &vm.migration, bandwidth);
            let status = vm.migration.get();
            match result {
                Ok(()) => {
                    eprintln!("tern: {}", summary(&status));
                    on_done(&status);
                    vm.exit.request(VmExitReason::HostRequest(format!(
                        "guest migrated to {endpoint} (postcopy recovered)"
                    )));
                }
                Err(e) => {
                    let e: MigrationError = e;
                    eprintln!(
                        "tern: error: postcopy recovery to {endpoint} failed, the guest stays paused here (postcopy-paused, retry with migrate --resume): {e}"
                    );
                    on_done(&status);
                }
            }
        })
        .map(|_| ())
        .map_err(RecoveryError::Thread)
}
