//! RAM batch payloads: (gpa u64 LE | kind u8 | 4096 bytes if kind = 1)*.

use super::{Section, StreamError};
use crate::PAGE_SIZE;

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
