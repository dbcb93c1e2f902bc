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
/// The background push keeps to `bandwidth` (bytes/s, `--postcopy-bandwidth`) as the first one
/// did. Any failure leaves this side paused and recoverable again.
pub fn recover(
    vm: &dyn MigratableVm,
    endpoint: &Endpoint,
    status: &StatusCell,
    bandwidth: Option<u64>,
) -> Result<(), MigrationError> {
    let start = Instant::now();
    let id = status.get().migration_id;
    status.update(|s| {
        s.state = MigrationState::PostcopyRecover;
        s.endpoint = endpoint.to_string();
        s.error = None;
    });
    let result = (|| {
        let id = id.ok_or_else(|| {
            MigrationError::Rejected("this side has no migration id to recover".into())
        })?;
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
        tx.w.header(id)?;
        tx.w.record(Section::Recover, &vm.config())?;
        tx.w.flush()?;
        let rx = PeerReader::start(StreamReader::new(reader))
            .map_err(|e| MigrationError::NoAnswer(format!("starting the return path: {e}")))?;
        let regions = vm.ram_regions();
        let (missing, requests) = read_missing(&rx, &regions)?;
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
            bandwidth,
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

/// What the destination says it lacks, up to its Recover marker: bitmaps of missing pages and
/// the page requests outstanding. Bounded by guest RAM: runs, pages and requests beyond its
/// page count are refused (a peer could otherwise keep the source busy for as long as it likes).
fn read_missing(
    rx: &PeerReader,
    regions: &[RamRegion],
) -> Result<(Vec<DirtyBitmap>, Vec<u64>), MigrationError> {
    let mut missing: Vec<DirtyBitmap> = regions
        .iter()
        .map(|r| DirtyBitmap::new(r.pages()))
        .collect();
    let ram_pages = regions
        .iter()
        .try_fold(0u64, |t, r| t.checked_add(r.pages() as u64))
        .ok_or_else(|| too_much("guest RAM's page count overflows"))?;
    let (mut runs, mut pages) = (0u64, 0u64);
    let mut requests = Vec::new();
    loop {
        let f = rx
            .next(ACK_TIMEOUT)
            .map_err(|e| MigrationError::NoAnswer(e.to_string()))?;
        match f.kind {
            Section::Missing => {
                let record: crate::postcopy::DiscardRecord = f.decode()?;
                // An empty section would be free to send forever: each must name a run.
                if record.ranges.is_empty() {
                    return Err(too_much("a missing-pages section names no run"));
                }
                for (gpa, n) in record.ranges {
                    runs += 1;
                    pages = pages
                        .checked_add(n)
                        .filter(|&p| p <= ram_pages && runs <= ram_pages)
                        .ok_or_else(|| {
                            too_much("the destination claims more missing pages than guest RAM has")
                        })?;
                    mark_run(regions, &mut missing, gpa, n)?;
                }
            }
            Section::PageRequest => {
                if requests.len() as u64 >= ram_pages {
                    return Err(too_much("more page requests than guest RAM has pages"));
                }
                requests.push(f.decode::<crate::postcopy::PageRequest>()?.gpa);
            }
            Section::Recover => return Ok((missing, requests)),
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
}

fn too_much(msg: &str) -> MigrationError {
    MigrationError::Stream(StreamError::Decode {
        section: Section::Missing.name(),
        msg: msg.to_string(),
    })
}

/// Marks a run of pages the destination lacks (a word at a time), refusing one outside guest
/// RAM or empty.
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
    if n == 0 {
        return Err(bad());
    }
    let len = n.checked_mul(PAGE_SIZE as u64).ok_or_else(bad)?;
    let end = gpa.checked_add(len).ok_or_else(bad)?;
    let (ri, r) = regions
        .iter()
        .enumerate()
        .find(|(_, r)| {
            gpa >= r.gpa
                && r.gpa.checked_add(r.len).is_some_and(|e| end <= e)
                && gpa.is_multiple_of(PAGE_SIZE as u64)
        })
        .ok_or_else(bad)?;
    let first = usize::try_from((gpa - r.gpa) / PAGE_SIZE as u64).map_err(|_| bad())?;
    let count = usize::try_from(n).map_err(|_| bad())?;
    maps[ri].set_range(first, count);
    Ok(())
}
