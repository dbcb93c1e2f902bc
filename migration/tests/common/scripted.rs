//! Sources by hand and the destination's entry on a thread, for tests that script one side.

use std::io::{Read, Write};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use migration::destination::{self, DestinationError, DestinationVm, Options};
use migration::postcopy::DiscardRecord;
use migration::state::EndRecord;
use migration::stream::{RamBatch, Section, StreamReader, StreamWriter};
use migration::transport::{self, Endpoint};
use migration::{MigratableVm, MigrationId, PAGE_SIZE};

use super::fake_vm::marker_state;
use super::{FakeVm, TempDir, LAYOUT};

pub const WAIT: Duration = Duration::from_secs(30);

/// The device state package of [`marker_state`], as a source sends it before END or RUN.
pub fn send_marker_state(w: &mut Writer) {
    let state = marker_state();
    w.record(Section::Vcpus, &state.vcpus).unwrap();
    w.record(Section::Clock, &state.clock).unwrap();
    w.record(
        Section::Irqchip,
        &(&state.pic_master, &state.pic_slave, &state.ioapic),
    )
    .unwrap();
    w.record(Section::Pit, &state.pit).unwrap();
    w.record(Section::Devices, &state.devices).unwrap();
}

pub fn filled_source() -> Arc<FakeVm> {
    let vm = FakeVm::new(&LAYOUT);
    for p in 0..vm.total_pages() {
        vm.guest_write(p, p % 5 == 1);
    }
    Arc::new(vm)
}

pub fn endpoint(dir: &TempDir) -> Endpoint {
    Endpoint::Unix {
        path: dir.0.join("mig.sock"),
        local: false,
    }
}

/// The entry on its own thread with `build`; returns once its socket exists (the entry binds it
/// itself, and a source connecting before that would find nobody).
pub fn spawn_entry<B>(
    ep: &Endpoint,
    options: Options,
    build: B,
) -> JoinHandle<Result<Arc<FakeVm>, DestinationError>>
where
    B: FnOnce(&migration::VmConfigRecord) -> Result<Arc<FakeVm>, std::io::Error> + Send + 'static,
{
    let Endpoint::Unix { path, .. } = ep.clone() else {
        unreachable!("the tests listen on Unix sockets")
    };
    let ep = ep.clone();
    let entry = std::thread::spawn(move || {
        destination::receive(&ep, &options, |record, handed_over| {
            assert!(handed_over.is_none(), "nothing was handed over");
            let vm = build(record)?;
            let driven: Arc<dyn DestinationVm> = vm.clone();
            Ok::<_, std::io::Error>((vm, driven))
        })
    });
    let deadline = Instant::now() + WAIT;
    while !path.exists() {
        assert!(Instant::now() < deadline, "the entry never listened");
        std::thread::sleep(Duration::from_millis(1));
    }
    entry
}

pub fn build_fake(record: &migration::VmConfigRecord) -> Result<Arc<FakeVm>, std::io::Error> {
    Ok(Arc::new(FakeVm::from_record(record)))
}

pub type Writer = StreamWriter<Box<dyn Write + Send>>;

/// A source by hand: the header and the configuration; the caller reads the return path (and
/// keeps the writer, so the destination's answer does not meet a closed connection).
pub fn scripted_source(
    ep: &Endpoint,
    record: &migration::VmConfigRecord,
) -> (StreamReader<Box<dyn Read + Send>>, Writer) {
    scripted_source_of(ep, record, MigrationId::default())
}

/// [`scripted_source`] of migration `id`.
pub fn scripted_source_of(
    ep: &Endpoint,
    record: &migration::VmConfigRecord,
    id: MigrationId,
) -> (StreamReader<Box<dyn Read + Send>>, Writer) {
    let mut ch = transport::connect(ep).unwrap();
    let mut w = StreamWriter::new(ch.writer.take().unwrap());
    w.header(id).unwrap();
    w.record(Section::Config, record).unwrap();
    w.flush().unwrap();
    (StreamReader::new(ch.reader.take().unwrap()), w)
}

/// A source of migration `id` reconnecting to a paused postcopy's `migrate-recover` endpoint:
/// its header and Recover section sent.
pub fn reconnecting_source(
    ep: &Endpoint,
    id: MigrationId,
    record: &migration::VmConfigRecord,
) -> (StreamReader<Box<dyn Read + Send>>, Writer) {
    let mut ch = connect_when_listening(ep);
    let mut w: Writer = StreamWriter::new(ch.writer.take().unwrap());
    w.header(id).unwrap();
    w.record(Section::Recover, record).unwrap();
    w.flush().unwrap();
    (StreamReader::new(ch.reader.take().unwrap()), w)
}

/// The recovering destination's answer: the page ranges it still lacks, up to its Recover.
pub fn missing_ranges(r: &mut StreamReader<Box<dyn Read + Send>>) -> Vec<(u64, u64)> {
    let mut missing = Vec::new();
    loop {
        let f = next_answer(r);
        match f.kind {
            Section::Missing => missing.extend(f.decode::<DiscardRecord>().unwrap().ranges),
            Section::Recover => return missing,
            other => panic!("unexpected {} section", other.name()),
        }
    }
}

/// The next section on a return path that is not a heartbeat.
pub fn next_answer(r: &mut StreamReader<Box<dyn Read + Send>>) -> migration::stream::Frame {
    loop {
        let f = r.read_section().unwrap();
        if f.kind != Section::Heartbeat {
            return f;
        }
    }
}

/// Connects to `ep` once something listens there (the entry and `recover::listen` bind it
/// themselves, from another thread).
pub fn connect_when_listening(ep: &Endpoint) -> transport::Channel {
    let deadline = Instant::now() + WAIT;
    loop {
        match transport::connect(ep) {
            Ok(c) => return c,
            Err(e) => {
                assert!(Instant::now() < deadline, "nobody listens on {ep}: {e}");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// Every page of `vm` (its own contents) in RAM sections, then END.
pub fn send_all_pages(w: &mut Writer, vm: &FakeVm) {
    let mut batch = RamBatch::default();
    let mut page = vec![0u8; PAGE_SIZE];
    for p in 0..vm.total_pages() {
        let gpa = vm.gpa_of(p);
        vm.read_ram(gpa, &mut page).unwrap();
        batch.push_full(gpa, &page);
        if batch.len() == RamBatch::PAGES {
            w.section(Section::Ram, &batch.take()).unwrap();
        }
    }
    if !batch.is_empty() {
        w.section(Section::Ram, &batch.take()).unwrap();
    }
    w.record(Section::End, &EndRecord::default()).unwrap();
    w.flush().unwrap();
}
