//! The migration stream: a versioned header, then framed sections, each with a CRC32.
//!
//! ```text
//! header  : "TERNMIG\0" | version u32 LE | flags u32 LE | migration id (16 bytes)
//! section : kind u8 | length u32 LE | payload | crc32(kind | length | payload) u32 LE
//! ```
//! Records are serde JSON; RAM batches are binary: (gpa u64 LE | kind u8 | 4096 bytes if kind = 1)*.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

use crate::identity::{MigrationId, ID_LEN};

pub const MAGIC: &[u8; 8] = b"TERNMIG\0";
/// 3: the header carries the migration id (1 had none; 2 is the snapshot layout's number).
pub const VERSION: u32 = 3;
/// Magic, version and flags: the part every layout shares.
const BASE_HEADER_LEN: usize = 16;
/// Magic, version, flags and the migration id.
pub const HEADER_LEN: usize = BASE_HEADER_LEN + ID_LEN;
/// Snapshot files (`file:` endpoints) have their own layout; see `snapshot.rs`.
pub const SNAPSHOT_VERSION: u32 = 2;
/// Largest section payload tern writes or accepts (RAM batches, the discard list, vCPU state).
pub const MAX_SECTION: usize = 8 << 20;
/// Largest configuration or device-state record: far above what tern writes (a few KiB), far
/// below what would let a peer make the destination hold memory it never uses.
pub const MAX_STATE_RECORD: usize = 1 << 20;
/// Largest small record (markers, clock, irqchip, PIT, requests, replies, figures).
pub const MAX_SMALL_RECORD: usize = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Config = 1,
    Ram = 2,
    IterationDone = 3,
    Vcpus = 4,
    Clock = 5,
    Irqchip = 6,
    Pit = 7,
    Devices = 8,
    End = 9,
    /// Postcopy: the source asks the destination to check it can do postcopy.
    Advise = 10,
    /// Postcopy: pages the destination must treat as missing (then the device state follows).
    Discard = 11,
    /// Postcopy: the destination may run the guest now; pages keep coming.
    Run = 12,
    /// Postcopy: the source cannot serve a page request (the payload says which and why).
    PageRefused = 13,
    /// Either way: the peer is alive (sent at least every second while a migration waits on
    /// its peer), so silence means a dead peer rather than a slow migration.
    Heartbeat = 14,
    /// Source: the migration was cancelled before the switch; the destination drops it.
    Cancel = 15,
    /// Source, first section of a local migration (numbered apart from the kinds added in
    /// sequence): guest RAM is the descriptors sent with the header, one per region (an older
    /// destination refuses the unknown kind).
    LocalRam = 0x20,
    /// Either way, postcopy recovery: the source reconnects to a paused postcopy (its payload:
    /// the configuration record, so a wrong peer is refused); the destination ends its list of
    /// missing pages with it.
    Recover = 16,
    /// Postcopy preempt channel: the first section on the second connection.
    Preempt = 17,
    /// Snapshot: (gpa u64 LE, crc32 u32 LE) of each stored page, in file order.
    PageIndex = 18,
    /// RAM channels: the source announces `{count}` extra connections (main stream).
    Channels = 19,
    /// RAM channels: the first section on a channel connection (`{index}`).
    Channel = 20,
    /// RAM channels: a pass (its number) is complete on this channel; on the main stream, on
    /// every channel.
    PassDone = 21,
    /// RAM channels: consecutive full pages, placed straight into guest memory on arrival:
    /// gpa u64 LE | count u32 LE | count pages.
    RamRun = 22,
    /// Return path: the destination resumed the guest.
    Resumed = 0x40,
    /// Return path: the destination gave up; the payload says why.
    Abort = 0x41,
    /// Return path (postcopy): please send this page first.
    PageRequest = 0x42,
    /// Return path (postcopy): every page arrived; the figures follow.
    Complete = 0x43,
    /// Return path (local migration): the VM is built on the handed-over RAM; pause now.
    Ready = 0x50,
    /// Return path (postcopy recovery): runs of pages the destination still lacks.
    Missing = 0x44,
}

impl Section {
    pub fn from_u8(v: u8) -> Option<Self> {
        use Section::*;
        [
            Config,
            Ram,
            IterationDone,
            Vcpus,
            Clock,
            Irqchip,
            Pit,
            Devices,
            End,
            Advise,
            Discard,
            Run,
            PageRefused,
            Heartbeat,
            Cancel,
            LocalRam,
            Recover,
            Preempt,
            PageIndex,
            Channels,
            Channel,
            PassDone,
            RamRun,
            Resumed,
            Abort,
            PageRequest,
            Complete,
            Ready,
            Missing,
        ]
        .into_iter()
        .find(|s| *s as u8 == v)
    }

    /// The largest payload this kind of section may have.
    pub fn max_len(self) -> usize {
        match self {
            Section::Ram
            | Section::RamRun
            | Section::Discard
            | Section::Vcpus
            | Section::Missing
            | Section::PageIndex => MAX_SECTION,
            Section::Config | Section::Devices | Section::Recover => MAX_STATE_RECORD,
            _ => MAX_SMALL_RECORD,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Section::Config => "configuration",
            Section::Ram => "RAM",
            Section::IterationDone => "iteration marker",
            Section::Vcpus => "vCPU state",
            Section::Clock => "kvmclock",
            Section::Irqchip => "irqchip",
            Section::Pit => "PIT",
            Section::Devices => "device state",
            Section::End => "end",
            Section::Resumed => "resumed",
            Section::Abort => "abort",
            Section::Advise => "postcopy advise",
            Section::Discard => "postcopy discard",
            Section::Run => "postcopy run",
            Section::PageRefused => "page refused",
            Section::Heartbeat => "heartbeat",
            Section::Cancel => "cancel",
            Section::Recover => "postcopy recover",
            Section::Preempt => "preempt channel",
            Section::PageIndex => "page index",
            Section::Channels => "RAM channels",
            Section::Channel => "RAM channel",
            Section::PassDone => "pass marker",
            Section::RamRun => "RAM run",
            Section::Missing => "missing pages",
            Section::PageRequest => "page request",
            Section::Complete => "postcopy complete",
            Section::LocalRam => "local memory",
            Section::Ready => "ready",
        }
    }
}

#[derive(Debug, Error)]
pub enum StreamError {
    #[error("write failed: {0}")]
    Write(io::Error),
    #[error("read failed in {section}: {source}")]
    Read { section: String, source: io::Error },
    /// Destination: the connection's read timeout passed with nothing from the source.
    #[error("timed out waiting for the source: nothing came for {secs} s (reading {section})")]
    SourceSilent { section: String, secs: f64 },
    #[error("not a tern migration stream (bad magic)")]
    BadMagic,
    #[error("unsupported stream version {0} (this tern reads version {VERSION})")]
    Version(u32),
    #[error("stream truncated in {0}")]
    Truncated(String),
    #[error("checksum mismatch in {0} section: the stream is corrupted")]
    Checksum(&'static str),
    #[error("unknown section kind {0:#x}: the stream is corrupted")]
    UnknownSection(u8),
    #[error("{section} section of {len} bytes is larger than its {limit}-byte limit")]
    TooLarge {
        section: &'static str,
        len: usize,
        limit: usize,
    },
    #[error("cannot decode {section} section: {msg}")]
    Decode { section: &'static str, msg: String },
    #[error("{section} section refused: {why}")]
    Refused {
        section: &'static str,
        why: &'static str,
    },
    #[error("unexpected {got} section where {expected} was expected")]
    Unexpected {
        got: &'static str,
        expected: &'static str,
    },
    /// An extra connection (RAM channel, preempt channel, recovery) of another migration.
    #[error("the connection belongs to migration {got}, not to migration {expected} in progress here: refused")]
    ForeignMigration {
        expected: MigrationId,
        got: MigrationId,
    },
}

/// The stream header of migration `id`.
pub fn header_bytes(id: MigrationId) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[BASE_HEADER_LEN..].copy_from_slice(&id.0);
    h
}

/// Reads a RAM run's payload from the stream to where it belongs: (stream, payload length,
/// checksum so far, to be fed every payload byte).
pub type PlaceRun<'a> =
    dyn FnMut(&mut dyn Read, usize, &mut crc32fast::Hasher) -> Result<(), StreamError> + 'a;

/// Writes sections, counting bytes.
pub struct StreamWriter<W: Write> {
    w: W,
    pub bytes: u64,
}

impl<W: Write> StreamWriter<W> {
    pub fn new(w: W) -> Self {
        StreamWriter { w, bytes: 0 }
    }

    /// The header of a connection of migration `id`.
    pub fn header(&mut self, id: MigrationId) -> Result<(), StreamError> {
        self.raw(&header_bytes(id))
    }

    /// Counts bytes that went out around this writer (a header sent with descriptors).
    pub fn count_sent(&mut self, n: usize) {
        self.bytes += n as u64;
    }

    /// Magic, `version` and flags only (the snapshot layout).
    pub fn header_version(&mut self, version: u32) -> Result<(), StreamError> {
        let mut h = Vec::with_capacity(BASE_HEADER_LEN);
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&version.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        self.raw(&h)
    }

    fn raw(&mut self, b: &[u8]) -> Result<(), StreamError> {
        self.w.write_all(b).map_err(StreamError::Write)?;
        self.bytes += b.len() as u64;
        Ok(())
    }

    pub fn section(&mut self, kind: Section, payload: &[u8]) -> Result<(), StreamError> {
        if payload.len() > kind.max_len() {
            return Err(StreamError::TooLarge {
                section: kind.name(),
                len: payload.len(),
                limit: kind.max_len(),
            });
        }
        let mut head = [0u8; 5];
        head[0] = kind as u8;
        head[1..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head);
        crc.update(payload);
        self.raw(&head)?;
        self.raw(payload)?;
        self.raw(&crc.finalize().to_le_bytes())
    }

    pub fn record<T: Serialize>(&mut self, kind: Section, value: &T) -> Result<(), StreamError> {
        let payload = serde_json::to_vec(value).map_err(|e| StreamError::Decode {
            section: kind.name(),
            msg: e.to_string(),
        })?;
        self.section(kind, &payload)
    }

    pub fn flush(&mut self) -> Result<(), StreamError> {
        self.w.flush().map_err(StreamError::Write)
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.w
    }
}

/// A section as read: kind and payload, checksum verified.
pub struct Frame {
    pub kind: Section,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, StreamError> {
        serde_json::from_slice(&self.payload).map_err(|e| StreamError::Decode {
            section: self.kind.name(),
            msg: e.to_string(),
        })
    }

    pub fn expect(self, kind: Section) -> Result<Self, StreamError> {
        if self.kind != kind {
            return Err(StreamError::Unexpected {
                got: self.kind.name(),
                expected: kind.name(),
            });
        }
        Ok(self)
    }
}

pub struct StreamReader<R: Read> {
    r: R,
    pub bytes: u64,
    /// A payload buffer handed back with [`StreamReader::recycle`], reused for the next section.
    spare: Vec<u8>,
}

fn read_exact_in<R: Read>(r: &mut R, buf: &mut [u8], section: &str) -> Result<(), StreamError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => StreamError::Truncated(section.to_string()),
        _ => StreamError::Read {
            section: section.to_string(),
            source: e,
        },
    })
}

impl<R: Read> StreamReader<R> {
    pub fn new(r: R) -> Self {
        StreamReader {
            r,
            bytes: 0,
            spare: Vec::new(),
        }
    }

    /// Reads a migration stream's header; returns the migration's id.
    pub fn header(&mut self) -> Result<MigrationId, StreamError> {
        match self.header_version()? {
            VERSION => {
                let mut id = [0u8; ID_LEN];
                read_exact_in(&mut self.r, &mut id, "stream header")?;
                self.bytes += ID_LEN as u64;
                Ok(MigrationId(id))
            }
            SNAPSHOT_VERSION => Err(StreamError::Decode {
                section: "stream header",
                msg: "this is a snapshot file, not a migration stream (restore it with --incoming file:PATH)".into(),
            }),
            v => Err(StreamError::Version(v)),
        }
    }

    /// Reads magic, version and flags and returns the version, whatever it is.
    pub fn header_version(&mut self) -> Result<u32, StreamError> {
        let mut h = [0u8; BASE_HEADER_LEN];
        read_exact_in(&mut self.r, &mut h, "stream header")?;
        self.bytes += BASE_HEADER_LEN as u64;
        if &h[..8] != MAGIC {
            return Err(StreamError::BadMagic);
        }
        Ok(u32::from_le_bytes([h[8], h[9], h[10], h[11]]))
    }

    /// Gives a payload buffer back for reuse.
    pub fn recycle(&mut self, payload: Vec<u8>) {
        // Its length is kept: the next section of the same size is read over it without
        // zeroing it first (read_rest overwrites every byte it hands out).
        self.spare = payload;
    }

    /// Reads one section.
    pub fn read_section(&mut self) -> Result<Frame, StreamError> {
        let (head, kind, len) = self.read_head()?;
        self.read_rest(head, kind, len)
    }

    /// Reads one section, but hands a RAM run's payload to `place` (with the stream, the
    /// payload's length and the checksum so far) to read where it belongs; the checksum is
    /// verified after it. Returns None for a placed run.
    pub fn read_section_placing(
        &mut self,
        place: &mut PlaceRun<'_>,
    ) -> Result<Option<Frame>, StreamError> {
        let (head, kind, len) = self.read_head()?;
        if kind != Section::RamRun {
            return self.read_rest(head, kind, len).map(Some);
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head);
        place(&mut self.r, len, &mut crc)?;
        let mut crc_bytes = [0u8; 4];
        read_exact_in(&mut self.r, &mut crc_bytes, "RAM run section")?;
        if crc.finalize() != u32::from_le_bytes(crc_bytes) {
            return Err(StreamError::Checksum(kind.name()));
        }
        self.bytes += (len + 9) as u64;
        Ok(None)
    }

    fn read_head(&mut self) -> Result<([u8; 5], Section, usize), StreamError> {
        let mut head = [0u8; 5];
        read_exact_in(
            &mut self.r,
            &mut head,
            "section header (stream ended before its end section)",
        )?;
        let kind = Section::from_u8(head[0]).ok_or(StreamError::UnknownSection(head[0]))?;
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if len > kind.max_len() {
            return Err(StreamError::TooLarge {
                section: kind.name(),
                len,
                limit: kind.max_len(),
            });
        }
        Ok((head, kind, len))
    }

    fn read_rest(
        &mut self,
        head: [u8; 5],
        kind: Section,
        len: usize,
    ) -> Result<Frame, StreamError> {
        let mut payload = std::mem::take(&mut self.spare);
        payload.resize(len, 0);
        read_exact_in(
            &mut self.r,
            &mut payload,
            &format!("{} section", kind.name()),
        )?;
        let mut crc_bytes = [0u8; 4];
        read_exact_in(
            &mut self.r,
            &mut crc_bytes,
            &format!("{} section", kind.name()),
        )?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head);
        crc.update(&payload);
        if crc.finalize() != u32::from_le_bytes(crc_bytes) {
            return Err(StreamError::Checksum(kind.name()));
        }
        self.bytes += (len + 9) as u64;
        Ok(Frame { kind, payload })
    }
}

mod ram;
pub use ram::{parse_ram, PageRecord, RamBatch};

#[cfg(test)]
mod tests;
