//! A real Linux guest: the minimal kernel and busybox initramfs of `resources/build-guest.sh`,
//! booted to its userspace marker with 1 and 2 vCPUs; and the build script's own checks.
//!
//! Slow: the first run on a machine builds the kernel (minutes; cached afterwards), and each boot
//! takes about a minute here because guest kernel code is emulated (docs/machine-kvm.md).

mod common;

use std::process::Command;
use std::time::Duration;

use common::run_tern;

/// One boot, generous: ~60 s measured for the marker here, the machine's cores may be shared.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

fn boot(kernel: &str, initramfs: &str, cpus: u8) {
    let cpus_arg = format!("boot={cpus}");
    let o = run_tern(
        &[
            "--kernel",
            kernel,
            "--initramfs",
            initramfs,
            "--cpus",
            &cpus_arg,
            "--log-level",
            "info",
        ],
        BOOT_TIMEOUT,
    );
    let has = |s: &str| o.stdout.contains(s);
    assert!(
        has("Run /init as init process"),
        "no `Run /init`: {}",
        o.describe()
    );
    let marker = o
        .stdout
        .lines()
        .find(|l| l.starts_with("tern-linux: up "))
        .unwrap_or_else(|| panic!("no userspace marker: {}", o.describe()));
    assert!(
        marker.contains(&format!(" cpus={cpus} ")),
        "guest counts the wrong number of CPUs: {marker}"
    );
    assert!(has("tern-linux: exit status=0"), "{}", o.describe());
    assert_eq!(o.code, Some(0), "{}", o.describe());
    eprintln!("{cpus} vCPU(s): {marker}");
}

#[test]
fn linux_boots_to_userspace_with_1_and_2_vcpus() {
    let (kernel, initramfs) = common::linux_guest();
    boot(&kernel, &initramfs, 1);
    boot(&kernel, &initramfs, 2);
}

/// resources/test-build-guest.sh: result lines and files, a second run is a cache hit, and a
/// package that cannot be installed fails with exit 2 and `cannot install <pkg>: ...`. The
/// failing run stops at the package check: it holds the cache lock meanwhile (other callers
/// wait) but writes nothing to the cache.
#[test]
fn build_script_is_idempotent_and_fails_clearly() {
    let out = Command::new("bash")
        .arg(common::resources_dir().join("test-build-guest.sh"))
        .output()
        .expect("run test-build-guest.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for check in [
        "second run is a cache hit",
        "missing package exits 2",
        "message: build-guest: cannot install",
    ] {
        assert!(stdout.contains(check), "missing check `{check}`:\n{stdout}");
    }
}
