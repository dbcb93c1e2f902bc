//! Precopy between two fake VMs: convergence, stop-and-copy, zero pages, refusals.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::fake_vm::marker_state;
use common::{listen, params, spawn_dest, spawn_source, DestOptions, FakeVm, TempDir, LAYOUT};
use migration::error::MigrationError;
use migration::progress::MigrationState;

/// A source whose every page holds data.
fn filled_source() -> Arc<FakeVm> {
    let vm = FakeVm::new(&LAYOUT);
    for p in 0..vm.total_pages() {
        vm.guest_write(p, false);
    }
    Arc::new(vm)
}

/// `n` pages spread over both regions.
fn spread(vm: &FakeVm, n: usize) -> Vec<usize> {
    let step = vm.total_pages() / n;
    (0..n).map(|i| i * step + i % step).collect()
}

#[test]
fn shrinking_dirty_set_converges() {
    let dir = TempDir::new("converges");
    let src = filled_source();
    // 40, 20, 5 pages, then nothing: precopy stops after three iterations.
    let sets = vec![spread(&src, 40), spread(&src, 20), spread(&src, 5)];
    src.script(sets, None);
    let (ep, listening) = listen(&dir);
    let dest = spawn_dest(listening, DestOptions::default());
    let source = spawn_source(src.clone(), ep, params());
    let (result, status) = source.join().unwrap();
    let dest = dest.join().unwrap();
    result.unwrap();
    dest.result.unwrap();
    assert_eq!(status.state, MigrationState::Completed);
    assert_eq!(status.iteration, 3);
    assert_eq!(
        dest.status.iteration, 3,
        "the destination saw three iteration markers"
    );
    // Three dirty passes, the check that found nothing, and the final one while paused.
    assert_eq!(src.count(|c| &c.fetches), 5);
    assert_eq!(src.count(|c| &c.pauses), 1);
    assert_eq!(
        src.count(|c| &c.resumes),
        0,
        "a migrated source stays paused"
    );
    assert!(!src.dirty_logging());
    assert!(
        dest.vm.ram() == src.ram(),
        "destination RAM differs from the source's"
    );
    assert_eq!(dest.vm.restored(), Some(marker_state()));
    assert_eq!(dest.vm.count(|c| &c.resumes), 1);
}

#[test]
fn dirty_set_that_never_shrinks_stops_at_max_iterations() {
    let dir = TempDir::new("max-iterations");
    let src = filled_source();
    src.script(Vec::new(), Some(spread(&src, 30)));
    let (ep, listening) = listen(&dir);
    let dest = spawn_dest(listening, DestOptions::default());
    let mut p = params();
    p.max_iterations = 4;
    let source = spawn_source(src.clone(), ep, p);
    let (result, status) = source.join().unwrap();
    let dest = dest.join().unwrap();
    result.unwrap();
    dest.result.unwrap();
    assert_eq!(status.state, MigrationState::Completed);
    assert_eq!(status.iteration, 4);
    // Checks at iterations 0..=4, then the final one while paused (the guest writes nothing).
    assert_eq!(src.count(|c| &c.fetches), 6);
    assert_eq!(src.count(|c| &c.pauses), 1);
    // The last dirty set went during the downtime: nothing is lost.
    assert!(
        dest.vm.ram() == src.ram(),
        "destination RAM differs from the source's"
    );
    assert_eq!(dest.vm.count(|c| &c.resumes), 1);
}

#[test]
fn zero_pages_are_not_sent_in_the_first_pass() {
    let dir = TempDir::new("zero-pages");
    let src = FakeVm::new(&LAYOUT);
    let total = src.total_pages();
    // Every third page holds data, every fifth other one was written with zeros, the rest were
    // never touched.
    let (mut data, mut zeroed) = (0u64, 0u64);
    for p in 0..total {
        if p % 3 == 0 {
            src.guest_write(p, false);
            data += 1;
        } else if p % 5 == 0 {
            src.guest_write(p, true);
            zeroed += 1;
        }
    }
    let src = Arc::new(src);
    let (ep, listening) = listen(&dir);
    let dest = spawn_dest(listening, DestOptions::default());
    let mut p = params();
    // Converged at the first check: only the first pass carries pages.
    p.downtime = Duration::from_secs(3600);
    let source = spawn_source(src.clone(), ep, p);
    let (result, status) = source.join().unwrap();
    let dest = dest.join().unwrap();
    result.unwrap();
    dest.result.unwrap();
    assert_eq!(status.iteration, 0);
    assert_eq!(status.pages_full, data);
    assert_eq!(status.pages_zero, total as u64 - data);
    // Pages never populated are not even read.
    assert_eq!(src.count(|c| &c.reads), data + zeroed);
    // Neither data nor a zero marker went for a zero page: the destination wrote only data.
    assert_eq!(dest.status.pages_full, data);
    assert_eq!(dest.status.pages_zero, 0);
    assert_eq!(dest.vm.count(|c| &c.writes), data);
    assert!(
        status.bytes < (data as usize + 64) as u64 * 4096,
        "{} bytes",
        status.bytes
    );
    assert!(
        dest.vm.ram() == src.ram(),
        "destination RAM differs from the source's"
    );
}

#[test]
fn refused_destination_leaves_the_source_running() {
    let dir = TempDir::new("refused");
    let src = filled_source();
    src.script(vec![spread(&src, 10)], None);
    let (ep, listening) = listen(&dir);
    let opts = DestOptions {
        refuse_restore: Some("no room for this guest".into()),
        ..Default::default()
    };
    let dest = spawn_dest(listening, opts);
    let source = spawn_source(src.clone(), ep, params());
    let (result, status) = source.join().unwrap();
    let dest = dest.join().unwrap();
    assert!(dest.result.is_err());
    let err = result.unwrap_err();
    assert!(matches!(err, MigrationError::Rejected(_)), "{err}");
    assert!(err.to_string().contains("no room for this guest"), "{err}");
    // The destination said (Abort) it never ran the guest: this side runs it again.
    assert_eq!(status.state, MigrationState::Failed);
    assert!(status.error.unwrap().contains("no room"));
    assert_eq!(src.count(|c| &c.pauses), 1);
    assert_eq!(src.count(|c| &c.resumes), 1);
    assert!(!src.paused());
    assert!(!src.dirty_logging());
    assert_eq!(dest.vm.count(|c| &c.resumes), 0);
}

#[test]
fn postcopy_refused_at_advise_fails_before_pausing() {
    let dir = TempDir::new("advise-refused");
    let src = filled_source();
    let (ep, listening) = listen(&dir);
    // The destination was not started with postcopy.
    let dest = spawn_dest(listening, DestOptions::default());
    let mut p = params();
    p.postcopy = true;
    let source = spawn_source(src.clone(), ep, p);
    let (result, status) = source.join().unwrap();
    let dest = dest.join().unwrap();
    let err = result.unwrap_err();
    assert!(err.to_string().contains("postcopy is not enabled"), "{err}");
    assert!(dest.result.is_err());
    assert_eq!(status.state, MigrationState::Failed);
    assert_eq!(src.count(|c| &c.pauses), 0, "the guest never stopped");
    assert_eq!(src.count(|c| &c.reads), 0, "no page was sent");
}

#[test]
fn four_channels_carry_every_pass_in_order() {
    let dir = TempDir::new("channels");
    // Six chunks of re-arming and channel assignment (1024 pages each) over two regions.
    let src = FakeVm::new(&[(0, 4096 * 4096), (1 << 32, 1500 * 4096)]);
    for p in 0..src.total_pages() {
        src.guest_write(p, p % 7 == 0);
    }
    let src = Arc::new(src);
    // The same pages rewritten in every pass: a channel that applied an older pass after a newer
    // one would leave a stale version behind.
    let sets = vec![spread(&src, 400), spread(&src, 400), spread(&src, 50)];
    src.script(sets, None);
    let (ep, listening) = listen(&dir);
    let dest = spawn_dest(listening, DestOptions::default());
    let mut p = params();
    p.channels = Some(4);
    let source = spawn_source(src.clone(), ep, p);
    let (result, status) = source.join().unwrap();
    let dest = dest.join().unwrap();
    result.unwrap();
    dest.result.unwrap();
    assert_eq!(status.state, MigrationState::Completed);
    assert_eq!(status.iteration, 3);
    assert!(
        dest.vm.ram() == src.ram(),
        "destination RAM differs from the source's"
    );
    assert_eq!(dest.vm.restored(), Some(marker_state()));
    assert_eq!(
        dest.status.pages_full, status.pages_full,
        "the destination counted the pages of every channel"
    );
}

/// Paced passes: each re-arm waits until the guest had its share of the time since the last
/// one (here 40 faulted pages x 2 ms at 50 %: 160 ms), and the data still arrives whole.
#[test]
fn paced_passes_leave_the_guest_its_share() {
    let dir = TempDir::new("paced");
    let src = filled_source();
    src.script(Vec::new(), Some(spread(&src, 40)));
    let (ep, listening) = listen(&dir);
    let dest = spawn_dest(listening, DestOptions::default());
    let mut p = params();
    p.max_iterations = 4;
    p.pacing = migration::pacing::PassPacing {
        guest_share: 0.5,
        fault_cost: Duration::from_millis(2),
    };
    let started = std::time::Instant::now();
    let source = spawn_source(src.clone(), ep, p);
    let (result, status) = source.join().unwrap();
    let dest = dest.join().unwrap();
    result.unwrap();
    dest.result.unwrap();
    // Five fetches (iterations 0..=4), a wait before each but the first; one more while paused.
    assert_eq!(src.count(|c| &c.fetches), 6, "{status:?}");
    assert!(
        status.paced_ms >= 4.0 * 150.0,
        "waited only {} ms",
        status.paced_ms
    );
    assert!(started.elapsed() >= Duration::from_millis(640));
    assert!(dest.vm.ram() == src.ram(), "destination RAM differs");
}

/// A cancel during a pacing wait ends the migration at once; the source keeps its guest.
#[test]
fn cancel_ends_a_pacing_wait() {
    let dir = TempDir::new("paced-cancel");
    let src = filled_source();
    src.script(Vec::new(), Some(spread(&src, 40)));
    let (ep, listening) = listen(&dir);
    let dest = spawn_dest(listening, DestOptions::default());
    let mut p = params();
    // 40 pages x 1 s at 50 %: 80 s between passes.
    p.pacing = migration::pacing::PassPacing {
        guest_share: 0.5,
        fault_cost: Duration::from_secs(1),
    };
    let status = migration::progress::StatusCell::default();
    let cell = status.clone();
    let vm = src.clone();
    let source = std::thread::spawn(move || migration::outgoing::migrate(&*vm, &ep, &p, &cell));
    // The first fetch comes after pass 0; the second pass is short, then the wait begins.
    while src.count(|c| &c.fetches) < 1 {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    let asked = std::time::Instant::now();
    status.update(|s| s.cancel_requested = true);
    let result = source.join().unwrap();
    assert!(
        matches!(result, Err(MigrationError::Cancelled)),
        "{result:?}"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(
        src.count(|c| &c.fetches),
        1,
        "cancelled within the first wait"
    );
    assert!(!src.paused(), "a cancelled source keeps running its guest");
    assert!(dest.join().unwrap().result.is_err());
}
