//! A hostile migration source: crafted streams sent to a real `tern --incoming unix:PATH`. Each
//! must end in one clear error, exit status 1, no panic and no hang.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{scratch, Running};
use migration::postcopy::DiscardRecord;
use migration::state::{DeviceRecord, DeviceStates, VcpuState};
use migration::stream::{RamBatch, Section, StreamReader, StreamWriter, MAX_STATE_RECORD};
use migration::VmConfigRecord;

/// Long enough for a loaded machine; a hang (the bugs these tests pin) never ends.
const WAIT: Duration = Duration::from_secs(60);
const MEM: u64 = 64 << 20;

fn config() -> VmConfigRecord {
    VmConfigRecord {
        ram: vec![(0, MEM)],
        memory_size: MEM,
        mergeable: false,
        vcpus: 1,
        pv_features: 0,
        cpuid: Vec::new(),
        balloon: None,
        shared: false,
        thp: false,
        serial2: false,
        testdev: false,
    }
}

struct Source {
    tx: StreamWriter<UnixStream>,
    rx: StreamReader<UnixStream>,
}

impl Source {
    fn send(&mut self, kind: Section, payload: &[u8]) {
        // The destination may already have refused and closed: its exit tells.
        let _ = self.tx.section(kind, payload);
        let _ = self.tx.flush();
    }

    fn record<T: serde::Serialize>(&mut self, kind: Section, value: &T) {
        let _ = self.tx.record(kind, value);
        let _ = self.tx.flush();
    }
}

/// Starts `tern --incoming unix:...` with `extra` options and connects to it as the source,
/// having sent the header and `cfg`.
fn destination(name: &str, extra: &[&str], cfg: &VmConfigRecord) -> (Running, Source) {
    let dir = scratch(name);
    let path = dir.join("mig.sock");
    let uri = format!("unix:{}", path.display());
    let mut args = vec!["--incoming", uri.as_str()];
    args.extend_from_slice(extra);
    let dst = Running::spawn(&args);
    let sock = connect(&path, &dst);
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut src = Source {
        tx: StreamWriter::new(sock.try_clone().unwrap()),
        rx: StreamReader::new(sock),
    };
    src.tx.header(Default::default()).unwrap();
    src.record(Section::Config, cfg);
    (dst, src)
}

impl Source {
    /// The destination's next word on the return path, its heartbeats skipped.
    fn reply(&mut self) -> Result<migration::stream::Frame, migration::stream::StreamError> {
        loop {
            match self.rx.read_section() {
                Ok(f) if f.kind == Section::Heartbeat => continue,
                other => return other,
            }
        }
    }
}

fn connect(path: &Path, dst: &Running) -> UnixStream {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(s) = UnixStream::connect(path) {
            return s;
        }
        assert!(Instant::now() < deadline, "no listener\n{}", dst.describe());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The destination ends with exit status 1 and one `tern: error:` line containing `expect`.
fn assert_refused(mut dst: Running, expect: &str) {
    let code = dst.wait_exit(WAIT);
    assert_eq!(code, Some(1), "hung or crashed\n{}", dst.describe());
    // The process may end before the collector thread has read its last line.
    dst.wait_stderr(Duration::from_secs(5), "tern: error: ");
    let err = dst.stderr_text();
    assert!(!err.contains("panicked"), "{}", dst.describe());
    let line = err
        .lines()
        .find(|l| l.starts_with("tern: error: "))
        .unwrap_or_else(|| panic!("no error line\n{}", dst.describe()));
    assert!(
        line.contains(expect),
        "wanted `{expect}`\n{}",
        dst.describe()
    );
}

/// ADVISE, answered by a destination started with --postcopy.
fn advise(src: &mut Source, dst: &Running) {
    src.send(Section::Advise, &[]);
    let reply = src.reply();
    assert!(
        matches!(&reply, Ok(f) if f.kind == Section::Advise),
        "advise not accepted\n{}",
        dst.describe()
    );
}

#[test]
fn discard_with_a_wrapping_page_count_is_refused() {
    let (dst, mut src) = destination("discard-wrap", &["--postcopy"], &config());
    advise(&mut src, &dst);
    // 2^52 pages * 4096 wraps to 0 bytes: it passed the range check and spun the main thread.
    src.record(
        Section::Discard,
        &DiscardRecord {
            ranges: vec![(0x1000, 1 << 52)],
        },
    );
    assert_refused(
        dst,
        "discard range 0x1000+4503599627370496 pages is outside guest RAM",
    );
    // The source heard why.
    let f = src.reply().expect("an abort on the return path");
    assert_eq!(f.kind, Section::Abort);
    let why: String = f.decode().unwrap();
    assert!(why.contains("outside guest RAM"), "{why}");
}

#[test]
fn discard_without_an_accepted_advise_is_refused() {
    // No --postcopy: nothing may register RAM with userfaultfd.
    let (dst, mut src) = destination("discard-no-advise", &[], &config());
    src.record(
        Section::Discard,
        &DiscardRecord {
            ranges: vec![(0x10000, 4)],
        },
    );
    src.send(Section::End, &[]);
    assert_refused(
        dst,
        "postcopy discard section refused: it must follow one accepted postcopy advise",
    );
}

#[test]
fn ram_between_discard_and_run_is_refused() {
    let (dst, mut src) = destination("ram-after-discard", &["--postcopy"], &config());
    advise(&mut src, &dst);
    src.record(
        Section::Discard,
        &DiscardRecord {
            ranges: vec![(0x10000, 16)],
        },
    );
    // A discarded (userfaultfd-registered) page: populating it waited forever.
    let mut batch = RamBatch::default();
    batch.push_full(0x10000, &[0x5a; 4096]);
    src.send(Section::Ram, &batch.take());
    assert_refused(
        dst,
        "RAM section refused: no pages may come between the postcopy discard and RUN",
    );
}

#[test]
fn configuration_records_get_the_command_line_checks() {
    type Edit = fn(&mut VmConfigRecord);
    let cases: [(&str, Edit, &str); 4] = [
        (
            "zero",
            |c| c.vcpus = 0,
            "boot must be between 1 and 64 (got 0)",
        ),
        (
            "many",
            |c| c.vcpus = 200,
            "boot must be between 1 and 64 (got 200)",
        ),
        (
            "tiny",
            |c| {
                c.memory_size = 4096;
                c.ram = vec![(0, 4096)];
            },
            "size must be at least 2 MiB",
        ),
        (
            "layout",
            |c| c.ram = vec![(0, MEM), (1 << 32, MEM)],
            "do not match 67108864 bytes of memory",
        ),
    ];
    for (name, edit, expect) in cases {
        let mut cfg = config();
        edit(&mut cfg);
        let (dst, _src) = destination(&format!("config-{name}"), &[], &cfg);
        assert_refused(dst, expect);
    }
}

/// The state sections a precopy stream ends with, with `devices` for the device state.
fn send_state(src: &mut Source, devices: &DeviceStates) {
    let vcpu = VcpuState::default();
    src.record(Section::Vcpus, &vec![vcpu]);
    src.record(Section::Clock, &migration::state::ClockState::default());
    src.record(
        Section::Irqchip,
        &(
            migration::state::PicState::default(),
            migration::state::PicState::default(),
            migration::state::IoapicState::default(),
        ),
    );
    src.record(Section::Pit, &migration::state::PitState::default());
    src.record(Section::Devices, devices);
    src.record(Section::End, &migration::state::EndRecord::default());
}

#[test]
fn device_state_is_bounded_and_never_kept_unread() {
    // Larger than the device-state limit (tern's writer refuses it, so written by hand):
    // refused from its header, before the payload is read.
    let (dst, mut src) = destination("devices-large", &[], &config());
    let mut head = vec![Section::Devices as u8];
    head.extend_from_slice(&(MAX_STATE_RECORD as u32 + 1).to_le_bytes());
    let _ = src.tx.get_mut().write_all(&head);
    assert_refused(
        dst,
        "device state section of 1048577 bytes is larger than its 1048576-byte limit",
    );

    // Within the limit but for a device this VM does not have.
    let (dst, mut src) = destination("devices-unknown", &[], &config());
    let devices = DeviceStates {
        records: vec![DeviceRecord {
            name: "mystery".into(),
            state: serde_json::json!(vec![0u8; 1000]),
        }],
    };
    send_state(&mut src, &devices);
    assert_refused(dst, "the stream has state for an unknown device `mystery`");

    // None for a device the VM has (its serial port).
    let (dst, mut src) = destination("devices-missing", &[], &config());
    send_state(&mut src, &DeviceStates::default());
    assert_refused(dst, "the stream has no state for device `com1`");
}

/// A regular file of `len` bytes (not a memfd, so not sealed).
fn plain_file(name: &str, len: u64) -> std::fs::File {
    let p = scratch(name).join("ram");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    f.set_len(len).unwrap();
    f
}

/// A local migration's start as a hostile source makes it: `fds` with the header, the local
/// memory section if `announce`, then the configuration.
fn local_destination(
    name: &str,
    cfg: &VmConfigRecord,
    fds: &[std::fs::File],
    announce: bool,
) -> (Running, StreamWriter<UnixStream>) {
    use std::os::fd::AsFd;
    let dir = scratch(name);
    let path = dir.join("mig.sock");
    let dst = Running::spawn(&["--incoming", &format!("unix:{}", path.display())]);
    let sock = connect(&path, &dst);
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    migration::fdpass::send_with_fds(
        &sock,
        &migration::stream::header_bytes(Default::default()),
        &borrowed,
    )
    .unwrap();
    let mut tx = StreamWriter::new(sock);
    if announce {
        let regions = migration::state::LocalRamRecord {
            regions: cfg.ram.clone(),
        };
        let _ = tx.record(Section::LocalRam, &regions);
    }
    let _ = tx.record(Section::Config, cfg);
    let _ = tx.flush();
    (dst, tx)
}

#[test]
fn handed_over_memory_that_does_not_match_the_configuration_is_refused() {
    let shared = VmConfigRecord {
        shared: true,
        ..config()
    };
    let cases = [
        (
            "local-size",
            vec![plain_file("local-size-f", MEM / 2)],
            true,
            "needs a memfd of",
        ),
        (
            "local-unsealed",
            vec![plain_file("local-unsealed-f", MEM)],
            true,
            "not a memfd sealed against shrinking",
        ),
        (
            "local-count",
            vec![
                plain_file("local-count-a", MEM),
                plain_file("local-count-b", MEM),
            ],
            true,
            "2 memory fds for 1 RAM regions",
        ),
        (
            "local-none",
            Vec::new(),
            true,
            "0 memory fds for 1 RAM regions",
        ),
        (
            "local-unannounced",
            vec![plain_file("local-unannounced-f", MEM)],
            false,
            "file descriptors but no local memory section",
        ),
    ];
    for (name, fds, announce, expect) in cases {
        // The connection stays open until the destination has decided.
        let (dst, _tx) = local_destination(name, &shared, &fds, announce);
        assert_refused(dst, expect);
    }
    // A local memory section for a configuration that is not shared=on.
    let (dst, _tx) = local_destination(
        "local-private",
        &config(),
        &[plain_file("local-private-f", MEM)],
        true,
    );
    assert_refused(dst, "local memory section names regions");
}

/// A source that falls silent: the destination says it timed out waiting for the source, and
/// after how long (not the socket's "Resource temporarily unavailable").
#[test]
fn a_silent_source_is_named_with_the_timeout() {
    let dir = scratch("silent-source");
    let path = dir.join("mig.sock");
    let uri = format!("unix:{}", path.display());
    let env = [("TERN_PEER_TIMEOUT_MS", "1000")];
    // Silent after the configuration, then before the stream header.
    for header in [true, false] {
        let dst = Running::spawn_env(&["--incoming", &uri], &env);
        let sock = connect(&path, &dst);
        let mut tx = StreamWriter::new(sock.try_clone().unwrap());
        let want = if header {
            tx.header(Default::default()).unwrap();
            tx.record(Section::Config, &config()).unwrap();
            tx.flush().unwrap();
            "timed out waiting for the source: nothing came for 1 s"
        } else {
            "timed out waiting for the source: no stream header within 1 s"
        };
        assert_refused(dst, want);
        drop(sock);
    }
}
