//! The migration id: a RAM channel, a preempt channel or a recovery reconnection of another
//! migration is refused and the migration in progress goes on; a recovery peer cannot make the
//! source work beyond guest RAM's size; a recovery's push keeps to its bandwidth limit.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::scripted::{
    build_fake, endpoint, filled_source, missing_ranges, next_answer, reconnecting_source,
    scripted_source_of, send_all_pages, send_marker_state, spawn_entry, Writer, WAIT,
};
use common::{accept, listen, TempDir};
use migration::channels::{ChannelHello, ChannelsRecord};
use migration::destination::{self, DestinationVm, Options};
use migration::postcopy::preempt::AdviseRecord;
use migration::postcopy::{probe_userfaultfd, ranges, DiscardRecord};
use migration::progress::{MigrationState, Role, StatusCell};
use migration::state::EndRecord;
use migration::stream::{RamBatch, Section, StreamReader, StreamWriter};
use migration::transport::{self, Endpoint};
use migration::{MigratableVm, MigrationId, PAGE_SIZE};

const OURS: MigrationId = MigrationId([0xa1; 16]);
const THEIRS: MigrationId = MigrationId([0xb2; 16]);

/// A connection to `ep` that opens with migration `id`'s header.
fn extra_connection(
    ep: &Endpoint,
    id: MigrationId,
) -> (StreamReader<Box<dyn std::io::Read + Send>>, Writer) {
    let mut ch = transport::connect(ep).unwrap();
    let mut w = StreamWriter::new(ch.writer.take().unwrap());
    w.header(id).unwrap();
    (StreamReader::new(ch.reader.take().unwrap()), w)
}

/// Every page as garbage (what an intruder would mix in), then `tail`; written from a thread of
/// its own (the destination reads it only when it accepts the connection, and a refused one
/// breaks the writes).
fn garbage_pages(
    mut w: Writer,
    vm: &FakeVmRef,
    tail: Option<Section>,
) -> std::thread::JoinHandle<Writer> {
    let gpas: Vec<u64> = (0..vm.total_pages()).map(|p| vm.gpa_of(p)).collect();
    std::thread::spawn(move || {
        let mut batch = RamBatch::default();
        let written = (|| {
            for gpa in gpas {
                batch.push_full(gpa, &[0xee; PAGE_SIZE]);
                if batch.len() == RamBatch::PAGES {
                    w.section(Section::Ram, &batch.take())?;
                }
            }
            w.section(Section::Ram, &batch.take())?;
            if let Some(t) = tail {
                w.record(t, &0u32)?;
            }
            w.flush()
        })();
        if let Err(e) = written {
            eprintln!("the intruder's writes ended: {e}");
        }
        w
    })
}

type FakeVmRef = common::FakeVm;

/// The refused peer hears why: an Abort naming both migrations.
fn assert_refused(r: &mut StreamReader<Box<dyn std::io::Read + Send>>) {
    let f = next_answer(r);
    assert_eq!(f.kind, Section::Abort, "got {}", f.kind.name());
    let why: String = f.decode().unwrap();
    assert!(
        why.contains(&THEIRS.hex()) && why.contains(&OURS.hex()),
        "{why}"
    );
}

#[test]
fn a_ram_channel_of_another_migration_is_refused_and_the_migration_completes() {
    let dir = TempDir::new("id-channel");
    let src = filled_source();
    let ep = endpoint(&dir);
    let dest = spawn_entry(&ep, Options::default(), build_fake);
    let (mut r, mut w) = scripted_source_of(&ep, &src.config(), OURS);
    // The intruder connects first, as channel 0, with garbage for every page.
    let (mut ir, mut iw) = extra_connection(&ep, THEIRS);
    iw.record(Section::Channel, &ChannelHello { index: 0 })
        .unwrap();
    let _iw = garbage_pages(iw, &src, Some(Section::PassDone));
    w.record(Section::Channels, &ChannelsRecord { count: 1 })
        .unwrap();
    w.flush().unwrap();
    let (_cr, mut cw) = extra_connection(&ep, OURS);
    cw.record(Section::Channel, &ChannelHello { index: 0 })
        .unwrap();
    let mut batch = RamBatch::default();
    let mut page = vec![0u8; PAGE_SIZE];
    for p in 0..src.total_pages() {
        src.read_ram(src.gpa_of(p), &mut page).unwrap();
        batch.push_full(src.gpa_of(p), &page);
        if batch.len() == RamBatch::PAGES {
            cw.section(Section::Ram, &batch.take()).unwrap();
        }
    }
    cw.section(Section::Ram, &batch.take()).unwrap();
    cw.record(Section::PassDone, &0u32).unwrap();
    cw.flush().unwrap();
    w.record(Section::PassDone, &0u32).unwrap();
    drop(cw);
    send_marker_state(&mut w);
    w.record(Section::End, &EndRecord::default()).unwrap();
    w.flush().unwrap();
    assert_refused(&mut ir);
    assert_eq!(next_answer(&mut r).kind, Section::Resumed);
    let vm = dest.join().unwrap().expect("the destination ran the guest");
    assert!(vm.ram() == src.ram(), "the intruder's pages were mixed in");
    let status = vm.status().get();
    assert_eq!(status.migration_id, Some(OURS));
    let json = serde_json::to_value(&status).unwrap();
    assert_eq!(json["migration_id"], OURS.hex());
}

/// Switches a scripted postcopy of migration OURS with every page missing; returns the VM (it
/// runs), the main stream, and the discard list.
fn postcopy_switched(
    ep: &Endpoint,
    src: &common::FakeVm,
    preempt: bool,
    between: impl FnOnce(),
) -> (
    Arc<common::FakeVm>,
    StreamReader<Box<dyn std::io::Read + Send>>,
    Writer,
    DiscardRecord,
) {
    let dest = spawn_entry(ep, Options { postcopy: true }, build_fake);
    let (mut r, mut w) = scripted_source_of(ep, &src.config(), OURS);
    w.record(Section::Advise, &AdviseRecord { preempt })
        .unwrap();
    w.flush().unwrap();
    let f = next_answer(&mut r);
    assert_eq!(f.kind, Section::Advise);
    assert_eq!(AdviseRecord::decode(&f.payload).preempt, preempt);
    between();
    let all: Vec<usize> = (0..src.total_pages()).collect();
    let discard = DiscardRecord {
        ranges: ranges(&src.ram_regions(), &src.bitmaps(&all)),
    };
    w.record(Section::Discard, &discard).unwrap();
    send_marker_state(&mut w);
    w.record(Section::Run, &EndRecord::default()).unwrap();
    w.flush().unwrap();
    let vm = dest.join().unwrap().expect("the guest runs after RUN");
    (vm, r, w, discard)
}

#[test]
fn a_preempt_channel_of_another_migration_is_refused_and_the_right_one_serves() {
    if let Err(why) = probe_userfaultfd() {
        eprintln!("SKIPPED: no userfaultfd: {why}");
        return;
    }
    let dir = TempDir::new("id-preempt");
    let src = filled_source();
    let ep = endpoint(&dir);
    let mut intruder = None;
    let mut ours = None;
    let (vm, mut r, mut w, _) = postcopy_switched(&ep, &src, true, || {
        let (ir, mut iw) = extra_connection(&ep, THEIRS);
        iw.section(Section::Preempt, &[]).unwrap();
        intruder = Some((ir, garbage_pages(iw, &src, None)));
        let (cr, mut cw) = extra_connection(&ep, OURS);
        cw.section(Section::Preempt, &[]).unwrap();
        cw.flush().unwrap();
        ours = Some((cr, cw));
    });
    let (mut ir, _iw) = intruder.unwrap();
    assert_refused(&mut ir);
    // Every page comes on our preempt channel; the main stream only ends.
    let (_cr, mut cw) = ours.unwrap();
    send_all_pages(&mut cw, &src);
    w.record(Section::End, &EndRecord::default()).unwrap();
    w.flush().unwrap();
    let f = next_answer(&mut r);
    assert_eq!(f.kind, Section::Complete, "got {}", f.kind.name());
    assert!(vm.ram() == src.ram(), "the intruder's pages were mixed in");
}

#[test]
fn a_recovery_from_another_migration_is_refused_and_the_right_source_recovers() {
    if let Err(why) = probe_userfaultfd() {
        eprintln!("SKIPPED: no userfaultfd: {why}");
        return;
    }
    let dir = TempDir::new("id-recover");
    let src = filled_source();
    let ep = endpoint(&dir);
    let (vm, r, w, discard) = postcopy_switched(&ep, &src, false, || {});
    drop((r, w));
    let deadline = Instant::now() + WAIT;
    while vm.status().get().state != MigrationState::PostcopyPaused {
        assert!(Instant::now() < deadline, "{:?}", vm.status().get());
        std::thread::sleep(Duration::from_millis(1));
    }
    let ep2 = Endpoint::Unix {
        path: dir.0.join("recover.sock"),
        local: false,
    };
    destination::recover::listen(vm.clone(), ep2.clone()).unwrap();
    // Another migration's source, with a VM of the same layout: refused, told why.
    let (mut fr, _fw) = reconnecting_source(&ep2, THEIRS, &src.config());
    assert_refused(&mut fr);
    assert_eq!(vm.status().get().state, MigrationState::PostcopyRecover);
    // The right one recovers afterwards, on the same endpoint.
    let (mut r, mut w) = reconnecting_source(&ep2, OURS, &src.config());
    let missing = missing_ranges(&mut r);
    assert_eq!(missing, discard.ranges, "the refused peer placed nothing");
    send_all_pages(&mut w, &src);
    assert_eq!(next_answer(&mut r).kind, Section::Complete);
    assert_eq!(vm.status().get().state, MigrationState::Completed);
    assert!(
        vm.ram() == src.ram(),
        "destination RAM differs from the source's"
    );
}

/// A source paused in postcopy (migration OURS), recovering towards a scripted destination on
/// its own thread: the result, how long it took, and the final status.
fn recovering_source(
    dir: &TempDir,
    bandwidth: Option<u64>,
    destination: impl FnOnce(StreamReader<Box<dyn std::io::Read + Send>>, Writer) + Send + 'static,
) -> (Result<(), migration::error::MigrationError>, Duration) {
    let src = filled_source();
    let (ep, listening) = listen(dir);
    let status = StatusCell::default();
    status.update(|s| {
        s.state = MigrationState::PostcopyPaused;
        s.role = Role::Source;
        s.migration_id = Some(OURS);
    });
    let source = std::thread::spawn(move || {
        let t0 = Instant::now();
        let r = migration::postcopy::recover::recover(&*src, &ep, &status, bandwidth);
        (r, t0.elapsed())
    });
    let mut ch = accept(&listening);
    let mut r = StreamReader::new(ch.reader.take().unwrap());
    assert_eq!(r.header().unwrap(), OURS, "the reconnection carries the id");
    assert_eq!(r.read_section().unwrap().kind, Section::Recover);
    let w = StreamWriter::new(ch.writer.take().unwrap());
    let dest = std::thread::spawn(move || destination(r, w));
    let out = source.join().unwrap();
    let _ = dest.join();
    out
}

#[test]
fn a_recovery_peer_claiming_more_than_guest_ram_is_refused_quickly() {
    let dir = TempDir::new("id-hostile-missing");
    let all = LAYOUT_RUNS.to_vec();
    let (result, took) = recovering_source(&dir, None, move |_r, mut w| {
        // 50 000 runs of whole regions per section, over and over: hours of bit setting.
        let ranges: Vec<(u64, u64)> = all.iter().cycle().take(50_000).copied().collect();
        for _ in 0..20 {
            let sent = w
                .record(
                    Section::Missing,
                    &DiscardRecord {
                        ranges: ranges.clone(),
                    },
                )
                .and_then(|_| w.flush());
            if sent.is_err() {
                return;
            }
        }
    });
    let err = result.expect_err("a peer claiming more pages than RAM is refused");
    assert!(
        err.to_string()
            .contains("more missing pages than guest RAM"),
        "{err}"
    );
    assert!(took < Duration::from_secs(5), "refused after {took:?}");
}

/// The fake layout as runs of whole regions (gpa, pages).
const LAYOUT_RUNS: [(u64, u64); 2] = [
    (common::LAYOUT[0].0, common::LAYOUT[0].1 / PAGE_SIZE as u64),
    (common::LAYOUT[1].0, common::LAYOUT[1].1 / PAGE_SIZE as u64),
];

#[test]
fn a_recovered_push_keeps_to_the_postcopy_bandwidth() {
    let dir = TempDir::new("id-recover-bw");
    let pages: u64 = LAYOUT_RUNS.iter().map(|r| r.1).sum();
    let rate = 1u64 << 20;
    let (result, took) = recovering_source(&dir, Some(rate), move |mut r, mut w| {
        w.record(
            Section::Missing,
            &DiscardRecord {
                ranges: LAYOUT_RUNS.to_vec(),
            },
        )
        .unwrap();
        w.section(Section::Recover, &[]).unwrap();
        w.flush().unwrap();
        loop {
            match r.read_section() {
                Ok(f) if f.kind == Section::End => break,
                Ok(_) => {}
                Err(e) => panic!("the recovered push broke: {e}"),
            }
        }
        w.record(
            Section::Complete,
            &serde_json::json!({ "downtime_ms": 0.0 }),
        )
        .unwrap();
        w.flush().unwrap();
    });
    result.expect("the recovery completes");
    // 320 pages (1.3 MB) at 1 MiB/s: about 1.25 s; unlimited it takes milliseconds.
    let floor = Duration::from_secs_f64(0.8 * (pages * PAGE_SIZE as u64) as f64 / rate as f64);
    assert!(
        took >= floor,
        "pushed {pages} pages in {took:?} (at most {rate} B/s: >= {floor:?})"
    );
}
