//! Postcopy over the RAM channels, destination side: after the switch each channel's connection
//! passes from its precopy receiver (which wrote straight into guest memory) to a thread of its
//! own that places the pages the source pushes with userfaultfd: a RAM run (contiguous full
//! pages) is received into a staging buffer, its checksum verified, then placed with one
//! UFFDIO_COPY; zero pages go in runs with UFFDIO_ZEROPAGE. Pages a request's answer placed
//! first are skipped (EEXIST), through the same per-page state as every other placement.
//!
//! Each channel ends its share with an End section. A channel that breaks before it is a broken
//! postcopy, like a broken main connection: the listener pauses the guest (postcopy-paused) and a
//! recovery fetches what is still missing over its one new connection.

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::placer::Placer;
use crate::error::MigrationError;
use crate::pass::RUN_HEAD;
use crate::stream::{parse_ram, PageRecord, Section, StreamError, StreamReader};
use crate::PAGE_SIZE;

type ChannelReader = StreamReader<Box<dyn Read + Send>>;

#[derive(Default)]
struct Shared {
    /// Per channel: None while it reads, then how it ended (Ok: its End section came).
    ended: Mutex<Vec<Option<Result<(), String>>>>,
    /// Time the channels spent receiving runs into their staging buffers (summed).
    receive_ns: AtomicU64,
}

/// The threads placing pushed pages from the RAM channels.
pub struct ChannelPlacers {
    shared: Arc<Shared>,
}

impl ChannelPlacers {
    /// Starts one placing thread per channel connection.
    pub(crate) fn start(
        readers: Vec<ChannelReader>,
        placer: &Placer,
    ) -> Result<ChannelPlacers, MigrationError> {
        let shared = Arc::new(Shared {
            ended: Mutex::new(vec![None; readers.len()]),
            receive_ns: AtomicU64::new(0),
        });
        for (i, r) in readers.into_iter().enumerate() {
            let (sh, placer) = (shared.clone(), placer.clone());
            std::thread::Builder::new()
                .name(format!("postcopy-channel-{i}"))
                .spawn(move || {
                    crate::thread_started("postcopy-channel");
                    let outcome = place_pushed(r, &placer, &sh).map_err(|e| e.to_string());
                    if let Err(e) = &outcome {
                        log::error!("postcopy: RAM channel {i}: {e}");
                    }
                    sh.ended.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(outcome);
                })
                .map_err(|source| MigrationError::Spawn {
                    what: "postcopy channel reader",
                    source,
                })?;
        }
        Ok(ChannelPlacers { shared })
    }

    /// Why a channel broke before the end of its share, if one did.
    pub fn broken(&self) -> Option<String> {
        let ended = self.shared.ended.lock().unwrap_or_else(|e| e.into_inner());
        ended.iter().enumerate().find_map(|(i, e)| match e {
            Some(Err(why)) => Some(format!("RAM channel {i} broke during the push: {why}")),
            _ => None,
        })
    }

    /// How many channels place pushed pages.
    pub fn count(&self) -> usize {
        self.shared
            .ended
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Time spent receiving runs into the staging buffers, summed over the channels (ns).
    pub fn receive_ns(&self) -> u64 {
        self.shared.receive_ns.load(Ordering::Relaxed)
    }
}

/// One channel's pushed pages, placed until its End section.
fn place_pushed(
    mut r: ChannelReader,
    placer: &Placer,
    shared: &Shared,
) -> Result<(), MigrationError> {
    // Reused: a fresh buffer would cost a page fault per page.
    let mut staging: Vec<u8> = Vec::new();
    let mut run_len = 0usize;
    loop {
        let mut receive = |src: &mut dyn Read, len: usize, crc: &mut crc32fast::Hasher| {
            let t0 = Instant::now();
            if staging.len() < len {
                staging.resize(len, 0);
            }
            src.read_exact(&mut staging[..len])
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::UnexpectedEof => {
                        StreamError::Truncated("RAM run section".into())
                    }
                    _ => StreamError::Read {
                        section: "RAM run section".into(),
                        source: e,
                    },
                })?;
            crc.update(&staging[..len]);
            run_len = len;
            shared
                .receive_ns
                .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
            Ok(())
        };
        // The run is placed only once its checksum is verified: the guest runs meanwhile.
        let frame = match r.read_section_placing(&mut receive) {
            Ok(None) => {
                place_run(placer, &staging[..run_len])?;
                continue;
            }
            Ok(Some(f)) => f,
            Err(StreamError::Truncated(what)) => {
                return Err(StreamError::Truncated(format!(
                    "{what}: the connection ended before its share of the push"
                ))
                .into())
            }
            Err(e) => return Err(e.into()),
        };
        match frame.kind {
            Section::Ram => place_batch(placer, &frame.payload)?,
            Section::Heartbeat => {}
            Section::End => return Ok(()),
            other => {
                return Err(StreamError::Unexpected {
                    got: other.name(),
                    expected: "postcopy RAM on a channel",
                }
                .into())
            }
        }
        r.recycle(frame.payload);
    }
}

/// Places a RAM run's payload (gpa u64 LE, count u32 LE, the pages).
pub(crate) fn place_run(placer: &Placer, payload: &[u8]) -> Result<(), StreamError> {
    let bad = |msg: String| StreamError::Decode {
        section: Section::RamRun.name(),
        msg,
    };
    let (head, data) = payload
        .split_at_checked(RUN_HEAD)
        .ok_or_else(|| bad("a RAM run shorter than its header".into()))?;
    let gpa = u64::from_le_bytes(head[..8].try_into().unwrap_or([0; 8]));
    let pages = u32::from_le_bytes(head[8..].try_into().unwrap_or([0; 4])) as usize;
    if pages.checked_mul(PAGE_SIZE) != Some(data.len()) {
        return Err(bad(format!(
            "{pages} pages do not fill a {}-byte run",
            data.len()
        )));
    }
    placer.place_run(gpa, pages, Some(data))?;
    Ok(())
}

/// Places a RAM batch: consecutive zero pages as one run each, full pages one by one.
pub(crate) fn place_batch(placer: &Placer, payload: &[u8]) -> Result<(), StreamError> {
    // A run of zero pages not placed yet: (first gpa, pages).
    let mut zeros: Option<(u64, usize)> = None;
    for rec in parse_ram(payload) {
        match rec? {
            PageRecord::Zero(gpa) => match &mut zeros {
                Some((start, n)) if *start + (*n * PAGE_SIZE) as u64 == gpa => *n += 1,
                _ => {
                    if let Some((start, n)) = zeros.replace((gpa, 1)) {
                        placer.place_run(start, n, None)?;
                    }
                }
            },
            PageRecord::Full(gpa, data) => {
                if let Some((start, n)) = zeros.take() {
                    placer.place_run(start, n, None)?;
                }
                placer.place(gpa, Some(data))?;
            }
        }
    }
    if let Some((start, n)) = zeros {
        placer.place_run(start, n, None)?;
    }
    Ok(())
}
