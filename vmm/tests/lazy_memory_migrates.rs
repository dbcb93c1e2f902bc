//! Memory that is not (yet) resident still migrates: a guest restored lazily, whose pages are
//! still being placed, is snapshotted and migrated at once; a guest whose pages were swapped
//! out is snapshotted. Every page the guest wrote comes back: its `dirty` suite verifies its
//! whole working set and static region every round.

mod common;

use std::time::Duration;

use common::{
    assert_no_failure, dirty_round, remote, remote_json, scratch, wait_progress, wait_socket,
    Running,
};

const WAIT: Duration = Duration::from_secs(120);
/// 4 MiB rewritten and 24 MiB static, all verified each round.
const GUEST: &str = "suite=dirty mib=4 static=24";

/// Runs a dirty guest until round 2 and snapshots it to `snap`.
fn snapshot_fresh_guest(dir: &std::path::Path, snap: &std::path::Path) {
    let sock = dir.join("src.sock").to_string_lossy().into_owned();
    let mut src = Running::spawn(&[
        "--memory",
        "size=128M",
        "--cmdline",
        GUEST,
        "--api-socket",
        &sock,
    ]);
    wait_progress(&src, 1);
    let o = remote(&sock, &["migrate", &format!("file:{}", snap.display())]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert_eq!(src.wait_exit(WAIT), Some(0), "{}", src.describe());
}

/// Waits for a guest that resumed somewhere to verify two more rounds, with no failure.
fn assert_guest_verifies(r: &Running) {
    let first = r
        .wait_stdout(WAIT, |l| dirty_round(l).is_some())
        .and_then(|l| dirty_round(&l));
    assert!(first.is_some(), "{}", r.describe());
    wait_progress(r, first.unwrap_or(0) + 1);
    assert_no_failure(r);
}

/// The case under test: the lazy restore's background pass has not finished yet.
fn assert_still_placing(r: &Running) {
    assert!(
        !r.stderr_text().contains("background pass placed"),
        "the lazy restore finished first: the case is not exercised\n{}",
        r.describe()
    );
}

/// A lazy restore slowed to ~0.3 ms a stored page (about 2 s for its 7 000-odd pages) is
/// snapshotted, then migrated, before its background pass can have finished.
#[test]
fn a_guest_still_restoring_lazily_snapshots_and_migrates_whole() {
    let dir = scratch("lazy-migrates");
    let first = dir.join("first.snap");
    snapshot_fresh_guest(&dir, &first);
    let lazy = |sock: &str| {
        Running::spawn(&[
            "--incoming",
            &format!("file:{}", first.display()),
            "--restore",
            "lazy",
            "--restore-delay-us",
            "300",
            "--api-socket",
            sock,
        ])
    };

    // A snapshot of the half-restored guest, restored eagerly.
    let a = dir.join("a.sock").to_string_lossy().into_owned();
    let mut restoring = lazy(&a);
    wait_socket(&a, WAIT);
    assert_still_placing(&restoring);
    let second = dir.join("second.snap");
    let v = remote_json(&a, &["migrate", &format!("file:{}", second.display())]);
    assert_eq!(v["state"], "completed", "{v}");
    assert_eq!(
        restoring.wait_exit(WAIT),
        Some(0),
        "{}",
        restoring.describe()
    );
    let again = Running::spawn(&["--incoming", &format!("file:{}", second.display())]);
    assert_guest_verifies(&again);
    drop(again);

    // A live migration of the half-restored guest.
    let b = dir.join("b.sock").to_string_lossy().into_owned();
    let mut restoring = lazy(&b);
    wait_socket(&b, WAIT);
    let mig = dir.join("mig.sock");
    let dst = Running::spawn(&["--incoming", &format!("unix:{}", mig.display())]);
    assert!(dst.wait_stderr(WAIT, "waiting for an incoming migration"));
    assert_still_placing(&restoring);
    let v = remote_json(&b, &["migrate", &format!("unix:{}", mig.display())]);
    assert_eq!(v["state"], "completed", "{v}");
    assert_eq!(
        restoring.wait_exit(WAIT),
        Some(0),
        "{}",
        restoring.describe()
    );
    assert_guest_verifies(&dst);
}

/// A swap file for one test, switched off and removed when dropped.
struct SwapFile(std::path::PathBuf);

impl SwapFile {
    fn on(path: std::path::PathBuf, mib: u64) -> SwapFile {
        let f = std::fs::File::create(&path).expect("swap file");
        f.set_len(mib << 20).expect("swap file size");
        // fallocate: a sparse file cannot be a swap file.
        let ok = std::process::Command::new("fallocate")
            .args(["-l", &format!("{mib}M")])
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "fallocate {}", path.display());
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        for cmd in ["mkswap", "swapon"] {
            let out = std::process::Command::new(cmd)
                .arg(&path)
                .output()
                .unwrap_or_else(|e| panic!("{cmd}: {e}"));
            assert!(
                out.status.success(),
                "{cmd} {}: {} (this test needs a host that can swap to a file, as root)",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        SwapFile(path)
    }
}

impl Drop for SwapFile {
    fn drop(&mut self) {
        let _ = std::process::Command::new("swapoff").arg(&self.0).status();
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The guest RAM mapping of process `pid`: the anonymous mapping of exactly `bytes`.
fn guest_ram_mapping(pid: u32, bytes: u64) -> (u64, u64) {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    maps.lines()
        .filter_map(|l| {
            let range = l.split_whitespace().next()?;
            let (a, b) = range.split_once('-')?;
            let (a, b) = (
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            );
            (b - a == bytes && l.split_whitespace().nth(5).is_none()).then_some((a, b))
        })
        .next()
        .unwrap_or_else(|| panic!("no {bytes}-byte anonymous mapping in\n{maps}"))
}

/// kB of the mapping at `start` in `pid` that are swapped out (smaps' `Swap:`).
fn swapped_kb(pid: u32, start: u64) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    let head = format!("{start:x}-");
    smaps
        .lines()
        .skip_while(|l| !l.starts_with(&head))
        .find_map(|l| l.strip_prefix("Swap:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Pages out `start..end` of `pid` at once (process_madvise(MADV_PAGEOUT)): written to swap,
/// whether the kernel saw them as active or not; they stay in the swap cache.
fn page_out(pid: u32, start: u64, end: u64) {
    // SAFETY: pidfd_open takes a pid and flags; the returned fd is closed below.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    assert!(
        pidfd >= 0,
        "pidfd_open: {}",
        std::io::Error::last_os_error()
    );
    let iov = libc::iovec {
        iov_base: start as *mut libc::c_void,
        iov_len: (end - start) as usize,
    };
    // SAFETY: the iovec names memory of the other process, which the kernel only advises; the
    // iovec itself lives on this stack frame for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_process_madvise,
            pidfd as libc::c_int,
            &iov as *const libc::iovec,
            1usize,
            libc::MADV_PAGEOUT,
            0u32,
        )
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: pidfd is this function's own descriptor.
    unsafe { libc::close(pidfd as libc::c_int) };
    assert!(rc >= 0, "process_madvise(MADV_PAGEOUT): {err}");
}

/// A memory cgroup (v1) for one process tree, removed when dropped.
struct MemoryCgroup(std::path::PathBuf);

impl MemoryCgroup {
    fn new(name: &str) -> MemoryCgroup {
        let path = std::path::Path::new("/sys/fs/cgroup/memory").join(name);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (this test needs the cgroup v1 memory controller, as root)",
                path.display()
            )
        });
        MemoryCgroup(path)
    }

    /// tern with `args`, started inside this cgroup (so its guest RAM is charged here).
    fn spawn_tern(&self, args: &[&str]) -> Running {
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec \"$0\" \"$@\"",
                self.0.display()
            ))
            .arg(common::tern_path())
            .args(args);
        Running::spawn_command(cmd)
    }

    /// Reclaims as much of the cgroup's memory as the kernel can (`memory.force_empty`): guest
    /// pages go to swap, and out of the swap cache too, as on a host under memory pressure.
    fn reclaim(&self) {
        std::fs::write(self.0.join("memory.force_empty"), "0").expect("memory.force_empty");
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Guest pages swapped out (the host's swap) are not resident, yet hold data: a snapshot that
/// took "not resident" for "never written" stored them as zeros.
#[test]
fn swapped_out_guest_pages_are_snapshotted() {
    let dir = scratch("swapped-snapshot");
    let _swap = SwapFile::on(dir.join("swap"), 256);
    let cgroup = MemoryCgroup::new(&format!("tern-test-{}", std::process::id()));
    let sock = dir.join("a.sock").to_string_lossy().into_owned();
    let mut src = cgroup.spawn_tern(&[
        "--memory",
        "size=128M",
        "--cmdline",
        GUEST,
        "--api-socket",
        &sock,
    ]);
    wait_progress(&src, 1);
    // Paused, so that nothing swaps the pages back in before the snapshot reads them.
    assert_eq!(remote_json(&sock, &["pause"])["state"], "paused");
    let pid = src.child.id();
    let (start, end) = guest_ram_mapping(pid, 128 << 20);
    page_out(pid, start, end);
    // A page still in the swap cache counts as resident for mincore: reclaim takes it from
    // there too, as memory pressure on a loaded host does.
    cgroup.reclaim();
    let swapped = swapped_kb(pid, start);
    assert!(
        swapped >= 20 << 10,
        "only {swapped} kB of guest RAM swapped out"
    );
    let snap = dir.join("guest.snap");
    let v = remote_json(&sock, &["migrate", &format!("file:{}", snap.display())]);
    assert_eq!(v["state"], "completed", "{v}");
    assert_eq!(src.wait_exit(WAIT), Some(0), "{}", src.describe());
    let restored = Running::spawn(&["--incoming", &format!("file:{}", snap.display())]);
    assert_guest_verifies(&restored);
}
