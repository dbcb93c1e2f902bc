//! Postcopy recovery, source side: after a broken postcopy (state postcopy-paused), reconnect to
//! a destination that listens again, learn which pages it still lacks, push them.

use std::time::Instant;

use crate::error::MigrationError;
use crate::outgoing::PageSender;
use crate::peer::PeerReader;
use crate::progress::{MigrationState, Phase, StatusCell};
use crate::stream::{RamBatch, Section, StreamError, StreamReader, StreamWriter};
use crate::transport::{self, Endpoint, ACK_TIMEOUT};
use crate::{DirtyBitmap, MigratableVm, RamRegion, PAGE_SIZE};

/// Postcopy recovery, source side: reconnects to a destination that listens again
/// (`migrate-recover`), learns which pages it still lacks, and pushes them (requests first).
/// Any failure leaves this side paused and recoverable again.
pub fn recover(
    vm: &dyn MigratableVm,
    endpoint: &Endpoint,
    status: &StatusCell,
) -> Result<(), MigrationError> {
    let start = Instant::now();
    status.update(|s| {
        s.state = MigrationState::PostcopyRecover;
        s.endpoint = endpoint.to_string();
        s.error = None;
    });
    let result = (|| {
        let mut channel =
            transport::connect(endpoint).map_err(|source| MigrationError::Connect {
                endpoint: endpoint.to_string(),
                source,
            })?;
        let (Some(writer), Some(reader)) = (channel.writer.take(), channel.reader.take()) else {
            return Err(MigrationError::Rejected(
                "recovery needs a connection with a return path (unix: or tcp:)".into(),
            ));
        };
        let mut tx = PageSender::new(
            StreamWriter::new(writer),
            RamBatch::default(),
            vec![0u8; PAGE_SIZE],
        );
        tx.w.header()?;
        tx.w.record(Section::Recover, &vm.config())?;
        tx.w.flush()?;
        let rx = PeerReader::start(StreamReader::new(reader))
            .map_err(|e| MigrationError::NoAnswer(format!("starting the return path: {e}")))?;
        let regions = vm.ram_regions();
        let mut missing: Vec<DirtyBitmap> = regions
            .iter()
            .map(|r| DirtyBitmap::new(r.pages()))
            .collect();
        let mut requests = Vec::new();
        loop {
            let f = rx
                .next(ACK_TIMEOUT)
                .map_err(|e| MigrationError::NoAnswer(e.to_string()))?;
            match f.kind {
                Section::Missing => {
                    let runs: crate::postcopy::DiscardRecord = f.decode()?;
                    for (gpa, n) in runs.ranges {
                        mark_run(&regions, &mut missing, gpa, n)?;
                    }
                }
                Section::PageRequest => {
                    requests.push(f.decode::<crate::postcopy::PageRequest>()?.gpa);
                }
                Section::Recover => break,
                Section::Abort => {
                    return Err(MigrationError::Rejected(
                        f.decode::<String>().unwrap_or_else(|e| e.to_string()),
                    ))
                }
                other => {
                    return Err(MigrationError::NoAnswer(format!(
                        "unexpected {} section during recovery",
                        other.name()
                    )))
                }
            }
        }
        let left: usize = missing.iter().map(|m| m.count()).sum();
        log::info!(
            "postcopy recovery: the destination lacks {left} pages, {} requests outstanding",
            requests.len()
        );
        status.update(|s| {
            s.phase = Phase::Postcopy;
            s.remaining_bytes = (left * PAGE_SIZE) as u64;
            s.recovered_pages = left as u64;
        });
        crate::postcopy::source::push(
            vm,
            tx,
            &regions,
            missing,
            rx,
            None,
            status,
            start,
            requests,
            None,
            // One connection: the push of a recovery uses the main stream.
            Vec::new(),
        )
    })();
    if let Err(e) = &result {
        // Whatever broke, the destination runs the guest: stay paused and recoverable.
        status.update(|s| {
            s.state = MigrationState::PostcopyPaused;
            s.error = Some(format!("postcopy recovery failed: {e}"));
        });
    }
    result
}

/// Marks a run of pages the destination lacks, refusing one outside guest RAM.
fn mark_run(
    regions: &[RamRegion],
    maps: &mut [DirtyBitmap],
    gpa: u64,
    n: u64,
) -> Result<(), MigrationError> {
    let bad = || {
        MigrationError::Stream(StreamError::Decode {
            section: Section::Missing.name(),
            msg: format!("run {gpa:#x}+{n} pages is not inside guest RAM"),
        })
    };
    let len = n.checked_mul(PAGE_SIZE as u64).ok_or_else(bad)?;
    let end = gpa.checked_add(len).ok_or_else(bad)?;
    let (ri, r) = regions
        .iter()
        .enumerate()
        .find(|(_, r)| gpa >= r.gpa && end <= r.gpa + r.len && gpa.is_multiple_of(PAGE_SIZE as u64))
        .ok_or_else(bad)?;
    let first = ((gpa - r.gpa) / PAGE_SIZE as u64) as usize;
    for p in first..first + n as usize {
        maps[ri].set(p);
    }
    Ok(())
}
