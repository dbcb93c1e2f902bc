//! Postcopy between two fake VMs (the destination's RAM under a real userfaultfd), and against a
//! scripted destination for what a real one never sends.

mod common;

use std::sync::Arc;

use common::fake_vm::marker_state;
use common::{
    accept, listen, params, spawn_dest, spawn_source, DestOptions, FakeVm, TempDir, LAYOUT,
};
use migration::postcopy::preempt::AdviseRecord;
use migration::postcopy::{probe_userfaultfd, ranges, DiscardRecord, PageRefusal, PageRequest};
use migration::progress::MigrationState;
use migration::stream::{parse_ram, PageRecord, Section, StreamReader, StreamWriter};
use migration::{MigratableVm, PAGE_SIZE};

/// Postcopy needs userfaultfd; this machine has it (docs/machine-kvm.md), so a missing one is
/// reported loudly rather than failing every postcopy test the same way.
fn userfaultfd_or_skip(test: &str) -> bool {
    match probe_userfaultfd() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("SKIPPED {test}: postcopy needs userfaultfd here: {why}");
            false
        }
    }
}

fn source_with_data() -> Arc<FakeVm> {
    let vm = FakeVm::new(&LAYOUT);
    // Most pages hold data; some were written with zeros (they travel as zero markers).
    for p in 0..vm.total_pages() {
        vm.guest_write(p, p % 7 == 3);
    }
    Arc::new(vm)
}

/// Returns how long the source took (None if skipped).
fn pure_postcopy(name: &str, preempt: bool, bandwidth: Option<u64>) -> Option<std::time::Duration> {
    pure_postcopy_over(name, preempt, bandwidth, 0)
}

/// [`pure_postcopy`] with the push over `channels` RAM channels (0: the main connection).
fn pure_postcopy_over(
    name: &str,
    preempt: bool,
    bandwidth: Option<u64>,
    channels: usize,
) -> Option<std::time::Duration> {
    if !userfaultfd_or_skip(name) {
        return None;
    }
    let dir = TempDir::new(name);
    let src = source_with_data();
    let total = src.total_pages();
    // Pages a "vCPU" reads on the destination while they are still missing there. (The RAM
    // channels place pages from RUN on, before this harness could make its threads fault: with
    // them nothing is touched, the requests are the vmm tests'.)
    let touch = if channels == 0 {
        vec![src.gpa_of(5), src.gpa_of(200), src.gpa_of(total - 1)]
    } else {
        Vec::new()
    };
    let (ep, listening) = listen(&dir);
    let opts = DestOptions {
        postcopy: true,
        touch: touch.clone(),
        ..Default::default()
    };
    let dest = spawn_dest(listening, opts);
    let mut p = params();
    p.postcopy = true;
    p.postcopy_after_iterations = Some(0);
    p.postcopy_preempt = preempt;
    p.postcopy_bandwidth = bandwidth;
    p.channels = Some(channels);
    let started = std::time::Instant::now();
    let source = spawn_source(src.clone(), ep, p);
    let (result, status) = source.join().unwrap();
    let took = started.elapsed();
    let dest = dest.join().unwrap();
    result.unwrap();
    dest.result.unwrap();
    assert_eq!(status.state, MigrationState::Completed);
    assert_eq!(src.count(|c| &c.pauses), 1);
    assert_eq!(src.count(|c| &c.resumes), 0);
    let pc = dest
        .postcopy
        .expect("the destination went through postcopy");
    // Nothing was sent before RUN: every page of both regions was missing there.
    let all: Vec<usize> = (0..total).collect();
    if channels == 0 {
        assert_eq!(
            pc.missing_at_run,
            ranges(&src.ram_regions(), &src.bitmaps(&all))
        );
    }
    assert_eq!(pc.figures.missing_at_switch, total as u64);
    // Every page placed once: requested (each touched page, once) or pushed.
    assert_eq!(pc.figures.pages_requested, touch.len() as u64);
    assert_eq!(
        pc.figures.pages_requested + pc.figures.pages_pushed,
        total as u64
    );
    assert_eq!(pc.figures.faults, touch.len() as u64);
    let figures = status.postcopy.expect("the source got the figures");
    let own = figures.source.expect("the source's own figures");
    let (requested, pushed) = (own.source_pages_requested, own.source_pages_pushed);
    assert_eq!(
        requested + pushed,
        total as u64,
        "each page sent exactly once"
    );
    assert_eq!(status.channels, channels as u32);
    for (gpa, page) in &pc.touched {
        let mut want = vec![0u8; PAGE_SIZE];
        src.read_ram(*gpa, &mut want).unwrap();
        assert!(page == &want, "the vCPU read the wrong page at {gpa:#x}");
    }
    assert!(
        dest.vm.ram() == src.ram(),
        "destination RAM differs from the source's"
    );
    assert_eq!(dest.vm.restored(), Some(marker_state()));
    Some(took)
}

#[test]
fn pure_postcopy_places_every_page() {
    pure_postcopy("pure-postcopy", false, None);
}

#[test]
fn pure_postcopy_over_two_channels_places_every_page() {
    pure_postcopy_over("pure-postcopy-channels", true, None, 2);
}

#[test]
fn pure_postcopy_over_three_channels_without_preempt_places_every_page() {
    pure_postcopy_over("pure-postcopy-channels-main", false, None, 3);
}

/// The bandwidth limit holds over the sum of the channels.
#[test]
fn limited_postcopy_push_over_channels_keeps_its_rate() {
    let pages = FakeVm::new(&LAYOUT).total_pages() as u64;
    let rate = pages * PAGE_SIZE as u64;
    if let Some(took) = pure_postcopy_over("limited-postcopy-channels", true, Some(rate), 2) {
        assert!(
            took >= std::time::Duration::from_millis(800),
            "{pages} pages at {rate} B/s over two channels went in {took:?}"
        );
    }
}

#[test]
fn pure_postcopy_with_preempt_channel_places_every_page() {
    pure_postcopy("pure-postcopy-preempt", true, None);
}

/// `postcopy_bandwidth` holds the background push to its rate (a lower bound on the time: the
/// push cannot be faster than the limit), and every page still arrives.
#[test]
fn limited_postcopy_push_keeps_its_rate_and_places_every_page() {
    let pages = FakeVm::new(&LAYOUT).total_pages() as u64;
    // The whole RAM at this rate takes one second; 6 pages in 7 hold data (the rest go as
    // zero markers, which cost next to nothing), so the push cannot take less than ~0.85 s.
    let rate = pages * PAGE_SIZE as u64;
    if let Some(took) = pure_postcopy("limited-postcopy", true, Some(rate)) {
        assert!(
            took >= std::time::Duration::from_millis(800),
            "{pages} pages at {rate} B/s went in {took:?}"
        );
    }
}

#[test]
fn discard_list_is_what_the_destination_misses() {
    if !userfaultfd_or_skip("discard_list_is_what_the_destination_misses") {
        return;
    }
    let dir = TempDir::new("discard");
    let src = source_with_data();
    let total = src.total_pages();
    // Two precopy iterations resend their sets; the set dirtied after the last one is what the
    // destination holds stale at the switch. It overlaps the earlier ones and spans both regions.
    let last: Vec<usize> = vec![1, 2, 3, 10, 100, 255, 256, 257, total - 1];
    src.script(
        vec![vec![1, 2, 50, 256], (0..20).collect(), last.clone()],
        None,
    );
    let (ep, listening) = listen(&dir);
    let opts = DestOptions {
        postcopy: true,
        ..Default::default()
    };
    let dest = spawn_dest(listening, opts);
    let mut p = params();
    p.postcopy = true;
    p.postcopy_after_iterations = Some(2);
    let source = spawn_source(src.clone(), ep, p);
    let (result, status) = source.join().unwrap();
    let dest = dest.join().unwrap();
    result.unwrap();
    dest.result.unwrap();
    assert_eq!(status.iteration, 2);
    let pc = dest
        .postcopy
        .expect("the destination went through postcopy");
    // Sent (every page, by the first pass) masked with the last dirty set: exactly that set.
    let expected = ranges(&src.ram_regions(), &src.bitmaps(&last));
    // Runs 1-3, 10, 100, 255 | 256-257, 319: a run never crosses the gap between regions.
    assert_eq!(expected.len(), 6);
    assert_eq!(pc.missing_at_run, expected);
    assert_eq!(pc.figures.missing_at_switch, last.len() as u64);
    assert_eq!(pc.figures.pages_pushed, last.len() as u64);
    assert!(
        dest.vm.ram() == src.ram(),
        "destination RAM differs from the source's"
    );
}

/// A destination that speaks the protocol by hand: accepts ADVISE, asks for a page outside RAM,
/// collects what the source answers, and confirms completion.
#[test]
fn page_request_outside_ram_is_refused() {
    let dir = TempDir::new("page-refused");
    let src = source_with_data();
    let total = src.total_pages();
    let (ep, listening) = listen(&dir);
    let mut p = params();
    p.postcopy = true;
    p.postcopy_after_iterations = Some(0);
    let source = spawn_source(src.clone(), ep, p);

    let mut ch = accept(&listening);
    let mut r = StreamReader::new(ch.reader.take().unwrap());
    let mut w = StreamWriter::new(ch.writer.take().unwrap());
    r.header().unwrap();
    r.read_section().unwrap().expect(Section::Config).unwrap();
    r.read_section().unwrap().expect(Section::Advise).unwrap();
    w.record(Section::Advise, &AdviseRecord { preempt: false })
        .unwrap();
    w.flush().unwrap();
    let discard: DiscardRecord = r
        .read_section()
        .unwrap()
        .expect(Section::Discard)
        .unwrap()
        .decode()
        .unwrap();
    assert_eq!(
        discard.ranges.iter().map(|r| r.1).sum::<u64>(),
        total as u64
    );
    while r.read_section().unwrap().kind != Section::Run {}
    // The push may already have ended (the socket buffers can hold this small guest): the
    // source answers the request during its push or while it waits for completion.
    let outside = 1u64 << 40;
    w.record(Section::PageRequest, &PageRequest { gpa: outside })
        .unwrap();
    w.flush().unwrap();
    let (mut refusals, mut pages) = (Vec::new(), Vec::new());
    loop {
        let f = r.read_section().unwrap();
        match f.kind {
            Section::Ram => {
                for rec in parse_ram(&f.payload) {
                    pages.push(match rec.unwrap() {
                        PageRecord::Full(gpa, _) | PageRecord::Zero(gpa) => gpa,
                    });
                }
            }
            // Consecutive full pages of the push: gpa u64, count u32, the pages.
            Section::RamRun => {
                let gpa = u64::from_le_bytes(f.payload[..8].try_into().unwrap());
                let n = u32::from_le_bytes(f.payload[8..12].try_into().unwrap()) as u64;
                assert_eq!(f.payload.len() as u64, 12 + n * PAGE_SIZE as u64);
                pages.extend((0..n).map(|i| gpa + i * PAGE_SIZE as u64));
            }
            Section::PageRefused => refusals.push(f.decode::<PageRefusal>().unwrap()),
            Section::Heartbeat => {}
            Section::End => break,
            other => panic!("unexpected {} section", other.name()),
        }
    }
    // A refusal that crossed END comes after it.
    while refusals.is_empty() {
        let f = r.read_section().unwrap();
        match f.kind {
            Section::PageRefused => refusals.push(f.decode::<PageRefusal>().unwrap()),
            Section::Heartbeat => {}
            other => panic!("unexpected {} section after END", other.name()),
        }
    }
    w.record(
        Section::Complete,
        &serde_json::json!({ "downtime_ms": 0.0 }),
    )
    .unwrap();
    w.flush().unwrap();
    let (result, status) = source.join().unwrap();

    assert_eq!(refusals.len(), 1);
    assert_eq!(refusals[0].gpa, outside);
    assert_eq!(refusals[0].reason, "outside guest RAM");
    // A refusal is an answer, not a failure: the source pushed every page once and completed.
    pages.sort_unstable();
    let all: Vec<u64> = (0..total).map(|p| src.gpa_of(p)).collect();
    assert_eq!(pages, all);
    result.unwrap();
    assert_eq!(status.state, MigrationState::Completed);
}
