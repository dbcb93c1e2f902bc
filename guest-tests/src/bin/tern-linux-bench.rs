//! Linux-guest benchmarks, from the booted-Linux snapshot (made once, cached):
//!
//! - `tern-linux-bench restore [RUNS]`: eager vs lazy restore of the snapshot, alternating: time
//!   until the guest runs (tern's own figure), until it answers a first command on COM2, and the
//!   lazy background pass.
//! - `tern-linux-bench apf [RUNS] [MIB]`: Linux's own async-PF handler under postcopy with the
//!   destination in `off`, `kvm` and `tern` mode (interleaved): apf-touch's toucher time, compute
//!   rate while the touchers ran vs alone, PAGE_READY interrupts (HYP), the destination's page
//!   request latency.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use guest_tests::linux::{booted_snapshot, LinuxVm};
use guest_tests::linux_apf::{postcopy_run, ApfPlan};
use guest_tests::{median, number_after, tern_binary};

fn scratch(name: &str) -> Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("tern-linux-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn restore(runs: usize) -> Result<()> {
    let tern = tern_binary()?;
    let snap = booted_snapshot(&tern)?;
    let size = std::fs::metadata(&snap)?.len();
    println!(
        "booted-Linux snapshot: {} ({:.1} MiB on disk, 512 MiB guest)",
        snap.display(),
        size as f64 / (1 << 20) as f64
    );
    // Per mode: guest running, first command answered, background pass (ms).
    type Row<'a> = (&'a str, Vec<f64>, Vec<f64>, Vec<f64>);
    let mut rows: Vec<Row> = vec![
        ("eager", Vec::new(), Vec::new(), Vec::new()),
        ("lazy", Vec::new(), Vec::new(), Vec::new()),
    ];
    for run in 0..runs {
        for (mode, running, answered, background) in rows.iter_mut() {
            let dir = scratch(&format!("restore-{mode}-{run}"))?;
            let t0 = Instant::now();
            let mut vm = LinuxVm::restore(&tern, &snap, &dir, &["--restore", mode])?;
            vm.check("true", Duration::from_secs(120))?;
            answered.push(t0.elapsed().as_secs_f64() * 1e3);
            std::thread::sleep(Duration::from_millis(500));
            drop(vm);
            let err = std::fs::read_to_string(dir.join("stderr"))?;
            running.push(number_after(&err, "guest running after").context("no running figure")?);
            if let Some(ms) = number_after(&err, " pages in") {
                background.push(ms);
            }
        }
    }
    println!("\n| restore | runs | guest running (ms, median) | first command answered (ms, median) | background pass (ms, median) |");
    println!("|---|---|---|---|---|");
    for (mode, running, answered, background) in rows.iter_mut() {
        println!(
            "| {mode} | {runs} | {:.1} | {:.0} | {} |",
            median(running),
            median(answered),
            if background.is_empty() {
                "–".to_string()
            } else {
                format!("{:.0}", median(background))
            }
        );
    }
    Ok(())
}

fn apf(runs: usize, mib: u32) -> Result<()> {
    let tern = tern_binary()?;
    let snap = booted_snapshot(&tern)?;
    println!("apf-touch mib={mib} touchers=4 (one CPU), pure postcopy, background push 4 MiB/s");
    println!("\n| dest --async-pf | run | touch ms | compute during / alone (units/ms) | HYP (READY irqs) | page requests | request p50 / p99 µs | faults off the vCPU thread | bad pages |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for run in 0..runs {
        for mode in ["off", "kvm", "tern"] {
            let dir = scratch(&format!("apf-{mode}-{run}"))?;
            let plan = ApfPlan {
                mode,
                mib,
                touchers: 4,
                bandwidth: "4M",
            };
            let r = postcopy_run(&tern, &snap, &dir, &plan)
                .with_context(|| format!("{mode} run {run}"))?;
            let pc = &r.postcopy;
            println!(
                "| {mode} | {run} | {:.0} | {:.0} / {:.0} ({:.0} %) | {:.0} | {} | {:.0} / {:.0} | {} | {:.0} |",
                r.get("touch_ms"),
                r.get("compute_during"),
                r.get("compute_alone"),
                100.0 * r.get("compute_during") / r.get("compute_alone"),
                r.get("hyp_after") - r.get("hyp_before"),
                pc["pages_requested"],
                pc["request_latency_p50_us"].as_f64().unwrap_or(f64::NAN),
                pc["request_latency_p99_us"].as_f64().unwrap_or(f64::NAN),
                pc["async_faults"],
                r.get("bad"),
            );
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, default: usize| -> Result<usize> {
        args.get(i)
            .map(|s| s.parse().context("a number"))
            .unwrap_or(Ok(default))
    };
    // The tern binary must exist before anything boots.
    let _ = Command::new(tern_binary()?)
        .arg("--version")
        .stdout(Stdio::null())
        .status();
    match args.first().map(String::as_str) {
        Some("restore") => restore(num(1, 5)?),
        Some("apf") => apf(num(1, 2)?, num(2, 64)? as u32),
        _ => bail!("usage: tern-linux-bench restore [RUNS] | apf [RUNS] [MIB]"),
    }
}
