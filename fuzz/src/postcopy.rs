//! The postcopy destination after an accepted ADVISE: the discard list (checked, then applied to
//! RAM registered with userfaultfd), the state and RUN, then what the source sends while the
//! guest runs (page batches, heartbeats, refusals, the end).

use std::sync::{Mutex, Once, OnceLock};

use migration::incoming::Options;
use migration::postcopy::preempt::AdviseRecord;
use migration::postcopy::DiscardRecord;
use migration::state::{EndRecord, VcpuState};
use migration::stream::Section;
use migration::{MigratableVm, VmState, PAGE_SIZE};

use crate::bytes::{json, sections, stream, Bytes};
use crate::fake_vm::{FakeVm, LAYOUT};

/// A stream that ends before every page arrived waits this long for pages still on their way
/// (the default, 15 s, is for real peers).
pub fn quick_peer_timeout() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| std::env::set_var("TERN_PEER_TIMEOUT_MS", "1"));
}

/// The sections a source sends before its discard list, and the state before RUN.
struct Fixed {
    config: Vec<u8>,
    state: Vec<(u8, Vec<u8>)>,
}

fn fixed() -> &'static Fixed {
    static FIXED: OnceLock<Fixed> = OnceLock::new();
    FIXED.get_or_init(|| {
        // A small state (one vCPU, defaults): decoding it is not what this target is for.
        let s = VmState {
            vcpus: vec![VcpuState::default()],
            ..VmState::default()
        };
        Fixed {
            config: json(&FakeVm::new(&LAYOUT).config()),
            state: vec![
                (Section::Vcpus as u8, json(&s.vcpus)),
                (Section::Clock as u8, json(&s.clock)),
                (
                    Section::Irqchip as u8,
                    json(&(s.pic_master, s.pic_slave, s.ioapic)),
                ),
                (Section::Pit as u8, json(&s.pit)),
                (Section::Devices as u8, json(&s.devices)),
            ],
        }
    })
}

/// Guest address of global page `page` of the fake layout (wrapping past its end).
pub fn page_gpa(page: u64) -> u64 {
    let total: u64 = LAYOUT.iter().map(|(_, len)| len / PAGE_SIZE as u64).sum();
    let mut page = page % total;
    for (gpa, len) in LAYOUT {
        let pages = len / PAGE_SIZE as u64;
        if page < pages {
            return gpa + page * PAGE_SIZE as u64;
        }
        page -= pages;
    }
    unreachable!("page taken modulo the total")
}

/// Input: flags (bit 0: discard runs are raw (gpa u64, count u64) rather than (page u16,
/// count u16 below 64); bit 1: no state sections before RUN), a run count (below 16), the runs,
/// then sections for [`sections`]: what follows RUN.
pub fn run(data: &[u8]) {
    let _ = receive(data);
}

/// As [`run`], saying how the destination ended.
pub fn receive(data: &[u8]) -> Result<&'static str, String> {
    let mut b = Bytes::new(data);
    let flags = b.u8();
    let runs = b.u8() % 16;
    let ranges = (0..runs)
        .map(|_| {
            if flags & 1 != 0 {
                (b.u64(), b.u64())
            } else {
                (page_gpa(u64::from(b.u16())), u64::from(b.u16() % 64))
            }
        })
        .collect();
    let f = fixed();
    let mut s = vec![
        (Section::Config as u8, f.config.clone()),
        (
            Section::Advise as u8,
            json(&AdviseRecord { preempt: false }),
        ),
        (Section::Discard as u8, json(&DiscardRecord { ranges })),
    ];
    if flags & 2 == 0 {
        s.extend(f.state.iter().cloned());
    }
    s.push((Section::Run as u8, json(&EndRecord::default())));
    s.extend(sections(b.rest()));
    let options = Options {
        postcopy: true,
        vcpu_tids: Vec::new(),
        local: false,
        shared_ram: false,
        preempt: Mutex::new(None),
        id: Default::default(),
    };
    crate::incoming::receive(stream(&s), &options)
}
