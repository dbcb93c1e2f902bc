//! Snapshot restore, eager against lazy: a 1 GiB built-in guest with 832 MiB of data, and a
//! booted 256 MiB Linux guest. Times from the restoring tern's start: the guest running (tern's
//! own figure), the guest's first output, and the lazy background pass placing the last page.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{remote, start};

struct Restored {
    running_ms: f64,
    first_output_ms: f64,
    background_ms: Option<f64>,
}

fn restore(snap: &Path, mode: &str, output: &str) -> Result<Restored> {
    let t0 = Instant::now();
    let uri = format!("file:{}", snap.display());
    let t = start(&["--incoming", &uri, "--restore", mode], output)?;
    let first_output_ms = t0.elapsed().as_secs_f64() * 1e3;
    let running = t
        .wait_line(Duration::from_secs(30), |l| {
            l.contains("guest running after")
        })
        .context("no restore line")?;
    let background_ms = if mode == "lazy" {
        t.wait_line(Duration::from_secs(120), |l| {
            l.contains("background pass placed")
        })
        .and_then(|l| guest_tests::number_after(&l, " in "))
    } else {
        None
    };
    Ok(Restored {
        running_ms: guest_tests::number_after(&running, "guest running after").unwrap_or(f64::NAN),
        first_output_ms,
        background_ms,
    })
}

fn rows(what: &str, snap: &Path, output: &str, stored: &str) -> Result<()> {
    for mode in ["eager", "lazy"] {
        let r = restore(snap, mode, output)?;
        println!(
            "| {what} | {stored} | {mode} | {:.1} | {:.0} | {} |",
            r.running_ms,
            r.first_output_ms,
            r.background_ms
                .map_or("–".to_string(), |ms| format!("{ms:.0}"))
        );
    }
    Ok(())
}

pub(super) fn restore_table(dir: &Path) -> Result<()> {
    println!(
        "| guest | stored | restore | guest running (ms, tern's figure) | first guest output (ms \
         from tern's start) | lazy background pass done (ms) |"
    );
    println!("|---|---|---|---|---|---|");
    // The built-in guest: 832 MiB of data that every round verifies.
    let sock = dir.join("restore-src.sock");
    let snap = dir.join("builtin.snap");
    let src = start(
        &[
            "--memory",
            "size=1G",
            "--cmdline",
            "suite=dirty mib=64 static=768",
            "--api-socket",
            &sock.to_string_lossy(),
        ],
        "dirty round=",
    )?;
    let s = remote(&sock, &["migrate", &format!("file:{}", snap.display())])?;
    drop(src);
    let stored = format!(
        "{} MiB",
        (s["pages_full"].as_u64().unwrap_or(0) * 4096) >> 20
    );
    rows("built-in, 1 GiB", &snap, "dirty round=", &stored)?;

    // Linux, booted to its userspace marker once (slow here), then restored.
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/build-guest.sh"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(String::from)
    };
    let (Some(kernel), Some(initramfs)) = (get("KERNEL="), get("INITRAMFS=")) else {
        bail!("no Linux guest: {}", String::from_utf8_lossy(&out.stderr));
    };
    let sock = dir.join("restore-linux.sock");
    let snap = dir.join("linux.snap");
    let src = start(
        &[
            "--kernel",
            &kernel,
            "--initramfs",
            &initramfs,
            "--memory",
            "size=256M",
            "--cmdline-append",
            "tern.run=sleep,2",
            "--api-socket",
            &sock.to_string_lossy(),
        ],
        "tern-linux: up",
    )?;
    let s = remote(&sock, &["migrate", &format!("file:{}", snap.display())])?;
    drop(src);
    let stored = format!(
        "{} MiB",
        (s["pages_full"].as_u64().unwrap_or(0) * 4096) >> 20
    );
    rows(
        "Linux 6.1, 256 MiB, at its userspace marker",
        &snap,
        "tern-linux: run sleep 2",
        &stored,
    )?;
    Ok(())
}
