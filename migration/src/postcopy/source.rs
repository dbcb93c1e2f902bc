//! Postcopy, source side: the switch (sent map masked with the dirty bitmap gives the discard
//! list), the device state as one package, then background push with page requests served first.

use std::io::{Read, Write};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::outgoing::{send_state, MigrationError, PageSender};
use crate::progress::StatusCell;
use crate::stream::{Section, StreamReader};
use crate::transport::ACK_TIMEOUT;
use crate::{DirtyBitmap, MigratableVm, RamRegion, PAGE_SIZE};

use super::{ranges, DiscardRecord, PageRefusal, PageRequest};

/// A background push batch ends after this many pages or this long, or as soon as a page
/// request arrives.
const PUSH_BATCH_PAGES: usize = 16;
const PUSH_BATCH_TIME: Duration = Duration::from_millis(1);

/// What the return path brings during postcopy.
enum Incoming {
    Request(u64),
    Complete(serde_json::Value),
    Broken(String),
}

fn region_page(regions: &[RamRegion], gpa: u64) -> Option<(usize, usize)> {
    regions
        .iter()
        .position(|r| gpa >= r.gpa && gpa < r.gpa + r.len)
        .map(|i| (i, ((gpa - regions[i].gpa) / PAGE_SIZE as u64) as usize))
}

/// Switches to postcopy. `sent` says which pages the destination has (full after a precopy
/// pass, empty for pure postcopy); `pending` holds the pages dirtied since they were sent.
#[allow(clippy::too_many_arguments)]
pub(crate) fn switch<W: Write>(
    vm: &dyn MigratableVm,
    mut tx: PageSender<W>,
    regions: &[RamRegion],
    sent: Vec<DirtyBitmap>,
    mut pending: Vec<DirtyBitmap>,
    mut rx: StreamReader<Box<dyn Read + Send>>,
    status: &StatusCell,
    start: Instant,
    paused: &mut bool,
) -> Result<(), MigrationError> {
    let paused_at_unix_ns = crate::progress::unix_ns();
    vm.pause()?;
    *paused = true;
    // From here the destination owns the guest; this copy must stay whole for the push.
    vm.inhibit_discards(true);
    for (p, d) in pending.iter_mut().zip(vm.fetch_dirty()?) {
        p.merge(&d);
    }
    vm.stop_dirty_log()?;
    // Sent, then dirtied again: those are the destination's stale pages; never-sent pages are
    // missing there too.
    let mut missing = Vec::new();
    for (s, d) in sent.iter().zip(&pending) {
        let mut discard = s.clone();
        discard.intersect(d);
        let mut never_sent = s.clone();
        never_sent.invert();
        discard.merge(&never_sent);
        missing.push(discard);
    }
    tx.w.record(
        Section::Discard,
        &DiscardRecord {
            ranges: ranges(regions, &missing),
        },
    )?;
    send_state(&mut tx.w, &vm.save_state()?)?;
    tx.w.record(Section::Run, &crate::state::EndRecord { paused_at_unix_ns })?;
    tx.w.flush()?;
    let missing_total: usize = missing.iter().map(|m| m.count()).sum();
    status.update(|s| {
        s.phase = "postcopy".into();
        s.remaining_bytes = (missing_total * PAGE_SIZE) as u64;
    });
    let broken = |e: String| MigrationError::PostcopyBroken(e);
    let (events_tx, events) = mpsc::channel();
    std::thread::Builder::new()
        .name("return-path".into())
        .spawn(move || {
            crate::thread_started("return-path");
            loop {
                let ev = match rx.read_section() {
                    Ok(f) if f.kind == Section::PageRequest => match f.decode::<PageRequest>() {
                        Ok(r) => Incoming::Request(r.gpa),
                        Err(e) => Incoming::Broken(e.to_string()),
                    },
                    Ok(f) if f.kind == Section::Complete => {
                        Incoming::Complete(f.decode().unwrap_or(serde_json::Value::Null))
                    }
                    Ok(f) => Incoming::Broken(format!("unexpected {} section", f.kind.name())),
                    Err(e) => Incoming::Broken(e.to_string()),
                };
                let last = !matches!(ev, Incoming::Request(_));
                if events_tx.send(ev).is_err() || last {
                    return;
                }
            }
        })
        .map_err(|e| broken(format!("starting the return-path thread: {e}")))?;

    let (mut requested, mut pushed, mut left) = (0u64, 0u64, missing_total);
    let mut cursor = (0usize, 0usize);
    let mut complete = None;
    // An event that arrived during a push batch (it ends the batch early).
    let mut early: Option<Incoming> = None;
    while left > 0 {
        // Requests first: the guest is waiting for those.
        while let Some(ev) = early.take().or_else(|| events.try_recv().ok()) {
            match ev {
                Incoming::Request(gpa) => match region_page(regions, gpa) {
                    Some((ri, p)) if missing[ri].get(p) => {
                        tx.send_one(vm, gpa).map_err(|e| broken(e.to_string()))?;
                        tx.flush_batch().map_err(|e| broken(e.to_string()))?;
                        tx.w.flush().map_err(|e| broken(e.to_string()))?;
                        missing[ri].unset(p);
                        left -= 1;
                        requested += 1;
                        // Continue the background scan near what the guest needs.
                        cursor = (ri, p + 1);
                    }
                    Some(_) => {}
                    None => {
                        // An error reply, not a crash: the destination decides what to do.
                        log::error!("postcopy: page request for {gpa:#x} is outside guest RAM");
                        let refusal = PageRefusal {
                            gpa,
                            reason: "outside guest RAM".into(),
                        };
                        tx.w.record(Section::PageRefused, &refusal)
                            .and_then(|_| tx.w.flush())
                            .map_err(|e| broken(e.to_string()))?;
                    }
                },
                Incoming::Complete(v) => complete = Some(v),
                Incoming::Broken(e) => return Err(broken(e)),
            }
        }
        // Then a batch of the background push, from the cursor on; bounded in time too, so a
        // source whose own pages are slow to read (lazy, swapped) still answers requests soon.
        let mut n = 0;
        let batch_start = Instant::now();
        while n < PUSH_BATCH_PAGES && left > 0 && batch_start.elapsed() < PUSH_BATCH_TIME {
            if let Ok(ev) = events.try_recv() {
                early = Some(ev);
                break;
            }
            let (ri, from) = cursor;
            let Some(p) = missing[ri].next_set_from(from) else {
                cursor = ((ri + 1) % regions.len(), 0);
                continue;
            };
            let gpa = regions[ri].gpa + (p * PAGE_SIZE) as u64;
            tx.send_one(vm, gpa).map_err(|e| broken(e.to_string()))?;
            missing[ri].unset(p);
            cursor = (ri, p + 1);
            left -= 1;
            pushed += 1;
            n += 1;
        }
        tx.flush_batch().map_err(|e| broken(e.to_string()))?;
        tx.w.flush().map_err(|e| broken(e.to_string()))?;
        status.update(|s| {
            s.bytes = tx.w.bytes;
            s.remaining_bytes = (left * PAGE_SIZE) as u64;
            s.total_ms = start.elapsed().as_secs_f64() * 1e3;
        });
    }
    tx.w.record(Section::End, &crate::state::EndRecord::default())
        .and_then(|_| tx.w.flush())
        .map_err(|e| broken(e.to_string()))?;
    let deadline = Instant::now() + ACK_TIMEOUT;
    while complete.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok(Incoming::Complete(v)) => complete = Some(v),
            Ok(Incoming::Request(_)) => {}
            Ok(Incoming::Broken(e)) => return Err(broken(e)),
            Err(_) => return Err(broken("no completion from the destination".into())),
        }
    }
    let total = start.elapsed().as_secs_f64();
    status.update(|s| {
        tx.record_completion(s, total);
        s.phase = "END".into();
        let mut figures = complete.unwrap_or(serde_json::Value::Null);
        // Pause here to resume there: only the destination knows when it resumed.
        s.downtime_ms = figures["downtime_ms"].as_f64().unwrap_or(f64::NAN);
        figures["source_pages_requested"] = requested.into();
        figures["source_pages_pushed"] = pushed.into();
        s.postcopy = Some(figures);
    });
    Ok(())
}
