//! The migration stream: a versioned header, then framed sections, each with a CRC32.
//!
//! ```text
//! header  : "TERNMIG\0" | version u32 LE | flags u32 LE
//! section : kind u8 | length u32 LE | payload | crc32(kind | length | payload) u32 LE
//! ```
//! Records are serde JSON; RAM batches are binary: (gpa u64 LE | kind u8 | 4096 bytes if kind = 1)*.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

use crate::PAGE_SIZE;

pub const MAGIC: &[u8; 8] = b"TERNMIG\0";
pub const VERSION: u32 = 1;
/// Magic, version and flags.
pub const HEADER_LEN: usize = 16;
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
}

/// The stream header.
pub fn header_bytes() -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
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

    pub fn header(&mut self) -> Result<(), StreamError> {
        self.header_version(VERSION)
    }

    /// Counts bytes that went out around this writer (a header sent with descriptors).
    pub fn count_sent(&mut self, n: usize) {
        self.bytes += n as u64;
    }

    pub fn header_version(&mut self, version: u32) -> Result<(), StreamError> {
        let mut h = Vec::with_capacity(16);
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

    pub fn header(&mut self) -> Result<(), StreamError> {
        match self.header_version()? {
            VERSION => Ok(()),
            SNAPSHOT_VERSION => Err(StreamError::Decode {
                section: "stream header",
                msg: "this is a snapshot file, not a migration stream (restore it with --incoming file:PATH)".into(),
            }),
            v => Err(StreamError::Version(v)),
        }
    }

    /// Reads the header and returns its version, whatever it is.
    pub fn header_version(&mut self) -> Result<u32, StreamError> {
        let mut h = [0u8; 16];
        read_exact_in(&mut self.r, &mut h, "stream header")?;
        self.bytes += 16;
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

/// One page in a RAM batch.
#[derive(Debug, PartialEq, Eq)]
pub enum PageRecord<'a> {
    Zero(u64),
    Full(u64, &'a [u8]),
}

const PAGE_ZERO: u8 = 0;
const PAGE_FULL: u8 = 1;

/// Builds RAM batch payloads.
#[derive(Default)]
pub struct RamBatch {
    buf: Vec<u8>,
    pending: usize,
    pub full: u64,
    pub zero: u64,
}

impl RamBatch {
    /// Pages per batch: about 1 MiB of payload.
    pub const PAGES: usize = 256;

    pub fn push_zero(&mut self, gpa: u64) {
        self.buf.extend_from_slice(&gpa.to_le_bytes());
        self.buf.push(PAGE_ZERO);
        self.zero += 1;
        self.pending += 1;
    }

    pub fn push_full(&mut self, gpa: u64, page: &[u8]) {
        self.buf.extend_from_slice(&gpa.to_le_bytes());
        self.buf.push(PAGE_FULL);
        self.buf.extend_from_slice(page);
        self.full += 1;
        self.pending += 1;
    }

    /// Pages in the current (not yet taken) payload.
    pub fn len(&self) -> usize {
        self.pending
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The payload so far.
    pub fn payload(&self) -> &[u8] {
        &self.buf
    }

    /// Empties the payload, keeping its allocation (fresh buffers cost a page fault per page on
    /// this machine) and the counters.
    pub fn clear(&mut self) {
        self.pending = 0;
        self.buf.clear();
    }

    /// The payload so far; the batch is emptied (counters keep counting).
    pub fn take(&mut self) -> Vec<u8> {
        self.pending = 0;
        std::mem::take(&mut self.buf)
    }
}

/// Iterates the pages of a RAM batch payload.
pub fn parse_ram(payload: &[u8]) -> impl Iterator<Item = Result<PageRecord<'_>, StreamError>> {
    let mut pos = 0;
    std::iter::from_fn(move || {
        if pos >= payload.len() {
            return None;
        }
        let bad = |msg: &str| {
            Some(Err(StreamError::Decode {
                section: Section::Ram.name(),
                msg: msg.to_string(),
            }))
        };
        let Some(head) = payload.get(pos..pos + 9) else {
            pos = payload.len();
            return bad("page record cut short");
        };
        let gpa = u64::from_le_bytes(head[..8].try_into().unwrap_or([0; 8]));
        pos += 9;
        if !gpa.is_multiple_of(PAGE_SIZE as u64) {
            pos = payload.len();
            return Some(Err(StreamError::Decode {
                section: Section::Ram.name(),
                msg: format!("page address {gpa:#x} is not page-aligned"),
            }));
        }
        match head[8] {
            PAGE_ZERO => Some(Ok(PageRecord::Zero(gpa))),
            PAGE_FULL => match payload.get(pos..pos + PAGE_SIZE) {
                Some(page) => {
                    pos += PAGE_SIZE;
                    Some(Ok(PageRecord::Full(gpa, page)))
                }
                None => {
                    pos = payload.len();
                    bad("page data cut short")
                }
            },
            _ => {
                pos = payload.len();
                bad("unknown page kind")
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = StreamWriter::new(Vec::new());
        w.header().unwrap();
        w.record(Section::Config, &vec![1u32, 2, 3]).unwrap();
        let mut batch = RamBatch::default();
        batch.push_zero(0x1000);
        batch.push_full(0x2000, &[7u8; PAGE_SIZE]);
        w.section(Section::Ram, &batch.take()).unwrap();
        w.section(Section::End, &[]).unwrap();
        w.get_mut().clone()
    }

    #[test]
    fn every_section_kind_decodes() {
        for v in 0..=255u8 {
            if let Some(s) = Section::from_u8(v) {
                assert_eq!(s as u8, v);
            }
        }
        for s in [
            Section::Advise,
            Section::Discard,
            Section::Run,
            Section::PageRequest,
            Section::Complete,
        ] {
            assert_eq!(Section::from_u8(s as u8), Some(s));
        }
    }

    #[test]
    fn round_trip() {
        let bytes = sample();
        let mut r = StreamReader::new(&bytes[..]);
        r.header().unwrap();
        let cfg: Vec<u32> = r
            .read_section()
            .unwrap()
            .expect(Section::Config)
            .unwrap()
            .decode()
            .unwrap();
        assert_eq!(cfg, vec![1, 2, 3]);
        let ram = r.read_section().unwrap().expect(Section::Ram).unwrap();
        let pages: Vec<_> = parse_ram(&ram.payload).collect::<Result<_, _>>().unwrap();
        assert_eq!(pages[0], PageRecord::Zero(0x1000));
        assert!(matches!(pages[1], PageRecord::Full(0x2000, p) if p[0] == 7));
        assert_eq!(r.read_section().unwrap().kind, Section::End);
    }

    #[test]
    fn flipped_byte_is_a_checksum_error_naming_the_section() {
        let mut bytes = sample();
        let n = bytes.len();
        bytes[n / 2] ^= 0x40; // inside the RAM page data
        let mut r = StreamReader::new(&bytes[..]);
        r.header().unwrap();
        r.read_section().unwrap();
        let err = r.read_section().err().unwrap();
        assert!(matches!(err, StreamError::Checksum("RAM")), "{err}");
    }

    #[test]
    fn truncation_names_the_section() {
        let bytes = sample();
        let cut = &bytes[..bytes.len() - 20];
        let mut r = StreamReader::new(cut);
        r.header().unwrap();
        r.read_section().unwrap();
        let err = r.read_section().err().unwrap();
        assert_eq!(err.to_string(), "stream truncated in RAM section");
        let mut r = StreamReader::new(&bytes[..5]);
        assert!(matches!(r.header(), Err(StreamError::Truncated(_))));
        let mut r = StreamReader::new(&b"NOTTERN!\x01\0\0\0\0\0\0\0"[..]);
        assert!(matches!(r.header(), Err(StreamError::BadMagic)));
    }

    #[test]
    fn each_kind_has_its_own_size_limit() {
        // A 2 MiB device-state header is refused from the header alone (no payload follows).
        let mut bytes = vec![Section::Devices as u8];
        bytes.extend_from_slice(&(2u32 << 20).to_le_bytes());
        let err = StreamReader::new(&bytes[..]).read_section().err().unwrap();
        assert!(
            matches!(err, StreamError::TooLarge { section: "device state", limit, .. } if limit == MAX_STATE_RECORD),
            "{err}"
        );
        let mut bytes = vec![Section::Clock as u8];
        bytes.extend_from_slice(&(MAX_SMALL_RECORD as u32 + 1).to_le_bytes());
        let err = StreamReader::new(&bytes[..]).read_section().err().unwrap();
        assert!(matches!(err, StreamError::TooLarge { .. }), "{err}");
        // The writer keeps to the same limits.
        let mut w = StreamWriter::new(Vec::new());
        assert!(w
            .section(Section::Config, &vec![b' '; MAX_STATE_RECORD + 1])
            .is_err());
    }

    #[test]
    fn unaligned_page_addresses_are_refused() {
        let mut batch = RamBatch::default();
        batch.push_zero(0x1000);
        batch.push_full(0x2001, &[0u8; PAGE_SIZE]);
        let payload = batch.take();
        let pages: Vec<_> = parse_ram(&payload).collect();
        assert_eq!(pages.len(), 2);
        assert!(pages[0].is_ok());
        let err = pages[1].as_ref().err().unwrap().to_string();
        assert!(err.contains("0x2001 is not page-aligned"), "{err}");
    }
}
