//! Seed inputs: one or a few valid inputs per target, so fuzzing starts past the outer checks.
//! They are written to `corpus/<target>/seed-*` (`cargo test -p tern-fuzz -- --ignored
//! write_seeds`) and replayed from the code as well.

use migration::postcopy::preempt::AdviseRecord;
use migration::postcopy::DiscardRecord;
use migration::state::EndRecord;
use migration::stream::{Section, SNAPSHOT_VERSION};
use migration::{MigratableVm, PAGE_SIZE};

use crate::bytes::{encode_sections, json, COMPACT_RAM};
use crate::fake_vm::{marker_state, FakeVm, LAYOUT};
use crate::postcopy::page_gpa;

/// A compact RAM section: (gpa, kind) records the harness expands (kind 1: a full page).
fn compact_ram(pages: &[(u64, u8)]) -> (u8, Vec<u8>) {
    let mut out = Vec::new();
    for &(gpa, kind) in pages {
        out.extend_from_slice(&gpa.to_le_bytes());
        out.push(kind);
    }
    (COMPACT_RAM | Section::Ram as u8, out)
}

fn config() -> (u8, Vec<u8>) {
    (Section::Config as u8, json(&FakeVm::new(&LAYOUT).config()))
}

fn state() -> Vec<(u8, Vec<u8>)> {
    let s = marker_state();
    vec![
        (Section::Vcpus as u8, json(&s.vcpus)),
        (Section::Clock as u8, json(&s.clock)),
        (
            Section::Irqchip as u8,
            json(&(s.pic_master, s.pic_slave, s.ioapic)),
        ),
        (Section::Pit as u8, json(&s.pit)),
        (Section::Devices as u8, json(&s.devices)),
    ]
}

fn end(kind: Section) -> (u8, Vec<u8>) {
    (kind as u8, json(&EndRecord::default()))
}

/// A precopy stream: configuration, RAM in both regions, state, end.
fn precopy() -> Vec<(u8, Vec<u8>)> {
    let mut s = vec![
        config(),
        compact_ram(&[(0, 1), (PAGE_SIZE as u64, 0), (page_gpa(300), 1)]),
        (Section::IterationDone as u8, json(&1u32)),
        compact_ram(&[(page_gpa(5), 1)]),
    ];
    s.extend(state());
    s.push(end(Section::End));
    s
}

/// The pages a postcopy seed discards, and the runs it names them in.
const DISCARD: [(u64, u64); 2] = [(3, 4), (260, 2)];

fn discarded() -> Vec<(u64, u8)> {
    DISCARD
        .iter()
        .flat_map(|&(p, n)| (p..p + n).map(|p| (page_gpa(p), (p % 2) as u8)))
        .collect()
}

fn postcopy_incoming() -> Vec<(u8, Vec<u8>)> {
    let ranges = DISCARD.iter().map(|&(p, n)| (page_gpa(p), n)).collect();
    let mut s = vec![
        config(),
        compact_ram(&[(0, 1)]),
        (
            Section::Advise as u8,
            json(&AdviseRecord { preempt: false }),
        ),
        (Section::Discard as u8, json(&DiscardRecord { ranges })),
    ];
    s.extend(state());
    s.push(end(Section::Run));
    s.push(compact_ram(&discarded()));
    s.push((Section::Heartbeat as u8, Vec::new()));
    s.push(end(Section::End));
    s
}

fn with_flags(flags: u8, sections: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut out = vec![flags];
    out.extend(encode_sections(sections));
    out
}

fn stream_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut raw = vec![1u8];
    raw.extend(crate::bytes::stream(&crate::bytes::sections(
        &encode_sections(&precopy()),
    )));
    vec![
        ("precopy", with_flags(0, &precopy())),
        ("postcopy", with_flags(0, &postcopy_incoming())),
        ("raw", raw),
    ]
}

fn postcopy_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut input = vec![0u8, DISCARD.len() as u8];
    for (p, n) in DISCARD {
        input.extend_from_slice(&(p as u16).to_le_bytes());
        input.extend_from_slice(&(n as u16).to_le_bytes());
    }
    let tail = [
        compact_ram(&discarded()[..3]),
        (Section::Heartbeat as u8, Vec::new()),
        compact_ram(&discarded()[3..]),
        end(Section::End),
    ];
    input.extend(encode_sections(&tail));
    vec![("complete", input)]
}

/// A snapshot of three stored pages (fill bytes 1, 2, 3 at pages 0, 5 and 300).
fn snapshot_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let fills = [1u8, 2, 3];
    let gpas = [0, page_gpa(5), page_gpa(300)];
    let mut index = Vec::new();
    for (fill, gpa) in fills.iter().zip(gpas) {
        index.extend_from_slice(&gpa.to_le_bytes());
        index.extend_from_slice(&crc32fast::hash(&[*fill; PAGE_SIZE]).to_le_bytes());
    }
    let mut s = vec![config()];
    s.extend(state());
    s.push((Section::PageIndex as u8, index));
    s.push(end(Section::End));
    let mut input = vec![0u8, fills.len() as u8];
    input.extend_from_slice(&fills);
    input.extend(encode_sections(&s));
    assert_eq!(SNAPSHOT_VERSION, 2, "the seed's header is version 2");
    vec![("three-pages", input)]
}

/// A driver that sets up both queues and puts one buffer of PFNs on each.
fn balloon_seeds() -> Vec<(&'static str, Vec<u8>)> {
    // Packed into the first 3 KiB: a short image keeps every execution cheap.
    const DESC: u64 = 0x100;
    const AVAIL: u64 = 0x200;
    const USED: u64 = crate::balloon::USED_SEED;
    const PFNS: u64 = 0xb00;
    let mut image = vec![0u8; 0xc00];
    let put = |image: &mut Vec<u8>, at: u64, b: &[u8]| {
        image[at as usize..at as usize + b.len()].copy_from_slice(b)
    };
    // One descriptor: the PFN buffer (5 PFNs, one outside RAM).
    put(&mut image, DESC, &PFNS.to_le_bytes());
    put(&mut image, DESC + 8, &20u32.to_le_bytes());
    // avail: flags 0, idx 1, ring[0] = descriptor 0.
    put(&mut image, AVAIL + 2, &1u16.to_le_bytes());
    for (i, pfn) in [1u32, 2, 3, 10, 0xffff_ffff].iter().enumerate() {
        put(&mut image, PFNS + 4 * i as u64, &pfn.to_le_bytes());
    }
    let mut input = (image.len() as u16).to_le_bytes().to_vec();
    input.extend_from_slice(&image);
    input.extend_from_slice(&8u16.to_le_bytes());
    let mut op = |write: bool, offset: u16, value: u32| {
        input.push(if write { 0b101 } else { 0b100 });
        input.extend_from_slice(&offset.to_le_bytes());
        input.extend_from_slice(&value.to_le_bytes());
    };
    op(false, 0x000, 0);
    op(true, 0x070, 1 | 2);
    op(true, 0x024, 1);
    op(true, 0x020, 1);
    op(true, 0x070, 1 | 2 | 8);
    for queue in 0..2 {
        op(true, 0x030, queue);
        op(true, 0x038, 16);
        op(true, 0x080, DESC as u32);
        op(true, 0x090, AVAIL as u32);
        op(
            true,
            0x0a0,
            USED as u32 + queue * crate::balloon::USED_STRIDE as u32,
        );
        op(true, 0x044, 1);
    }
    op(true, 0x070, 1 | 2 | 8 | 4);
    op(true, 0x050, 0);
    op(false, 0x060, 0);
    op(true, 0x064, 1);
    op(true, 0x050, 1);
    op(false, 0x100, 0);
    vec![("inflate-deflate", input)]
}

fn decoder_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let insns: [(&str, &[u8]); 9] = [
        ("int3", &[0xcc]),
        ("cld", &[0xfc]),
        ("clac", &[0x0f, 0x01, 0xca]),
        ("int80", &[0xcd, 0x80]),
        ("invpcid", &[0x66, 0x0f, 0x38, 0x82, 0x08]),
        ("ldmxcsr-rip", &[0x0f, 0xae, 0x15, 0x10, 0, 0, 0]),
        (
            "stmxcsr-fs-sib",
            &[0x64, 0x67, 0x0f, 0xae, 0x5c, 0x8b, 0x40],
        ),
        ("endbr64", &[0xf3, 0x0f, 0x1e, 0xfa]),
        ("nopl", &[0x0f, 0x1f, 0x44, 0x00, 0x00]),
    ];
    insns.iter().map(|(n, b)| (*n, b.to_vec())).collect()
}

fn api_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let lines: [(&str, &str); 4] = [
        ("status", "{\"command\":\"status\"}\n"),
        (
            "migrate",
            "{\"command\":\"migrate\",\"uri\":\"unix:/tmp/m.sock\",\"detach\":true}\n",
        ),
        ("balloon", "{\"command\":\"balloon\",\"bytes\":67108864}\n"),
        ("missing-field", "{\"command\":\"migrate-recover\"}\n"),
    ];
    lines
        .iter()
        .map(|(n, l)| {
            let mut v = vec![7u8];
            v.extend_from_slice(l.as_bytes());
            (*n, v)
        })
        .collect()
}

/// Every seed: (target, name, input).
pub fn all() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    type Named = Vec<(&'static str, Vec<u8>)>;
    let per_target: [(&str, Named); 7] = [
        ("stream", stream_seeds()),
        (
            "incoming",
            vec![
                ("precopy", with_flags(0, &precopy())),
                ("postcopy", with_flags(1, &postcopy_incoming())),
            ],
        ),
        ("postcopy", postcopy_seeds()),
        ("snapshot", snapshot_seeds()),
        ("balloon", balloon_seeds()),
        ("decoder", decoder_seeds()),
        ("api", api_seeds()),
    ];
    per_target
        .into_iter()
        .flat_map(|(t, seeds)| seeds.into_iter().map(move |(n, s)| (t, n, s)))
        .collect()
}
