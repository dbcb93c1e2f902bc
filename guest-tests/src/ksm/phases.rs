//! The seed's phases, driven over the guests' COM2 sockets:
//! 1. fill every guest's region with zeros and wait for ksmd to merge it;
//! 2. split guest 0 (`srandom`: a per-guest random series) and report its MB/s;
//! 3. split the other guests in turn up to the host's memory limit, stopping earlier guests
//!    (after verifying them) when MemAvailable would fall under the guard; then verify all;
//! 4. (parallel mode) one guest, several allocators: merge, split, verify together.
//!
//! Merged memory is `/proc/PID/ksm_merging_pages` per tern process. The memory guard is checked
//! on every tick of every wait: the harness stops guests before the host runs short.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::guest::{Guest, GuestState, Reply, TICK};
use super::host::{self, MIB, PAGE_SIZE};
use super::plan::{Mode, Options, Plan};
use super::report::{PhaseRow, Report};
use super::sysfs::{KsmCounters, KsmSettings, KSM_DIR};
use super::KsmError;

/// A zero-filled region counts as merged at this share; a split one as unmerged below the other.
pub const MERGED_MIN_PCT: f64 = 90.0;
pub const SPLIT_MAX_PCT: f64 = 10.0;

struct Ctx<'a> {
    opts: &'a Options,
    plan: Plan,
    ksm_dir: PathBuf,
    guests: Vec<Guest>,
    phases: Vec<PhaseRow>,
    keys_seed: u64,
}

/// A command's time limit: generous, scaled with the region (first touch and copy-on-write
/// breaks cost tens of µs per page on this machine; in a Linux guest each of those is a guest
/// page fault handled in emulated CPL0 code, and the first command after a restore also starts
/// the program).
fn cmd_timeout(alloc_mib: u64, guest: super::plan::GuestKind) -> Duration {
    match guest {
        super::plan::GuestKind::Builtin => {
            Duration::from_secs(30) + Duration::from_millis(alloc_mib * 40)
        }
        super::plan::GuestKind::Linux => Duration::from_secs(120) + Duration::from_secs(alloc_mib),
    }
}

/// Err when MemAvailable is under the guard.
fn guard(guard_mib: u64) -> Result<(), KsmError> {
    let avail = host::mem_available_mib()?;
    if avail < guard_mib {
        return Err(KsmError::HostMemory(format!(
            "MemAvailable {avail} MiB < guard {guard_mib} MiB"
        )));
    }
    Ok(())
}

fn split_mbps(alloc_mib: u64, reply: &Reply) -> Option<f64> {
    // bytes per µs == MB/s
    let us = reply.field("us").filter(|&u| u > 0)?;
    Some((alloc_mib * MIB) as f64 / us as f64)
}

enum Expect {
    Merged,
    Split,
}

/// Marks the row FAIL (keeping the first reason) when guest `g`'s region is not as expected.
fn require(row: &mut PhaseRow, g: usize, expect: Expect) {
    let pct = row.merged_pct(g);
    let what = match expect {
        Expect::Merged if pct < MERGED_MIN_PCT => "zero pages not merged",
        Expect::Split if pct > SPLIT_MAX_PCT => "split pages still merged",
        _ => return,
    };
    if row.passed() {
        row.result = format!("FAIL guest {g}: {what} ({pct:.1} % merged)");
    }
}

impl Ctx<'_> {
    fn region_pages(&self) -> u64 {
        self.plan.alloc_mib * MIB / PAGE_SIZE
    }

    fn key(&self, g: usize) -> u64 {
        self.keys_seed ^ (g as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }

    fn row(&self, phase: &str, t0: Instant) -> Result<PhaseRow, KsmError> {
        Ok(PhaseRow {
            phase: phase.to_string(),
            secs: t0.elapsed().as_secs_f64(),
            merged_pages: self.guests.iter().map(Guest::merged_pages).collect(),
            region_pages: self.guests.iter().map(|_| self.region_pages()).collect(),
            merge_secs: None,
            mem_available_mib: host::mem_available_mib()?,
            split_mbps: None,
            result: "PASS".into(),
        })
    }

    fn check_guests(&mut self) -> Result<(), KsmError> {
        for g in self.guests.iter_mut().filter(|g| g.is_running()) {
            g.check_alive()?;
        }
        Ok(())
    }

    fn command(&mut self, g: usize, line: &str) -> Result<Reply, KsmError> {
        let guard_mib = self.opts.guard_mib;
        let timeout = cmd_timeout(self.guests[g].alloc_mib, self.opts.guest);
        self.guests[g].command(line, timeout, &mut || guard(guard_mib))
    }

    /// Waits until the running guests in `which` have `pct` % of their regions merged (or, with
    /// `below`, at most `pct` %), until ksmd made 3 full scans without a change, or until the
    /// merge timeout. Returns the seconds waited.
    fn wait_merge(&self, which: &[usize], pct: f64, below: bool) -> Result<f64, KsmError> {
        let t0 = Instant::now();
        let target = self.region_pages() as f64 * pct / 100.0;
        let timeout = Duration::from_secs(self.opts.merge_timeout_s);
        let (mut last, mut last_change_scan) = (u64::MAX, 0u64);
        loop {
            host::check_stop()?;
            guard(self.opts.guard_mib)?;
            let merged: Vec<u64> = which
                .iter()
                .filter(|&&g| self.guests[g].is_running())
                .map(|&g| self.guests[g].merged_pages())
                .collect();
            let done = merged.iter().all(|&m| {
                if below {
                    m as f64 <= target
                } else {
                    m as f64 >= target
                }
            });
            if done {
                return Ok(t0.elapsed().as_secs_f64());
            }
            let scans = KsmCounters::read(&self.ksm_dir)?.full_scans;
            let sum: u64 = merged.iter().sum();
            if sum != last {
                last = sum;
                last_change_scan = scans;
            } else if scans >= last_change_scan + 3 || t0.elapsed() > timeout {
                return Ok(t0.elapsed().as_secs_f64());
            }
            std::thread::sleep(TICK * 2);
        }
    }

    /// Phase 1: zeros everywhere, then merging.
    fn phase1(&mut self) -> Result<(), KsmError> {
        let t0 = Instant::now();
        let all: Vec<usize> = (0..self.guests.len()).collect();
        for g in all.clone() {
            // Room for this guest's pages before ksmd merges them; wait for merging otherwise.
            let need = self.guests[g].alloc_mib + self.opts.guard_mib;
            if host::mem_available_mib()? < need {
                self.wait_merge(&all[..g], MERGED_MIN_PCT, false)?;
            }
            if host::mem_available_mib()? < need {
                return Err(KsmError::HostMemory(format!(
                    "no room to fill guest {g}: MemAvailable under {need} MiB even after merging"
                )));
            }
            self.command(g, "fill 0")?;
        }
        let merge = self.wait_merge(&all, 100.0 * 0.995, false)?;
        let mut row = self.row("1 fill zeros, merge", t0)?;
        row.merge_secs = Some(merge);
        for g in all {
            let key = self.key(g);
            self.command(g, &format!("init {key}"))?;
            require(&mut row, g, Expect::Merged);
        }
        self.phases.push(row);
        Ok(())
    }

    /// Phase 2: split guest 0.
    fn phase2(&mut self) -> Result<(), KsmError> {
        let t0 = Instant::now();
        let reply = self.command(0, "srandom")?;
        self.guests[0].key = Some(self.key(0));
        self.wait_merge(&[0], SPLIT_MAX_PCT, true)?;
        let mut row = self.row("2 split guest 0", t0)?;
        row.split_mbps = split_mbps(self.guests[0].alloc_mib, &reply);
        require(&mut row, 0, Expect::Split);
        self.phases.push(row);
        Ok(())
    }

    /// Stops the earliest running, split guest before `g` after verifying it; false if none.
    fn stop_one_split_before(&mut self, g: usize) -> Result<bool, KsmError> {
        let Some(j) = (0..g).find(|&j| self.guests[j].is_running() && self.guests[j].key.is_some())
        else {
            return Ok(false);
        };
        self.command(j, "srverify")?;
        self.guests[j].stop(GuestState::Stopped(format!(
            "verified, then stopped by the memory guard before guest {g}'s split"
        )));
        Ok(true)
    }

    /// Phase 3: split the other guests in turn, then verify everyone still running.
    fn phase3(&mut self) -> Result<(), KsmError> {
        let t0 = Instant::now();
        let guard_mib = self.opts.guard_mib;
        let mut mbps = Vec::new();
        for g in 1..self.guests.len() {
            let need = self.guests[g].alloc_mib + guard_mib;
            while host::mem_available_mib()? < need {
                if !self.stop_one_split_before(g)? {
                    return Err(KsmError::HostMemory(format!(
                        "no room to split guest {g} (needs ~{} MiB above the {guard_mib} MiB guard)",
                        self.guests[g].alloc_mib
                    )));
                }
            }
            let timeout = cmd_timeout(self.guests[g].alloc_mib, self.opts.guest);
            let (before, rest) = self.guests.split_at_mut(g);
            let cur = &mut rest[0];
            // While it splits: if the host runs short anyway, stop earlier split guests (the
            // seed's phase 3); with none left, the guard's error stops the run.
            let mut tick = || -> Result<(), KsmError> {
                while guard(guard_mib).is_err() {
                    let Some(victim) = before.iter_mut().find(|v| v.is_running()) else {
                        return guard(guard_mib);
                    };
                    victim.stop(GuestState::Stopped(format!(
                        "stopped unverified by the memory guard during guest {g}'s split"
                    )));
                }
                Ok(())
            };
            let reply = cur.command("srandom", timeout, &mut tick)?;
            cur.key = Some(self.keys_seed ^ (g as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            mbps.extend(split_mbps(cur.alloc_mib, &reply));
        }
        for g in 0..self.guests.len() {
            if !self.guests[g].is_running() {
                continue;
            }
            if self.guests[g].key.is_some() {
                self.command(g, "srverify")?;
            } else {
                self.command(g, "verify 0")?;
            }
        }
        let running: Vec<usize> = (0..self.guests.len())
            .filter(|&g| self.guests[g].is_running())
            .collect();
        self.wait_merge(&running, SPLIT_MAX_PCT, true)?;
        let mut row = self.row("3 split all in turn, verify", t0)?;
        if !mbps.is_empty() {
            row.split_mbps = Some(mbps.iter().sum::<f64>() / mbps.len() as f64);
        }
        for g in running {
            require(&mut row, g, Expect::Split);
        }
        self.phases.push(row);
        Ok(())
    }

    /// Phase 4: parallel allocators in one guest.
    fn phase4(&mut self) -> Result<(), KsmError> {
        let t0 = Instant::now();
        self.command(0, "fill 0")?;
        let merge = self.wait_merge(&[0], 100.0 * 0.995, false)?;
        let mut row = self.row("4a parallel fill zeros, merge", t0)?;
        row.merge_secs = Some(merge);
        require(&mut row, 0, Expect::Merged);
        self.phases.push(row);

        let t1 = Instant::now();
        let key = self.key(0);
        self.command(0, &format!("init {key}"))?;
        let reply = self.command(0, "srandom")?;
        self.guests[0].key = Some(key);
        self.command(0, "srverify")?;
        self.wait_merge(&[0], SPLIT_MAX_PCT, true)?;
        let mut row = self.row("4b parallel split, verify", t1)?;
        row.split_mbps = split_mbps(self.guests[0].alloc_mib, &reply);
        require(&mut row, 0, Expect::Split);
        self.phases.push(row);
        Ok(())
    }

    fn after_phase(&mut self, phase: u32) -> Result<(), KsmError> {
        if self.opts.kill_guest_after_phase == Some(phase) {
            if let Some(last) = self.guests.last_mut() {
                eprintln!(
                    "tern-suite: test hook: killing guest {}'s tern after phase {phase}",
                    last.index
                );
                last.kill_unannounced();
            }
        }
        self.check_guests()
    }

    fn drive(&mut self, tern: &Path, dir: &Path) -> Result<(), KsmError> {
        let p = self.plan.clone();
        let linux = match self.opts.guest {
            super::plan::GuestKind::Linux => Some(
                crate::linux::booted_snapshot(tern)
                    .map_err(|e| KsmError::Setup(format!("the booted-Linux snapshot: {e:#}")))?,
            ),
            super::plan::GuestKind::Builtin => None,
        };
        for g in 0..p.vms as usize {
            host::check_stop()?;
            guard(self.opts.guard_mib + p.guest_mib.min(64))?;
            let guest = Guest::spawn(
                tern,
                dir,
                g,
                p.guest_mib,
                p.alloc_mib,
                p.cpus,
                p.allocators,
                self.opts.thp,
                linux.as_deref(),
            )?;
            self.guests.push(guest);
        }
        if linux.is_some() {
            // ksm-alloc has its region (zero-filled and untouched pages are not merged yet).
            self.command(0, "info")?;
            for g in self.guests.iter_mut() {
                g.take_baseline();
            }
        }
        match self.opts.mode {
            Mode::Serial => {
                self.phase1()?;
                self.after_phase(1)?;
                self.phase2()?;
                self.after_phase(2)?;
                self.phase3()?;
                self.after_phase(3)?;
            }
            Mode::Parallel => {
                self.phase4()?;
                self.after_phase(4)?;
            }
        }
        for g in self.guests.iter_mut().filter(|g| g.is_running()) {
            g.stop(GuestState::Stopped("exit".into()));
        }
        Ok(())
    }
}

/// Runs the test: sets ksmd up, starts the guests, drives the phases, stops every guest and
/// restores ksmd's settings whatever happens. The report says PASS or FAIL.
pub fn run(opts: &Options, tern: &Path) -> Result<Report, KsmError> {
    host::install_stop_handler()?;
    let total = host::meminfo_mib("MemTotal")?;
    let plan = super::plan::plan(opts, total, host::online_cpus())?;
    let dir = std::env::temp_dir().join(format!("tern-ksm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(KsmError::io("creating", &dir))?;
    let ksm_dir = PathBuf::from(KSM_DIR);
    let mut settings = KsmSettings::apply(&ksm_dir, opts.rate)?;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0x1234_5678, |d| d.as_nanos() as u64);
    let mut ctx = Ctx {
        opts,
        plan: plan.clone(),
        ksm_dir,
        guests: Vec::new(),
        phases: Vec::new(),
        keys_seed: seed,
    };
    let result = ctx.drive(tern, &dir);
    let failure = result.as_ref().err().map(|e| e.to_string());
    if let Err(KsmError::Guest { guest, reason }) = &result {
        if let Some(g) = ctx.guests.get_mut(*guest) {
            g.state = GuestState::Failed(reason.clone());
        }
    }
    // Stop every guest (killing those that do not answer), then restore ksmd.
    for g in ctx.guests.iter_mut() {
        if g.is_running() {
            let why = if failure.is_some() {
                "stopped after the failure"
            } else {
                "exit"
            };
            g.kill();
            g.state = GuestState::Stopped(why.into());
        } else {
            g.kill();
        }
    }
    let restored = settings.restore();
    drop(settings);
    let report = Report {
        options: opts.clone(),
        plan,
        phases: ctx.phases,
        guests: ctx.guests.iter().map(|g| g.state.clone()).collect(),
        failure: failure.or_else(|| restored.as_ref().err().map(|e| e.to_string())),
        settings_restored: restored.is_ok(),
        log_dir: dir.display().to_string(),
    };
    if report.passed() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(report)
}
