//! The stream reader and every record decoder: framed sections (or raw bytes, for the framing
//! and checksum checks themselves) read until the end section or the first error.

use std::io::Cursor;

use migration::postcopy::preempt::AdviseRecord;
use migration::postcopy::{DiscardRecord, PageRefusal, PageRequest};
use migration::state::{
    ClockState, DeviceStates, EndRecord, IoapicState, LocalRamRecord, PicState, PitState, VcpuState,
};
use migration::stream::{parse_ram, Frame, PageRecord, Section, StreamReader};
use migration::{VmConfigRecord, PAGE_SIZE};

use crate::bytes::{sections, stream, Bytes};

/// Input: a mode byte (bit 0: the rest is raw stream bytes, header included; otherwise it is
/// sections for [`sections`]), then the rest.
pub fn run(data: &[u8]) {
    let mut b = Bytes::new(data);
    let raw = b.u8() & 1 != 0;
    let bytes = if raw {
        b.rest().to_vec()
    } else {
        stream(&sections(b.rest()))
    };
    let mut r = StreamReader::new(Cursor::new(bytes));
    if r.header().is_err() {
        return;
    }
    while let Ok(frame) = r.read_section() {
        assert!(frame.payload.len() <= frame.kind.max_len());
        decode(&frame);
        if frame.kind == Section::End {
            return;
        }
    }
}

/// Decodes a section as its reader would; errors are fine, panics are not.
pub fn decode(f: &Frame) {
    match f.kind {
        Section::Ram => {
            for rec in parse_ram(&f.payload) {
                match rec {
                    Ok(PageRecord::Full(_, page)) => assert_eq!(page.len(), PAGE_SIZE),
                    Ok(PageRecord::Zero(_)) => {}
                    Err(_) => break,
                }
            }
        }
        Section::Config | Section::Recover => drop(f.decode::<VmConfigRecord>()),
        Section::LocalRam => drop(f.decode::<LocalRamRecord>()),
        Section::Vcpus => drop(f.decode::<Vec<VcpuState>>()),
        Section::Clock => drop(f.decode::<ClockState>()),
        Section::Irqchip => drop(f.decode::<(PicState, PicState, IoapicState)>()),
        Section::Pit => drop(f.decode::<PitState>()),
        Section::Devices => drop(f.decode::<DeviceStates>()),
        Section::End | Section::Run => drop(f.decode::<EndRecord>()),
        Section::IterationDone => drop(f.decode::<u32>()),
        Section::Advise => drop(AdviseRecord::decode(&f.payload)),
        Section::Discard | Section::Missing => drop(f.decode::<DiscardRecord>()),
        Section::PageRequest => drop(f.decode::<PageRequest>()),
        Section::PageRefused => drop(f.decode::<PageRefusal>()),
        Section::Abort => drop(f.decode::<String>()),
        _ => {}
    }
}
