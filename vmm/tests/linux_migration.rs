//! A real Linux guest migrates between two tern processes while it runs, and finishes on the
//! destination. Slow (a Linux boot takes about a minute here; design.md §1).

mod common;

use std::time::Duration;

use common::{remote, scratch, Running};

const BOOT: Duration = Duration::from_secs(300);

#[test]
fn linux_guest_migrates_and_finishes_on_the_destination() {
    let (kernel, initramfs) = common::linux_guest();
    let dir = scratch("linux-mig");
    let a = dir.join("a.sock").to_string_lossy().into_owned();
    let mig = format!("unix:{}", dir.join("mig.sock").display());
    // After its marker, init runs `sleep 20`: the migration happens during the sleep and the
    // guest reports the sleep's end (and exits) on the destination.
    let mut src = Running::spawn(&[
        "--kernel",
        &kernel,
        "--initramfs",
        &initramfs,
        "--memory",
        "size=256M",
        "--cmdline-append",
        "tern.run=sleep,20",
        "--api-socket",
        &a,
    ]);
    assert!(
        src.wait_stdout(BOOT, |l| l.starts_with("tern-linux: up"))
            .is_some(),
        "{}",
        src.describe()
    );
    let mut dst = Running::spawn(&["--incoming", &mig]);
    assert!(
        dst.wait_stderr(BOOT, "waiting for an incoming migration"),
        "{}",
        dst.describe()
    );
    let o = remote(&a, &["migrate", &mig]);
    assert_eq!(o.code, Some(0), "{}\n{}", o.describe(), src.describe());
    assert_eq!(src.wait_exit(BOOT), Some(0), "{}", src.describe());
    assert!(
        dst.wait_stdout(BOOT, |l| l.contains("tern-linux: run sleep 20 status=0"))
            .is_some(),
        "{}",
        dst.describe()
    );
    assert_eq!(dst.wait_exit(BOOT), Some(0), "{}", dst.describe());
}
