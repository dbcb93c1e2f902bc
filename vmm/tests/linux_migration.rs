//! A real Linux guest migrates between two tern processes while it runs, and finishes on the
//! destination. Slow (a Linux boot takes about a minute here; docs/machine-kvm.md).

mod common;

use std::time::Duration;

use common::{remote, scratch, Running};

const BOOT: Duration = Duration::from_secs(300);

/// A running Linux guest migrates three times and finishes its program on the last destination:
/// precopy, then pure postcopy to a destination in `kvm` async-PF mode, then pure postcopy to one
/// in `tern` mode. (Postcopy of Linux once failed at once: the destination's vCPU restore made KVM
/// touch kvmclock and async-PF pages that were still missing, and pages were only placed after
/// the restore.) One boot for all three (a boot takes a minute here).
#[test]
fn linux_guest_migrates_by_precopy_then_postcopy_in_kvm_and_tern_mode() {
    let (kernel, initramfs) = common::linux_guest();
    let dir = scratch("linux-postcopy");
    let sock = |n: &str| dir.join(n).to_string_lossy().into_owned();
    let (a, b, c, d) = (
        sock("a.sock"),
        sock("b.sock"),
        sock("c.sock"),
        sock("d.sock"),
    );
    let postcopy = ["--postcopy", "--postcopy-after-iterations", "0"];
    let src_args = vec![
        "--kernel",
        &kernel,
        "--initramfs",
        &initramfs,
        "--memory",
        "size=256M",
        "--cmdline-append",
        "tern.run=sleep,15",
        "--api-socket",
        &a,
    ];
    let mut src = Running::spawn(&src_args);
    assert!(
        src.wait_stdout(BOOT, |l| l.starts_with("tern-linux: up"))
            .is_some(),
        "{}",
        src.describe()
    );
    let hop = |from: &str, to: &str, mode: &str, from_proc: &mut Running| -> Running {
        let mig = format!("unix:{}", dir.join(format!("{mode}.mig")).display());
        // Every destination may send the guest on by pure postcopy.
        let mut args = vec!["--incoming", &mig, "--api-socket", to];
        args.extend_from_slice(&postcopy);
        let pure_postcopy = mode != "precopy";
        if pure_postcopy {
            args.extend_from_slice(&["--async-pf", mode]);
        }
        let dst = Running::spawn(&args);
        assert!(
            dst.wait_stderr(BOOT, "waiting for an incoming migration"),
            "{}",
            dst.describe()
        );
        let o = remote(from, &["migrate", &mig]);
        assert_eq!(
            o.code,
            Some(0),
            "{mode}: {}\n{}\n{}",
            o.describe(),
            from_proc.describe(),
            dst.describe()
        );
        let v: serde_json::Value = serde_json::from_str(o.stdout.trim()).unwrap();
        assert_eq!(v["state"], "completed", "{v}");
        if pure_postcopy {
            assert!(
                v["postcopy"]["missing_at_switch"].as_u64() > Some(0),
                "{mode}: not a postcopy: {v}"
            );
        }
        assert_eq!(
            from_proc.wait_exit(BOOT),
            Some(0),
            "{}",
            from_proc.describe()
        );
        dst
    };
    let mut pre = hop(&a, &b, "precopy", &mut src);
    let mut kvm = hop(&b, &c, "kvm", &mut pre);
    let mut tern = hop(&c, &d, "tern", &mut kvm);
    assert!(
        tern.wait_stdout(BOOT, |l| l.contains("tern-linux: run sleep 15 status=0"))
            .is_some(),
        "{}",
        tern.describe()
    );
    assert_eq!(tern.wait_exit(BOOT), Some(0), "{}", tern.describe());
}
