//! The postcopy preempt channel (after QEMU's postcopy-preempt): requested pages travel on a
//! second connection, so they never queue behind the background push in the main stream (in the
//! socket buffers and the destination's read-ahead).
//!
//! ADVISE carries `{"preempt": true}` both ways when both sides want it; the source then connects
//! to the same endpoint again and opens the channel with a header and a Preempt section. If the
//! channel cannot be made (or breaks), requested pages go on the main stream as before.

use std::io::{Read, Write};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::placer::Placer;
use crate::identity::refuse_foreign;
use crate::outgoing::PageSender;
use crate::peer::peer_timeout;
use crate::stream::{parse_ram, PageRecord, RamBatch, Section, StreamReader, StreamWriter};
use crate::transport::{self, Endpoint, Listening};
use crate::{MigrationId, PAGE_SIZE};

/// The ADVISE section's payload (an empty payload, from an older peer, means no preempt).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdviseRecord {
    #[serde(default)]
    pub preempt: bool,
}

impl AdviseRecord {
    pub fn decode(payload: &[u8]) -> AdviseRecord {
        if payload.is_empty() {
            return AdviseRecord::default();
        }
        serde_json::from_slice(payload).unwrap_or_default()
    }
}

/// Destination: accepts migration `id`'s preempt connection on `listening` and places the pages
/// it brings, in a thread of its own, until the source closes it. A connection of another
/// migration is refused (told why, logged) and the wait goes on.
pub fn serve(listening: Listening, placer: Placer, id: MigrationId) {
    let spawned = std::thread::Builder::new()
        .name("postcopy-preempt".into())
        .spawn(move || {
            crate::thread_started("postcopy-preempt");
            let r = accept_own(&listening, id);
            // The endpoint is not needed any more (a Unix socket's path goes now).
            drop(listening);
            let Some(mut r) = r else {
                log::warn!(
                    "postcopy: no preempt channel came; requested pages use the main stream"
                );
                return;
            };
            if let Err(e) = r.read_section().and_then(|f| f.expect(Section::Preempt)) {
                log::warn!("postcopy: bad preempt channel: {e}");
                return;
            }
            loop {
                let frame = match r.read_section() {
                    Ok(f) => f,
                    // The source closes it at the end; a break shows on the main stream too.
                    Err(e) => {
                        log::debug!("postcopy: preempt channel ended: {e}");
                        return;
                    }
                };
                match frame.kind {
                    Section::Ram => {
                        for rec in parse_ram(&frame.payload) {
                            let placed = match rec {
                                Ok(PageRecord::Full(gpa, data)) => placer.place(gpa, Some(data)),
                                Ok(PageRecord::Zero(gpa)) => placer.place(gpa, None),
                                Err(e) => Err(e),
                            };
                            if let Err(e) = placed {
                                log::error!("postcopy: preempt channel: {e}");
                                return;
                            }
                        }
                    }
                    Section::Heartbeat => {}
                    other => {
                        log::error!(
                            "postcopy: unexpected {} on the preempt channel",
                            other.name()
                        );
                        return;
                    }
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("postcopy: cannot start the preempt reader: {e}");
    }
}

/// The first connection of migration `id` within the peer timeout, its header read; others are
/// refused on the way.
fn accept_own(
    listening: &Listening,
    id: MigrationId,
) -> Option<StreamReader<Box<dyn Read + Send>>> {
    let deadline = Instant::now() + peer_timeout();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut c = listening.accept_within(left).ok()?;
        let mut r = StreamReader::new(c.reader.take()?);
        match r.header() {
            Ok(got) if got == id => return Some(r),
            Ok(got) => refuse_foreign(c.writer.take(), "postcopy preempt channel", id, got),
            Err(e) => log::warn!("postcopy: bad preempt channel: {e}"),
        }
    }
}

/// Source: opens migration `id`'s preempt channel to `endpoint`; None (and a warning) if it
/// cannot.
pub(crate) fn open(
    endpoint: &Endpoint,
    id: MigrationId,
) -> Option<PageSender<Box<dyn Write + Send>>> {
    let opened = (|| {
        let mut channel = transport::connect(endpoint).map_err(|e| e.to_string())?;
        let w = channel.writer.take().ok_or("no writer")?;
        let mut w = StreamWriter::new(w);
        w.header(id)
            .and_then(|_| w.section(Section::Preempt, &[]))
            .and_then(|_| w.flush())
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(PageSender::new(
            w,
            RamBatch::default(),
            vec![0u8; PAGE_SIZE],
        ))
    })();
    match opened {
        Ok(p) => Some(p),
        Err(e) => {
            log::warn!("postcopy: no preempt channel ({e}); requested pages use the main stream");
            None
        }
    }
}
