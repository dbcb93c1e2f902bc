//! Reading fuzz input as a sequence of small fields, and framing stream sections from it.

use migration::stream::header_bytes;

/// Fields read from the front of the fuzz input; past its end every field reads as zero/empty.
pub struct Bytes<'a> {
    data: &'a [u8],
}

impl<'a> Bytes<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Bytes { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(n.min(self.data.len()));
        self.data = tail;
        head
    }

    fn le<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let got = self.take(N);
        out[..got.len()].copy_from_slice(got);
        out
    }

    pub fn u8(&mut self) -> u8 {
        self.le::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.le())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.le())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.le())
    }

    pub fn rest(&mut self) -> &'a [u8] {
        self.take(self.data.len())
    }
}

/// A section kind with this bit set carries a compact RAM batch: records of (gpa u64 LE, kind
/// u8) that the harness expands, giving each full page 4096 bytes of a pattern (so a fuzzer can
/// write pages without spelling out 4 KiB each).
pub const COMPACT_RAM: u8 = 0x80;

/// Splits the input into sections: `kind u8 | len u16 LE | payload`, repeated (the last payload
/// may be shorter than its length says). Compact RAM batches are expanded.
pub fn sections(data: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut b = Bytes::new(data);
    let mut out = Vec::new();
    while !b.is_empty() {
        let kind = b.u8();
        let len = usize::from(b.u16());
        let payload = b.take(len);
        if kind == COMPACT_RAM | 2 {
            out.push((2, expand_ram(payload)));
        } else {
            out.push((kind, payload.to_vec()));
        }
    }
    out
}

fn expand_ram(compact: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for rec in compact.chunks(9) {
        out.extend_from_slice(&rec[..rec.len().min(8)]);
        if let Some(&kind) = rec.get(8) {
            out.push(kind);
            if kind == 1 {
                out.extend(std::iter::repeat_n(rec[0] | 1, 4096));
            }
        }
    }
    out
}

/// Appends one section with a correct checksum (whatever its kind byte).
pub fn frame(out: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    let mut head = [0u8; 5];
    head[0] = kind;
    head[1..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head);
    crc.update(payload);
    out.extend_from_slice(&head);
    out.extend_from_slice(payload);
    out.extend_from_slice(&crc.finalize().to_le_bytes());
}

/// A stream: the header, then the sections framed.
pub fn stream(sections: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut out = header_bytes(Default::default()).to_vec();
    for (kind, payload) in sections {
        frame(&mut out, *kind, payload);
    }
    out
}

/// The inverse of [`sections`] (no compaction): what seed inputs are written with.
pub fn encode_sections(sections: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (kind, payload) in sections {
        out.push(*kind);
        let len = u16::try_from(payload.len()).expect("seed sections fit a u16 length");
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(payload);
    }
    out
}

/// A record's JSON payload (every record type here serialises).
pub fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("tern's records serialise")
}
