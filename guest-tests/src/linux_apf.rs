//! Linux's own async-PF handler under tern: `apf-touch` (guest-tests/linux/apf-touch) fills a
//! region in a Linux guest restored from the booted snapshot, the guest is migrated by pure
//! postcopy (background push limited, so the region is still missing when touched) to a
//! destination in a chosen `--async-pf` mode, and the touchers start there. Or
//! ([`lazy_restore_run`]) the guest is snapshotted while apf-touch waits, and the snapshot is
//! restored lazily from slow storage (`--restore-delay-us`) with the touchers starting at once.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::linux::{remote, LinuxVm};

const CMD: Duration = Duration::from_secs(120);
const FILL: Duration = Duration::from_secs(400);

/// What one run measured.
#[derive(Debug)]
pub struct ApfRun {
    pub mode: String,
    /// The `key=value` fields of apf-touch's `done` line.
    pub done: HashMap<String, f64>,
    /// The destination's postcopy figures (request latency, faults...).
    pub postcopy: serde_json::Value,
}

impl ApfRun {
    pub fn get(&self, key: &str) -> f64 {
        self.done.get(key).copied().unwrap_or(f64::NAN)
    }
}

/// The run's options.
pub struct ApfPlan<'a> {
    /// The destination's `--async-pf` mode (`off`, `kvm`, `tern`).
    pub mode: &'a str,
    pub mib: u32,
    pub touchers: u32,
    /// `--postcopy-bandwidth` of the source's background push.
    pub bandwidth: &'a str,
}

fn fields(line: &str) -> HashMap<String, f64> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

/// Polls `cat FILE` in the guest until a line starts with `prefix`; returns that line.
fn wait_line(vm: &mut LinuxVm, file: &str, prefix: &str, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let out = vm.check_retrying(&format!("cat {file}"), CMD)?;
        if let Some(l) = out.lines().find(|l| l.starts_with(prefix)) {
            return Ok(l.to_string());
        }
        if Instant::now() > deadline {
            bail!(
                "no `{prefix}` in {file} within {} s: {out}",
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Starts `cmd` (ending in `&`, writing `out`) and waits until `out` exists; starts it again
/// (up to three times) when the forked shell died before its redirection made the file.
fn start_in_background(vm: &mut LinuxVm, cmd: &str, out: &str) -> Result<()> {
    for _ in 0..3 {
        vm.check_retrying(cmd, CMD)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            // `[` is the shell's own: no process that could die.
            let seen = vm.check_retrying(&format!("[ -e {out} ] && echo yes || echo no"), CMD)?;
            if seen.trim() == "yes" {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        eprintln!("linux: `{cmd}` made no {out} within 30 s; starting it again");
    }
    bail!("`{cmd}` never started\n{}", vm.describe())
}

/// Restores the booted snapshot, starts apf-touch there and waits until its region is filled.
fn start_filled(
    tern: &Path,
    snap: &Path,
    dir: &Path,
    extra: &[&str],
    plan: &ApfPlan,
) -> Result<LinuxVm> {
    let mut vm = LinuxVm::restore(tern, snap, dir, extra)?;
    // Each step on its own, so a busybox applet dying of the open SIGSEGV (docs/machine-kvm.md)
    // is seen and retried: inside a background list it would go unnoticed and apf-touch would
    // never start. A mkfifo that made the fifo and then died counts as done.
    vm.check_retrying("rm -f /tmp/go /tmp/apf.out", CMD)?;
    vm.check_retrying("mkfifo /tmp/go || [ -p /tmp/go ]", CMD)?;
    start_in_background(
        &mut vm,
        &format!(
            "apf-touch mib={} touchers={} go=/tmp/go </dev/null >/tmp/apf.out 2>&1 &",
            plan.mib, plan.touchers
        ),
        "/tmp/apf.out",
    )?;
    // Filling is first-touch work in the guest kernel (emulated here): minutes when cores are busy.
    wait_line(&mut vm, "/tmp/apf.out", "apf-touch: filled", FILL)?;
    Ok(vm)
}

/// apf-touch snapshotted while it waits (region filled), then restored lazily with every stored
/// page `delay_us` away on the destination (`--async-pf MODE`), where the touchers start.
pub fn lazy_restore_run(
    tern: &Path,
    snap: &Path,
    dir: &Path,
    plan: &ApfPlan,
    delay_us: u32,
) -> Result<ApfRun> {
    let mut src = start_filled(
        tern,
        snap,
        &dir.join("booted"),
        &["--restore", "lazy"],
        plan,
    )?;
    let running = dir.join("apf-running.snap");
    remote(
        tern,
        &src.api,
        &["migrate", &format!("file:{}", running.display())],
    )?;
    src.wait_exit(CMD)?;
    let delay = delay_us.to_string();
    let mut vm = LinuxVm::restore(
        tern,
        &running,
        &dir.join(format!("lazy-{}", plan.mode)),
        &[
            "--restore",
            "lazy",
            "--restore-delay-us",
            &delay,
            "--async-pf",
            plan.mode,
        ],
    )?;
    vm.check("echo go > /tmp/go", CMD)
        .with_context(|| vm.describe())?;
    let done = wait_line(&mut vm, "/tmp/apf.out", "apf-touch: done", FILL)
        .with_context(|| vm.describe())?;
    Ok(ApfRun {
        mode: plan.mode.to_string(),
        done: fields(&done),
        postcopy: serde_json::Value::Null,
    })
}

/// One postcopy migration of a running apf-touch, touching on the destination.
pub fn postcopy_run(tern: &Path, snap: &Path, dir: &Path, plan: &ApfPlan) -> Result<ApfRun> {
    let src_dir = dir.join(format!("{}-src", plan.mode));
    let dst_dir = dir.join(format!("{}-dst", plan.mode));
    let mut src = start_filled(
        tern,
        snap,
        &src_dir,
        &[
            "--restore",
            "lazy",
            "--postcopy",
            "--postcopy-after-iterations",
            "0",
            "--postcopy-bandwidth",
            plan.bandwidth,
        ],
        plan,
    )?;
    let mig_path = dir.join(format!("{}.mig", plan.mode));
    let mig = format!("unix:{}", mig_path.display());
    let mut dst = LinuxVm::incoming(
        tern,
        &mig,
        &dst_dir,
        &["--postcopy", "--async-pf", plan.mode],
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !mig_path.exists() {
        if Instant::now() > deadline {
            bail!("the destination never listened\n{}", dst.describe());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    remote(tern, &src.api, &["migrate", &mig, "--detach"])?;
    // The destination's COM2 exists once it built the VM; the guest answers once it runs.
    dst.connect(&dst.com2_path())?;
    dst.check("echo go > /tmp/go", CMD)
        .with_context(|| dst.describe())?;
    let done = wait_line(&mut dst, "/tmp/apf.out", "apf-touch: done", CMD)
        .with_context(|| dst.describe())?;
    // The push ends the migration; the source exits when the destination confirmed.
    src.wait_exit(Duration::from_secs(600))
        .with_context(|| format!("source after the migration\n{}", dst.describe()))?;
    let status: serde_json::Value =
        serde_json::from_str(&remote(tern, &dst.api, &["migrate-status"])?)
            .context("migrate-status")?;
    Ok(ApfRun {
        mode: plan.mode.to_string(),
        done: fields(&done),
        postcopy: status["postcopy"].clone(),
    })
}
