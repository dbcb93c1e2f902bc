//! The destination's one entry (`destination::receive`) end to end against the real source: it
//! accepts, has the test's builder make a [`FakeVm`], receives, resumes, answers, and (postcopy)
//! finishes in the background; a builder that fails makes the source hear why; a postcopy whose
//! source vanishes pauses, parks its listener and recovers.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fake_vm::marker_state;
use common::{params, spawn_source, FakeVm, TempDir, LAYOUT};
use migration::destination::{self, DestinationError, DestinationVm, Options};
use migration::error::MigrationError;
use migration::postcopy::preempt::AdviseRecord;
use migration::postcopy::{probe_userfaultfd, ranges, CompleteRecord, DiscardRecord};
use migration::progress::{MigrationState, Phase, Role};
use migration::state::{EndRecord, LocalRamRecord};
use migration::stream::{Section, StreamWriter};
use migration::transport::{self, Endpoint};
use migration::MigratableVm;

use common::scripted::{
    build_fake, endpoint, filled_source, missing_ranges, next_answer, reconnecting_source,
    scripted_source, send_all_pages, send_marker_state, spawn_entry, WAIT,
};

#[test]
fn entry_receives_a_precopy_and_the_source_hears_it_resumed() {
    let dir = TempDir::new("entry-precopy");
    let src = filled_source();
    src.script(vec![vec![3, 90, 300]], None);
    let ep = endpoint(&dir);
    let dest = spawn_entry(&ep, Options::default(), build_fake);
    let (result, status) = spawn_source(src.clone(), ep.clone(), params())
        .join()
        .unwrap();
    let vm = dest.join().unwrap().expect("the destination ran the guest");
    result.expect("the source heard Resumed");
    assert_eq!(status.state, MigrationState::Completed);
    assert!(
        vm.ram() == src.ram(),
        "destination RAM differs from the source's"
    );
    assert_eq!(vm.restored(), Some(marker_state()));
    assert_eq!(vm.count(|c| &c.resumes), 1);
    let dst = vm.status().get();
    assert_eq!(dst.state, MigrationState::Completed);
    assert_eq!(dst.role, Role::Destination);
    assert_eq!(dst.endpoint, ep.to_string());
    assert_eq!(dst.iteration, 1);
    // Zero pages of the first pass are not sent (the source still counts them).
    assert_eq!(dst.pages_full, status.pages_full);
    // The API shows the role as before it was an enum.
    let json = serde_json::to_value(&dst).unwrap();
    assert_eq!(json["role"], "destination");
    assert_eq!(serde_json::to_value(&status).unwrap()["role"], "source");
}

#[test]
fn failing_builder_aborts_the_source_and_the_entry_says_why() {
    let dir = TempDir::new("entry-build-fails");
    let ep = endpoint(&dir);
    let dest = spawn_entry(&ep, Options::default(), |_| {
        Err(std::io::Error::other("no KVM for this guest"))
    });
    let (mut r, _w) = scripted_source(&ep, &FakeVm::new(&LAYOUT).config());
    let Err(err) = dest.join().unwrap() else {
        panic!("the entry reported success")
    };
    assert!(matches!(err, DestinationError::Build(_)), "{err:?}");
    assert_eq!(err.to_string(), "incoming migration: no KVM for this guest");
    // The source hears the same words in an Abort (after any heartbeats).
    let abort = loop {
        let f = r.read_section().unwrap();
        if f.kind != Section::Heartbeat {
            break f;
        }
    };
    assert_eq!(abort.kind, Section::Abort);
    assert_eq!(abort.decode::<String>().unwrap(), err.to_string());
}

#[test]
fn local_memory_without_a_shared_configuration_is_refused_before_building() {
    let dir = TempDir::new("entry-local-refused");
    let ep = endpoint(&dir);
    let dest = spawn_entry(&ep, Options::default(), |_| -> Result<Arc<FakeVm>, _> {
        panic!("the builder ran for a stream it must refuse")
    });
    let record = FakeVm::new(&LAYOUT).config();
    let mut ch = transport::connect(&ep).unwrap();
    let mut w = StreamWriter::new(ch.writer.take().unwrap());
    w.header(Default::default()).unwrap();
    w.record(
        Section::LocalRam,
        &LocalRamRecord {
            regions: record.ram.clone(),
        },
    )
    .unwrap();
    w.record(Section::Config, &record).unwrap();
    w.flush().unwrap();
    let Err(err) = dest.join().unwrap() else {
        panic!("the entry reported success")
    };
    assert!(matches!(err, DestinationError::Incompatible(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains("local memory section names regions"),
        "{err}"
    );
    drop(w);
}

#[test]
fn failing_restore_aborts_the_source() {
    let dir = TempDir::new("entry-restore-fails");
    let src = filled_source();
    let ep = endpoint(&dir);
    let dest = spawn_entry(&ep, Options::default(), |record| {
        let mut vm = FakeVm::from_record(record);
        vm.refuse_restore = Some("the vCPU state does not fit".into());
        Ok(Arc::new(vm))
    });
    let (result, status) = spawn_source(src.clone(), ep, params()).join().unwrap();
    let Err(err) = dest.join().unwrap() else {
        panic!("the entry reported success")
    };
    assert!(matches!(err, DestinationError::Vm(_)), "{err:?}");
    let sent = result.unwrap_err();
    assert!(matches!(sent, MigrationError::Rejected(_)), "{sent}");
    assert!(sent.to_string().contains("does not fit"), "{sent}");
    assert_eq!(status.state, MigrationState::Failed);
    assert_eq!(
        src.count(|c| &c.resumes),
        1,
        "the source runs its guest again"
    );
}

#[test]
fn entry_finishes_a_postcopy_in_the_background() {
    if let Err(why) = probe_userfaultfd() {
        eprintln!("SKIPPED entry_finishes_a_postcopy_in_the_background: no userfaultfd: {why}");
        return;
    }
    let dir = TempDir::new("entry-postcopy");
    let src = filled_source();
    let ep = endpoint(&dir);
    let dest = spawn_entry(&ep, Options { postcopy: true }, build_fake);
    let mut p = params();
    p.postcopy = true;
    p.postcopy_after_iterations = Some(0);
    let source = spawn_source(src.clone(), ep, p);
    // The entry returns once the guest runs, pages still missing.
    let vm = dest.join().unwrap().expect("the destination ran the guest");
    assert_eq!(vm.count(|c| &c.resumes), 1);
    let (result, status) = source.join().unwrap();
    result.expect("the source heard Complete");
    assert_eq!(status.state, MigrationState::Completed);
    let figures = status
        .postcopy
        .expect("the source got the destination's figures");
    assert_eq!(
        figures.complete.figures.missing_at_switch,
        src.total_pages() as u64
    );
    let pushed = figures.source.expect("the source's own figures");
    assert!(
        pushed.source_pages_pushed + pushed.source_pages_requested >= src.total_pages() as u64,
        "{pushed:?}"
    );
    // The Complete section is written just after the status says END.
    let deadline = Instant::now() + WAIT;
    let dst = loop {
        let s = vm.status().get();
        if s.state != MigrationState::Active || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(dst.state, MigrationState::Completed);
    assert_eq!(dst.phase, Phase::End);
    assert_eq!(dst.remaining_bytes, 0);
    assert!(!vm.parked());
    assert!(
        vm.ram() == src.ram(),
        "destination RAM differs from the source's"
    );
    assert_eq!(vm.restored(), Some(marker_state()));
}

/// A source by hand that switches to postcopy with every page missing and then vanishes: the
/// guest pauses on the destination with its listener parked. `migrate-recover` (recover::listen)
/// then takes a second source's reconnection, says what is missing, places what comes and
/// completes.
#[test]
fn broken_postcopy_parks_the_listener_and_recovers() {
    if let Err(why) = probe_userfaultfd() {
        eprintln!("SKIPPED broken_postcopy_parks_the_listener_and_recovers: {why}");
        return;
    }
    let dir = TempDir::new("entry-recover");
    let src = filled_source();
    let ep = endpoint(&dir);
    let dest = spawn_entry(&ep, Options { postcopy: true }, build_fake);
    let (mut r, mut w) = scripted_source(&ep, &src.config());
    w.record(Section::Advise, &AdviseRecord { preempt: false })
        .unwrap();
    w.flush().unwrap();
    assert_eq!(next_answer(&mut r).kind, Section::Advise);
    let all: Vec<usize> = (0..src.total_pages()).collect();
    let discard = DiscardRecord {
        ranges: ranges(&src.ram_regions(), &src.bitmaps(&all)),
    };
    w.record(Section::Discard, &discard).unwrap();
    let state = marker_state();
    send_marker_state(&mut w);
    w.record(Section::Run, &EndRecord::default()).unwrap();
    w.flush().unwrap();
    let vm = dest.join().unwrap().expect("the guest runs after RUN");
    assert_eq!(vm.restored(), Some(state));
    // The source is gone: the listen thread pauses the guest and keeps what it has.
    drop((r, w));
    let deadline = Instant::now() + WAIT;
    while vm.status().get().state != MigrationState::PostcopyPaused {
        assert!(Instant::now() < deadline, "{:?}", vm.status().get());
        std::thread::sleep(Duration::from_millis(1));
    }
    let paused = vm.status().get();
    assert!(paused.error.unwrap().contains("postcopy broke"));
    assert!(vm.parked());
    assert!(vm.count(|c| &c.pauses) >= 1);

    // migrate-recover on a new socket; a second recovery at once is refused.
    let ep2 = Endpoint::Unix {
        path: dir.0.join("recover.sock"),
        local: false,
    };
    destination::recover::listen(vm.clone(), ep2.clone()).unwrap();
    let again = destination::recover::listen(vm.clone(), ep2.clone()).unwrap_err();
    assert!(again.to_string().contains("postcopy-recover"), "{again}");
    assert!(!vm.parked());
    let (mut r, mut w) = reconnecting_source(&ep2, Default::default(), &src.config());
    let missing = missing_ranges(&mut r);
    assert_eq!(missing, discard.ranges, "nothing arrived before the break");
    send_all_pages(&mut w, &src);
    // The guest touched nothing, so no page request comes first: Complete is next.
    let f = next_answer(&mut r);
    assert_eq!(f.kind, Section::Complete, "got {}", f.kind.name());
    let complete: CompleteRecord = f.decode().unwrap();
    assert_eq!(complete.figures.missing_at_switch, src.total_pages() as u64);
    let done = vm.status().get();
    assert_eq!(done.state, MigrationState::Completed);
    assert_eq!(done.recovered_pages, src.total_pages() as u64);
    assert!(
        vm.count(|c| &c.resumes) >= 2,
        "resumed after RUN and after recovery"
    );
    assert!(
        vm.ram() == src.ram(),
        "destination RAM differs from the source's"
    );
}
