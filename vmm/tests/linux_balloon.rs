//! Linux's own virtio-mmio and virtio-balloon drivers against tern's devices: the boot-time
//! target is inflated, and a new target (a config-change interrupt) deflates part of it.
//!
//! Slow: one Linux boot (about a minute here, guest kernel code is emulated).

mod common;

use std::time::{Duration, Instant};

use common::{remote, scratch, Running};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(240);

fn balloon(sock: &str) -> Value {
    common::remote_json(sock, &["status"])["balloon"].clone()
}

fn wait_actual(sock: &str, vm: &Running, mib: u64) -> Value {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let b = balloon(sock);
        if b["actual_bytes"] == mib << 20 {
            return b;
        }
        assert!(
            Instant::now() < deadline,
            "balloon never reached {mib} MiB: {b}\n{}",
            vm.describe()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn linux_inflates_and_deflates_the_balloon() {
    let (kernel, initramfs) = common::linux_guest();
    let dir = scratch("linux-balloon");
    let sock = dir.join("api.sock").to_string_lossy().into_owned();
    let mut vm = Running::spawn(&[
        "--kernel",
        &kernel,
        "--initramfs",
        &initramfs,
        "--memory",
        "size=512M",
        "--balloon",
        "size=32M,deflate-on-oom=on",
        "--api-socket",
        &sock,
        "--cmdline-append",
        "tern.run=sleep,600",
    ]);
    assert!(
        vm.wait_stdout(TIMEOUT, |l| l.starts_with("tern-linux: up "))
            .is_some(),
        "{}",
        vm.describe()
    );
    assert!(
        vm.stdout_lines()
            .iter()
            .any(|l| l.contains("virtio-mmio: Registering device virtio-mmio.0 at 0xd0000000")),
        "{}",
        vm.describe()
    );
    let b = wait_actual(&sock, &vm, 32);
    assert_eq!(b["stats"]["inflated_pages"], 8192, "{b}");
    assert_eq!(b["stats"]["discarded_pages"], 8192, "{b}");
    assert_eq!(b["stats"]["invalid_pfns"], 0, "{b}");

    let o = remote(&sock, &["balloon", "8M"]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    let b = wait_actual(&sock, &vm, 8);
    assert_eq!(b["stats"]["deflated_pages"], 6144, "{b}");

    let o = remote(&sock, &["quit"]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert_eq!(vm.wait_exit(TIMEOUT), Some(0), "{}", vm.describe());
}
