//! A RAM channel that keeps sending heartbeats but never finishes its pass: the destination
//! fails the migration within a bound derived from the peer timeout (its own binary: it sets
//! TERN_PEER_TIMEOUT_MS for the whole process).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::scripted::{build_fake, endpoint, filled_source, next_answer, spawn_entry, Writer};
use common::TempDir;
use migration::channels::{ChannelHello, ChannelsRecord, STALL_PEER_TIMEOUTS};
use migration::destination::Options;
use migration::stream::{Section, StreamWriter};
use migration::transport;
use migration::{MigratableVm, MigrationId};

const PEER_TIMEOUT_MS: u64 = 1000;

/// Heartbeats on `w` every 200 ms until `stop`.
fn heartbeats(w: Arc<Mutex<Writer>>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let mut g = w.lock().unwrap();
            if g.section(Section::Heartbeat, &[])
                .and_then(|_| g.flush())
                .is_err()
            {
                return;
            }
            drop(g);
            std::thread::sleep(Duration::from_millis(200));
        }
    })
}

#[test]
fn a_channel_that_only_heartbeats_fails_the_pass_within_the_bound() {
    std::env::set_var("TERN_PEER_TIMEOUT_MS", PEER_TIMEOUT_MS.to_string());
    let dir = TempDir::new("channel-stall");
    let src = filled_source();
    let ep = endpoint(&dir);
    let dest = spawn_entry(&ep, Options::default(), build_fake);
    let id = MigrationId([7; 16]);
    let (mut r, mut w) = common::scripted::scripted_source_of(&ep, &src.config(), id);
    w.record(Section::Channels, &ChannelsRecord { count: 1 })
        .unwrap();
    w.flush().unwrap();
    let mut ch = transport::connect(&ep).unwrap();
    let mut cw = StreamWriter::new(ch.writer.take().unwrap());
    cw.header(id).unwrap();
    cw.record(Section::Channel, &ChannelHello { index: 0 })
        .unwrap();
    cw.flush().unwrap();
    // The main stream says pass 0 is complete; the channel never delivers it, only heartbeats.
    w.record(Section::PassDone, &0u32).unwrap();
    w.flush().unwrap();
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let main = Arc::new(Mutex::new(w));
    let beats = [
        heartbeats(Arc::new(Mutex::new(cw)), stop.clone()),
        heartbeats(main.clone(), stop.clone()),
    ];
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(dest.join());
    });
    let bound = Duration::from_millis(PEER_TIMEOUT_MS * STALL_PEER_TIMEOUTS as u64);
    // Generous slack for a loaded machine; without a deadline it never ends.
    let outcome = rx
        .recv_timeout(bound + Duration::from_secs(20))
        .expect("the destination still waits for the channel's pass");
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for b in beats {
        b.join().unwrap();
    }
    let Err(err) = outcome.unwrap() else {
        panic!("a stalled channel fails the migration")
    };
    assert!(
        err.to_string().contains("delivered nothing of pass 0"),
        "{err}"
    );
    assert!(
        took >= bound,
        "failed after {took:?}, before the bound {bound:?}"
    );
    // The source hears it failed: it keeps its guest.
    let f = next_answer(&mut r);
    assert_eq!(f.kind, Section::Abort, "got {}", f.kind.name());
    drop(main);
}
