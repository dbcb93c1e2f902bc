//! RAM channels (`migrate unix:PATH,channels=N` / `tcp:HOST:PORT,channels=N`): precopy passes
//! are split over N extra connections to the same endpoint, each with a sender thread on the
//! source and a receiver thread on the destination; the main connection keeps the control
//! protocol (sections, pass boundaries, the switch, postcopy).
//!
//! Source: after the configuration (before ADVISE: the preempt connection must come after the
//! channels) it sends a Channels section `{count}` on the main stream, then connects `count`
//! times; each connection starts with a stream header and a Channel section `{index}`. Every pass ends on each channel with a PassDone marker, and then on
//! the main stream with the same marker, where the destination waits until every channel
//! delivered that pass. Before the end section the source closes them; at the postcopy switch
//! each carries a Run marker and then the channel's share of the background push
//! (`postcopy::channel_place`, `postcopy::channel_push`).

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::Scope;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::MigrationError;
use crate::outgoing::PageSender;
use crate::pass::RUN_HEAD;
use crate::peer::peer_timeout;
use crate::stream::StreamWriter;
use crate::stream::{RamBatch, Section, StreamError, StreamReader};
use crate::transport::{self, Endpoint, Listening};
use crate::{MigratableVm, MigrationId, PAGE_SIZE};

/// A pass still owed that delivers nothing for this many peer timeouts fails the migration.
pub const STALL_PEER_TIMEOUTS: u32 = 2;

/// Most channels a migration may open (and a destination accepts).
pub const MAX_CHANNELS: usize = 16;

/// The default when `channels=` is not given: one per host CPU, at most 4.
pub fn default_channels() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
}

/// The Channels section's payload (main stream).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ChannelsRecord {
    pub count: u32,
}

/// The Channel section's payload: the first section of a channel connection.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ChannelHello {
    pub index: u32,
}

pub(crate) type ChannelSender = PageSender<Box<dyn Write + Send>>;

/// Source: announces `count` channels on the main stream and opens them.
pub(crate) fn open<W: Write>(
    main: &mut StreamWriter<W>,
    endpoint: &Endpoint,
    count: usize,
    id: MigrationId,
) -> Result<Vec<ChannelSender>, MigrationError> {
    main.record(
        Section::Channels,
        &ChannelsRecord {
            count: count as u32,
        },
    )?;
    main.flush()?;
    (0..count)
        .map(|index| {
            let mut c = transport::connect(endpoint).map_err(|source| MigrationError::Connect {
                endpoint: format!("{endpoint} (RAM channel {index})"),
                source,
            })?;
            let w = c
                .writer
                .take()
                .ok_or_else(|| MigrationError::NoAnswer("channel cannot be written".into()))?;
            let mut w = StreamWriter::new(w);
            w.header(id)?;
            w.record(
                Section::Channel,
                &ChannelHello {
                    index: index as u32,
                },
            )?;
            w.flush()?;
            let mut tx = PageSender::new(w, RamBatch::default(), vec![0u8; PAGE_SIZE]);
            tx.run = Some(Default::default());
            Ok(tx)
        })
        .collect()
}

#[derive(Default)]
struct State {
    /// The last pass each channel delivered completely.
    done: Vec<Option<u32>>,
    /// Why a channel stopped reading (None while it reads).
    ended: Vec<Option<String>>,
    full: u64,
    zero: u64,
    bytes: u64,
    placing: Placing,
    /// Connections handed over at the postcopy switch (their Run marker came).
    handed: Vec<Option<ChannelReader>>,
}

type ChannelReader = StreamReader<Box<dyn Read + Send>>;

/// Where a channel receiver's time went while it placed RAM runs straight into guest memory.
#[derive(Debug, Default, Clone, Copy)]
pub struct Placing {
    pub pages: u64,
    /// Populating the run's pages in bulk (MADV_POPULATE_WRITE) before the data comes.
    pub populate_ns: u64,
    /// Reading the data from the socket into guest memory.
    pub receive_ns: u64,
    /// Checksumming it where it landed.
    pub checksum_ns: u64,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Destination: the receiver threads of a migration's channels.
pub(crate) struct Receivers {
    shared: Arc<Shared>,
}

/// Destination: accepts the `count` channels of migration `id` the source announced on
/// `listening` and starts a receiver thread for each in `scope` (they end when the source closes
/// their connection, or soon after [`Receivers::stop`]). A connection of another migration is
/// refused (told why, logged) and the wait goes on.
pub(crate) fn accept<'scope>(
    scope: &'scope Scope<'scope, '_>,
    listening: &Listening,
    count: usize,
    vm: &'scope dyn MigratableVm,
    id: MigrationId,
) -> Result<Receivers, MigrationError> {
    if count == 0 || count > MAX_CHANNELS {
        return Err(StreamError::Refused {
            section: Section::Channels.name(),
            why: "the channel count must be 1..=16",
        }
        .into());
    }
    let mut readers: Vec<Option<StreamReader<Box<dyn Read + Send>>>> =
        (0..count).map(|_| None).collect();
    let mut accepted = 0;
    // One bound for all of them: connections of other migrations cannot stretch the wait.
    let deadline = std::time::Instant::now() + peer_timeout();
    while accepted < count {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let c = listening
            .accept_within(left)
            .map_err(|e| MigrationError::NoSource(format!("accepting a RAM channel: {e}")))?;
        let Some(r) = open_channel(c, id)? else {
            continue;
        };
        let (index, r) = r;
        let slot = readers
            .get_mut(index)
            .filter(|s| s.is_none())
            .ok_or(StreamError::Refused {
                section: Section::Channel.name(),
                why: "channel index out of range or repeated",
            })?;
        *slot = Some(r);
        accepted += 1;
    }
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            done: vec![None; count],
            ended: vec![None; count],
            handed: (0..count).map(|_| None).collect(),
            ..Default::default()
        }),
        changed: Condvar::new(),
        stop: AtomicBool::new(false),
    });
    for (i, r) in readers.into_iter().enumerate() {
        let Some(r) = r else { continue };
        let sh = shared.clone();
        std::thread::Builder::new()
            .name(format!("migration-channel-{i}"))
            .spawn_scoped(scope, move || {
                crate::thread_started("migration-channel");
                let why = match receive(r, i, vm, &sh) {
                    Ok(None) => "closed".to_string(),
                    Ok(Some(r)) => {
                        sh.lock().handed[i] = Some(r);
                        "handed over to postcopy".to_string()
                    }
                    Err(e) => e.to_string(),
                };
                sh.lock().ended[i] = Some(why);
                sh.changed.notify_all();
            })
            .map_err(|source| MigrationError::Spawn {
                what: "RAM channel reader",
                source,
            })?;
    }
    Ok(Receivers { shared })
}

/// Reads a channel connection's header and hello: its index and reader, or None when it
/// belongs to another migration (refused: told why on it, and logged).
fn open_channel(
    mut c: crate::transport::Channel,
    id: MigrationId,
) -> Result<Option<(usize, ChannelReader)>, MigrationError> {
    let r = c
        .reader
        .take()
        .ok_or_else(|| MigrationError::NoSource("a RAM channel cannot be read".into()))?;
    let mut r = StreamReader::new(r);
    let got = r.header()?;
    if got != id {
        crate::identity::refuse_foreign(c.writer.take(), "RAM channel", id, got);
        return Ok(None);
    }
    let hello: ChannelHello = r.read_section()?.expect(Section::Channel)?.decode()?;
    Ok(Some((hello.index as usize, r)))
}

/// One channel's receiver: places RAM batches and records pass markers until the source closes
/// the connection (which reads as a truncated stream: Ok(None)) or something fails. At the
/// postcopy switch (a Run marker) it returns the connection: what follows goes through
/// userfaultfd (`postcopy::channel_place`).
fn receive(
    mut r: ChannelReader,
    index: usize,
    vm: &dyn MigratableVm,
    sh: &Shared,
) -> Result<Option<ChannelReader>, MigrationError> {
    let zero = vec![0u8; PAGE_SIZE];
    while !sh.stop.load(Ordering::Relaxed) {
        let mut placed = Placing::default();
        let mut place = |src: &mut dyn Read, len: usize, crc: &mut crc32fast::Hasher| {
            place_run(vm, src, len, crc, &mut placed)
        };
        let frame = match r.read_section_placing(&mut place) {
            Ok(Some(f)) => f,
            Ok(None) => {
                let mut s = sh.lock();
                s.full += placed.pages;
                s.bytes += (placed.pages as usize * PAGE_SIZE + RUN_HEAD + 9) as u64;
                s.placing.pages += placed.pages;
                s.placing.populate_ns += placed.populate_ns;
                s.placing.receive_ns += placed.receive_ns;
                s.placing.checksum_ns += placed.checksum_ns;
                continue;
            }
            Err(StreamError::Truncated(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        match frame.kind {
            Section::Run => return Ok(Some(r)),
            Section::Ram => {
                let (full, zeros) = crate::incoming::apply_ram(vm, &frame.payload, &zero)?;
                let len = frame.payload.len() as u64 + 9;
                r.recycle(frame.payload);
                let mut s = sh.lock();
                s.full += full;
                s.zero += zeros;
                s.bytes += len;
            }
            Section::PassDone => {
                let pass: u32 = frame.decode()?;
                sh.lock().done[index] = Some(pass);
                sh.changed.notify_all();
            }
            Section::Heartbeat => {}
            other => {
                return Err(StreamError::Unexpected {
                    got: other.name(),
                    expected: "RAM on a channel",
                }
                .into())
            }
        }
    }
    Ok(None)
}

/// Reads a RAM run's payload (`len` bytes of `src`) straight into guest memory: its pages are
/// populated in one go first, then received in place and checksummed there.
fn place_run(
    vm: &dyn MigratableVm,
    src: &mut dyn Read,
    len: usize,
    crc: &mut crc32fast::Hasher,
    placed: &mut Placing,
) -> Result<(), StreamError> {
    let bad = |msg: String| StreamError::Decode {
        section: Section::RamRun.name(),
        msg,
    };
    let mut head = [0u8; RUN_HEAD];
    src.read_exact(&mut head).map_err(|e| StreamError::Read {
        section: "RAM run section".into(),
        source: e,
    })?;
    crc.update(&head);
    let gpa = u64::from_le_bytes(head[..8].try_into().unwrap_or([0; 8]));
    let pages = u32::from_le_bytes(head[8..].try_into().unwrap_or([0; 4])) as usize;
    let bytes = pages
        .checked_mul(PAGE_SIZE)
        .filter(|b| pages > 0 && b.checked_add(RUN_HEAD) == Some(len))
        .ok_or_else(|| bad(format!("{pages} pages do not fill a {len}-byte run")))?;
    if !gpa.is_multiple_of(PAGE_SIZE as u64) {
        return Err(bad(format!("run address {gpa:#x} is not page-aligned")));
    }
    // The whole run must lie in one guest mapping: its last page where its first page's
    // mapping puts it.
    let last = gpa.checked_add((bytes - PAGE_SIZE) as u64);
    let host = vm.host_address(gpa);
    let contiguous = match (host, last.and_then(|l| vm.host_address(l))) {
        (Some(h), Some(l)) => h.checked_add((bytes - PAGE_SIZE) as u64) == Some(l),
        _ => false,
    };
    let Some(host) = host.filter(|_| contiguous) else {
        return Err(bad(format!(
            "run of {pages} pages at {gpa:#x} is not inside one guest RAM region"
        )));
    };
    let t0 = std::time::Instant::now();
    vm.prepare_ram(gpa, bytes as u64);
    let t1 = std::time::Instant::now();
    // SAFETY: [host, host + bytes) is one live mapping of guest RAM (checked above through the
    // VM's own address translation), which outlives the migration. The destination's guest does
    // not run before the end section, and each page travels on exactly one channel, so nothing
    // else touches these bytes while this slice exists.
    let dest = unsafe { std::slice::from_raw_parts_mut(host as *mut u8, bytes) };
    src.read_exact(dest).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => StreamError::Truncated("RAM run section".into()),
        _ => StreamError::Read {
            section: "RAM run section".into(),
            source: e,
        },
    })?;
    let t2 = std::time::Instant::now();
    crc.update(dest);
    let t3 = std::time::Instant::now();
    placed.pages += pages as u64;
    placed.populate_ns += (t1 - t0).as_nanos() as u64;
    placed.receive_ns += (t2 - t1).as_nanos() as u64;
    placed.checksum_ns += (t3 - t2).as_nanos() as u64;
    Ok(())
}

impl Receivers {
    /// Where the receivers' time went placing RAM runs (summed over the channels).
    pub fn placing(&self) -> Placing {
        self.shared.lock().placing
    }

    /// Waits until every channel delivered pass `pass`; fails when one ended before it.
    /// A channel that sends heartbeats but no pages is alive to its socket's read timeout:
    /// the pass fails once no channel delivered a byte for [`STALL_PEER_TIMEOUTS`] peer timeouts.
    pub(crate) fn wait_pass(&self, pass: u32) -> Result<(), MigrationError> {
        let stall = peer_timeout() * STALL_PEER_TIMEOUTS;
        let mut s = self.shared.lock();
        let (mut seen, mut since) = (s.bytes, std::time::Instant::now());
        loop {
            if s.done.iter().all(|d| d.is_some_and(|d| d >= pass)) {
                return Ok(());
            }
            if s.bytes != seen {
                (seen, since) = (s.bytes, std::time::Instant::now());
            } else if since.elapsed() >= stall {
                let channels = (0..s.done.len())
                    .filter(|&i| s.done[i].is_none_or(|d| d < pass))
                    .collect();
                return Err(MigrationError::ChannelStalled {
                    channels,
                    pass,
                    secs: since.elapsed().as_secs_f64(),
                });
            }
            let lost = s
                .done
                .iter()
                .zip(&s.ended)
                .enumerate()
                .find_map(|(i, (d, e))| match e {
                    Some(why) if !d.is_some_and(|d| d >= pass) => Some((i, why.clone())),
                    _ => None,
                });
            if let Some((i, why)) = lost {
                return Err(MigrationError::Stream(StreamError::Truncated(format!(
                    "RAM channel {i} ended before pass {pass} was complete ({why})"
                ))));
            }
            s = self
                .shared
                .changed
                .wait_timeout(s, Duration::from_millis(200))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Pages and bytes the channels placed so far: (full, zero, bytes).
    pub(crate) fn figures(&self) -> (u64, u64, u64) {
        let s = self.shared.lock();
        (s.full, s.zero, s.bytes)
    }

    /// The postcopy switch: waits until every channel handed its connection over (its Run
    /// marker came; the source sends it before RUN on the main stream) and takes them.
    pub(crate) fn take_for_postcopy(&self) -> Result<Vec<ChannelReader>, MigrationError> {
        let deadline = std::time::Instant::now() + peer_timeout();
        let mut s = self.shared.lock();
        loop {
            if s.handed.iter().all(|h| h.is_some()) {
                return Ok(s.handed.iter_mut().filter_map(|h| h.take()).collect());
            }
            let lost = s
                .handed
                .iter()
                .zip(&s.ended)
                .enumerate()
                .find_map(|(i, (h, e))| match e {
                    Some(why) if h.is_none() => Some((i, why.clone())),
                    _ => None,
                });
            if let Some((i, why)) = lost {
                return Err(MigrationError::Stream(StreamError::Truncated(format!(
                    "RAM channel {i} ended before the postcopy switch ({why})"
                ))));
            }
            if std::time::Instant::now() >= deadline {
                return Err(MigrationError::NoSource(
                    "a RAM channel never reached the postcopy switch".into(),
                ));
            }
            s = self
                .shared
                .changed
                .wait_timeout(s, Duration::from_millis(200))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Tells the receivers to stop after the section they are reading.
    pub(crate) fn stop(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}
