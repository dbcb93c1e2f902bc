//! A real Linux guest migrates between two tern processes while it runs, and finishes on the
//! destination. It starts from the booted-Linux snapshot (guest_tests::linux): no boot here.

mod common;

use std::path::Path;
use std::time::Duration;

use guest_tests::linux::{booted_snapshot, LinuxVm};

const CMD: Duration = Duration::from_secs(180);

/// A running Linux guest migrates three times and finishes its program on the last destination:
/// precopy, then pure postcopy to a destination in `kvm` async-PF mode, then pure postcopy to one
/// in `tern` mode. (Postcopy of Linux once failed at once: the destination's vCPU restore made KVM
/// touch kvmclock and async-PF pages that were still missing, and pages were only placed after
/// the restore.)
#[test]
fn linux_guest_migrates_by_precopy_then_postcopy_in_kvm_and_tern_mode() {
    let tern = Path::new(common::tern_path());
    let snap = booted_snapshot(tern).expect("booted snapshot");
    let dir = common::scratch("linux-postcopy");
    let mut vm =
        LinuxVm::restore(tern, &snap, &dir.join("src"), &["--restore", "lazy"]).expect("restore");
    // A program that runs across all three hops and leaves its result in the guest's tmpfs.
    vm.check("(sleep 15; echo slept > /tmp/slept) >/dev/null 2>&1 &", CMD)
        .unwrap();
    for mode in ["precopy", "kvm", "tern"] {
        let mig = format!("unix:{}", dir.join(format!("{mode}.mig")).display());
        // Every destination may send the guest on by pure postcopy.
        let mut args = vec!["--postcopy", "--postcopy-after-iterations", "0"];
        if mode != "precopy" {
            args.extend_from_slice(&["--async-pf", mode]);
        }
        let mut dst = LinuxVm::incoming(tern, &mig, &dir.join(mode), &args).unwrap();
        common::wait_socket(&mig["unix:".len()..], CMD);
        let o = common::remote(vm.api.to_str().unwrap(), &["migrate", &mig]);
        assert_eq!(
            o.code,
            Some(0),
            "{mode}: {}\n{}\n{}",
            o.describe(),
            vm.describe(),
            dst.describe()
        );
        let v: serde_json::Value = serde_json::from_str(o.stdout.trim()).unwrap();
        assert_eq!(v["state"], "completed", "{v}");
        if mode != "precopy" {
            assert!(
                v["postcopy"]["missing_at_switch"].as_u64() > Some(0),
                "{mode}: not a postcopy: {v}"
            );
        }
        assert_eq!(vm.wait_exit(CMD).unwrap(), Some(0), "{}", vm.describe());
        dst.connect(&dst.com2_path()).unwrap();
        vm = dst;
    }
    let out = vm
        .check(
            "while [ ! -f /tmp/slept ]; do sleep 1; done; cat /tmp/slept",
            CMD,
        )
        .unwrap();
    assert_eq!(out.trim(), "slept", "{}", vm.describe());
}
