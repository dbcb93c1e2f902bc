//! Bad input: one clear line on stderr, a non-zero exit, never a panic.

mod common;

use std::time::Duration;

use common::run_tern;

fn assert_clean_error(args: &[&str], expect: &str) {
    let o = run_tern(args, Duration::from_secs(30));
    assert!(
        matches!(o.code, Some(c) if c != 0),
        "{args:?}: {}",
        o.describe()
    );
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: expected one line\n{}",
        o.describe()
    );
    assert!(lines[0].starts_with("tern: error: "), "{}", o.describe());
    assert!(
        lines[0].contains(expect),
        "{args:?}: wanted `{expect}`\n{}",
        o.describe()
    );
    assert!(!o.stderr.contains("panicked"), "{}", o.describe());
}

#[test]
fn missing_kernel_file() {
    assert_clean_error(
        &["--kernel", "/no/such/vmlinux"],
        "cannot open kernel /no/such/vmlinux",
    );
}

#[test]
fn kernel_file_that_is_not_a_kernel() {
    let dir = std::env::temp_dir().join(format!("tern-bad-kernel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notes.txt");
    std::fs::write(&path, b"this is not a kernel image\n".repeat(100)).unwrap();
    let p = path.to_str().unwrap();
    assert_clean_error(&["--kernel", p], "is not a kernel tern can boot");
    // An ELF header with nothing behind it is not loadable either.
    std::fs::write(&path, b"\x7fELF\x02\x01\x01").unwrap();
    assert_clean_error(&["--kernel", p], "cannot load kernel");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn zero_memory() {
    assert_clean_error(&["--memory", "size=0"], "size must be at least 2 MiB");
}

#[test]
fn memory_larger_than_the_host() {
    assert_clean_error(&["--memory", "size=64T"], "larger than this host can back");
    assert_clean_error(&["--memory", "size=99999999999999T"], "not a valid size");
}

#[test]
fn unknown_option() {
    assert_clean_error(&["--frobnicate"], "unexpected argument '--frobnicate'");
    assert_clean_error(&["--memory", "size=1G,colour=blue"], "unknown key `colour`");
}

#[test]
fn precopy_pacing_out_of_range() {
    assert_clean_error(&["--precopy-guest-share", "96"], "96 is not in 0..=95");
    assert_clean_error(&["--write-fault-us", "nan"], "invalid --write-fault-us");
    assert_clean_error(&["--write-fault-us", "20000"], "invalid --write-fault-us");
}

#[test]
fn zero_vcpus() {
    assert_clean_error(&["--cpus", "boot=0"], "boot must be between 1 and 64");
}

#[test]
fn malformed_command_line() {
    assert_clean_error(
        &["--cmdline", "suite=hello\tx"],
        "invalid kernel command line",
    );
}

/// A multiboot ELF32 image: header at 0x80, one PT_LOAD of 16 bytes at 4 MiB.
fn multiboot_image() -> Vec<u8> {
    let mut img = vec![0u8; 0x110];
    img[..6].copy_from_slice(b"\x7fELF\x01\x01");
    img[18..20].copy_from_slice(&3u16.to_le_bytes());
    img[24..28].copy_from_slice(&0x40_0000u32.to_le_bytes());
    img[28..32].copy_from_slice(&52u32.to_le_bytes());
    img[42..44].copy_from_slice(&32u16.to_le_bytes());
    img[44..46].copy_from_slice(&1u16.to_le_bytes());
    for (i, w) in [1u32, 0x100, 0x40_0000, 0x40_0000, 16, 16]
        .iter()
        .enumerate()
    {
        img[52 + 4 * i..56 + 4 * i].copy_from_slice(&w.to_le_bytes());
    }
    let magic = 0x1bad_b002u32;
    for (i, w) in [magic, 0, 0u32.wrapping_sub(magic)].iter().enumerate() {
        img[0x80 + 4 * i..0x84 + 4 * i].copy_from_slice(&w.to_le_bytes());
    }
    img
}

#[test]
fn broken_multiboot_images() {
    let dir = std::env::temp_dir().join(format!("tern-bad-multiboot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("kernel.flat");
    let p = path.to_str().unwrap();
    let mut img = multiboot_image();
    img[0x88] ^= 1;
    std::fs::write(&path, &img).unwrap();
    assert_clean_error(&["--kernel", p], "has a bad checksum");
    let mut img = multiboot_image();
    img.truncate(0x108);
    std::fs::write(&path, &img).unwrap();
    assert_clean_error(&["--kernel", p], "image truncated: ELF segment");
    let mut img = multiboot_image();
    img[64..68].copy_from_slice(&0x7000_0000u32.to_le_bytes());
    std::fs::write(&path, &img).unwrap();
    assert_clean_error(&["--kernel", p], "outside guest RAM");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A sparse snapshot whose trailer puts the sections 15 TiB in (claiming ~4 billion stored
/// pages) is refused with one line, before anything is sized from the claim.
#[test]
fn snapshot_trailer_claiming_terabytes_of_pages() {
    use std::os::unix::fs::FileExt;
    let dir = common::scratch("bad-snapshot-trailer");
    let snap = dir.join("guest.snap");
    let sock = dir.join("api.sock").to_string_lossy().into_owned();
    let mut src = common::Running::spawn(&[
        "--memory",
        "size=64M",
        "--cmdline",
        "suite=idle fill=4",
        "--api-socket",
        &sock,
    ]);
    assert!(src
        .wait_stdout(Duration::from_secs(60), |l| l.contains("idle: halting"))
        .is_some());
    let o = common::remote(&sock, &["migrate", &format!("file:{}", snap.display())]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert_eq!(src.wait_exit(Duration::from_secs(60)), Some(0));
    let bytes = std::fs::read(&snap).unwrap();
    let n = bytes.len();
    let sections_at = u64::from_le_bytes(bytes[n - 8..].try_into().unwrap()) as usize;
    // Header, a 15 TiB hole, the real sections, a trailer pointing at them.
    let far = 4096 + (15u64 << 40);
    let bad = dir.join("sparse.snap");
    let f = std::fs::File::create(&bad).unwrap();
    f.write_all_at(&bytes[..4096], 0).unwrap();
    let mut tail = bytes[sections_at..n - 8].to_vec();
    tail.extend_from_slice(&far.to_le_bytes());
    f.write_all_at(&tail, far).unwrap();
    drop(f);
    let uri = format!("file:{}", bad.display());
    for restore in ["eager", "lazy"] {
        let o = run_tern(
            &["--incoming", &uri, "--restore", restore],
            Duration::from_secs(30),
        );
        assert_eq!(o.code, Some(1), "{restore}: {}", o.describe());
        assert!(
            o.stderr
                .contains("its trailer claims 4026531840 stored pages"),
            "{restore}: {}",
            o.describe()
        );
        assert!(!o.stderr.contains("panicked"), "{}", o.describe());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A listener that never accepts, its backlog full, still owns its path: tern refuses it at
/// once instead of waiting forever in the liveness check.
#[test]
fn socket_path_whose_listener_never_accepts() {
    use std::os::fd::AsRawFd;
    use std::os::unix::net::{UnixListener, UnixStream};
    let dir = common::scratch("bad-full-backlog");
    let path = dir.join("full.sock");
    let l = UnixListener::bind(&path).unwrap();
    // SAFETY: shrinks the backlog of a listening socket this test owns.
    assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
    // One connection, never accepted, fills a backlog of 0.
    let _queued = UnixStream::connect(&path).unwrap();
    let p = path.to_str().unwrap();
    let t = std::time::Instant::now();
    assert_clean_error(
        &["--api-socket", p],
        "another process is listening on this socket",
    );
    // The destination says where it waits first, then why it cannot.
    let o = run_tern(
        &["--incoming", &format!("unix:{p}")],
        Duration::from_secs(30),
    );
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert!(
        o.stderr
            .contains("another process is listening on this socket"),
        "{}",
        o.describe()
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    drop(l);
    std::fs::remove_dir_all(&dir).unwrap();
}
