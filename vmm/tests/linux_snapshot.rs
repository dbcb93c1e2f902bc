//! The booted-Linux snapshot: made once (one boot, cached under .cache/linux-snapshots), then
//! every Linux test restores it lazily and talks to the guest over COM2 (`tern.init=serve`).

mod common;

use std::time::{Duration, Instant};

use guest_tests::linux::{booted_snapshot, LinuxVm};

const CMD: Duration = Duration::from_secs(120);

#[test]
fn restored_linux_runs_commands_over_com2() {
    let tern = std::path::Path::new(common::tern_path());
    let snap = booted_snapshot(tern).expect("booted snapshot");
    let dir = common::scratch("linux-snapshot");
    let t = Instant::now();
    let mut vm = LinuxVm::restore(tern, &snap, &dir, &["--restore", "lazy"]).expect("restore");
    let out = vm.check("echo hello from $(uname -s)", CMD).unwrap();
    eprintln!(
        "first command answered {:.0} ms after restore",
        t.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(out.trim(), "hello from Linux", "{}", vm.describe());
    // A failing command's status comes back too, and the channel goes on.
    let ran = vm.run("exit 7", CMD).unwrap();
    assert_eq!(ran.status, 7);
    let out = vm.check("grep -c ^processor /proc/cpuinfo", CMD).unwrap();
    assert_eq!(out.trim(), "2", "{}", vm.describe());
}
