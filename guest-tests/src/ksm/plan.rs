//! `tern-suite ksm` options and the sizing of guests, as the seed does it: with overcommit
//! ratio R and host memory H (MemTotal less a host reserve), serial mode runs
//! max(floor(R) + 1, 2) guests of R * H / guests each; parallel mode runs one guest of H.
//! Each guest's allocator works on its RAM less a small guest reserve (the built-in guest needs
//! about 2 MiB). Explicit `--vms` / `--guest-mem` override the computed values (CI runs pass
//! small ones).

use super::sysfs::ScanRate;

/// Host memory kept out of the guests' sizing (this machine: 24 GiB, shared with builds).
pub const HOST_RESERVE_MIB: u64 = 3072;
/// Guest RAM not given to the allocator (image, stacks, page tables of the built-in guest).
pub const GUEST_RESERVE_MIB: u64 = 8;
/// The guard: guests are stopped before MemAvailable falls below this.
pub const DEFAULT_GUARD_MIB: u64 = 1024;
pub const MIN_GUEST_MIB: u64 = 16;

/// The guest the allocators run in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum GuestKind {
    /// tern's built-in guest, `ksm` suite.
    Builtin,
    /// Linux restored from the booted-Linux snapshot (512 MiB, 2 vCPUs), `ksm-alloc` on COM2.
    Linux,
}

/// Linux guests: the snapshot's RAM, and what the allocator gets of it by default (the rest is
/// the kernel, the initramfs in tmpfs and page tables).
pub const LINUX_GUEST_MIB: u64 = 512;
pub const LINUX_ALLOC_MIB: u64 = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Mode {
    Serial,
    Parallel,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("{0}")]
    Usage(String),
    #[error("{flag}: `{value}` is not {what}")]
    BadValue {
        flag: &'static str,
        value: String,
        what: &'static str,
    },
    #[error("guests of {guest_mib} MiB do not fit: {why}")]
    TooBig { guest_mib: u64, why: String },
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Options {
    pub mode: Mode,
    pub overcommit: f64,
    pub vms: Option<u32>,
    pub guest_mem_mib: Option<u64>,
    pub allocators: u32,
    pub rate: ScanRate,
    pub guard_mib: u64,
    pub merge_timeout_s: u64,
    /// Test hook: kill the last guest's tern after this phase.
    pub kill_guest_after_phase: Option<u32>,
    pub json: Option<std::path::PathBuf>,
    /// Guest RAM on transparent huge pages (`--memory ...,thp=on`): ksmd must split them to merge.
    pub thp: bool,
    pub guest: GuestKind,
    /// Linux guests: the allocator's region (default LINUX_ALLOC_MIB).
    pub alloc_mib: Option<u64>,
}

pub const USAGE: &str =
    "usage: tern-suite ksm [--mode serial|parallel] [--overcommit R] [--vms N] \
[--guest-mem MIB] [--allocators K] [--pages-to-scan N] [--sleep-ms MS] [--guard-mib MIB] \
[--merge-timeout S] [--json PATH] [--kill-guest-after-phase P] [--thp on|off] \
[--guest builtin|linux] [--alloc-mib MIB]";

impl Default for Options {
    fn default() -> Self {
        Options {
            mode: Mode::Serial,
            overcommit: 2.0,
            vms: None,
            guest_mem_mib: None,
            allocators: 4,
            rate: ScanRate {
                pages_to_scan: 5000,
                sleep_millisecs: 10,
            },
            guard_mib: DEFAULT_GUARD_MIB,
            merge_timeout_s: 120,
            kill_guest_after_phase: None,
            json: None,
            thp: false,
            guest: GuestKind::Builtin,
            alloc_mib: None,
        }
    }
}

fn num<T: std::str::FromStr>(
    flag: &'static str,
    v: &str,
    what: &'static str,
) -> Result<T, PlanError> {
    v.parse().map_err(|_| PlanError::BadValue {
        flag,
        value: v.to_string(),
        what,
    })
}

fn positive<T: std::str::FromStr + PartialOrd + Default>(
    flag: &'static str,
    v: &str,
) -> Result<T, PlanError> {
    let n: T = num(flag, v, "a positive number")?;
    if n <= T::default() {
        return Err(PlanError::BadValue {
            flag,
            value: v.to_string(),
            what: "a positive number",
        });
    }
    Ok(n)
}

impl Options {
    /// Parses the arguments after `ksm`.
    pub fn parse(args: &[String]) -> Result<Options, PlanError> {
        let mut o = Options::default();
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let (name, inline) = match flag.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (flag.as_str(), None),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| it.next().cloned())
                    .ok_or_else(|| PlanError::Usage(format!("{name} needs a value")))
            };
            match name {
                "--mode" => {
                    o.mode = match value()?.as_str() {
                        "serial" => Mode::Serial,
                        "parallel" => Mode::Parallel,
                        v => {
                            return Err(PlanError::BadValue {
                                flag: "--mode",
                                value: v.into(),
                                what: "serial or parallel",
                            })
                        }
                    }
                }
                "--overcommit" => {
                    let v = value()?;
                    let r: f64 = num("--overcommit", &v, "a ratio such as 2.0")?;
                    if !(r.is_finite() && r > 0.0 && r <= 16.0) {
                        return Err(PlanError::BadValue {
                            flag: "--overcommit",
                            value: v,
                            what: "a ratio in (0, 16]",
                        });
                    }
                    o.overcommit = r;
                }
                "--vms" => o.vms = Some(positive("--vms", &value()?)?),
                "--guest-mem" => o.guest_mem_mib = Some(positive("--guest-mem", &value()?)?),
                "--allocators" => {
                    let v = value()?;
                    o.allocators = positive("--allocators", &v)?;
                    if o.allocators > 16 {
                        return Err(PlanError::BadValue {
                            flag: "--allocators",
                            value: v,
                            what: "1..=16",
                        });
                    }
                }
                "--pages-to-scan" => o.rate.pages_to_scan = positive("--pages-to-scan", &value()?)?,
                "--sleep-ms" => o.rate.sleep_millisecs = positive("--sleep-ms", &value()?)?,
                "--guard-mib" => o.guard_mib = positive("--guard-mib", &value()?)?,
                "--merge-timeout" => o.merge_timeout_s = positive("--merge-timeout", &value()?)?,
                "--json" => o.json = Some(value()?.into()),
                "--thp" => {
                    let v = value()?;
                    o.thp = match v.as_str() {
                        "on" => true,
                        "off" => false,
                        _ => {
                            return Err(PlanError::BadValue {
                                flag: "--thp",
                                value: v,
                                what: "on or off",
                            })
                        }
                    }
                }
                "--guest" => {
                    let v = value()?;
                    o.guest = match v.as_str() {
                        "builtin" => GuestKind::Builtin,
                        "linux" => GuestKind::Linux,
                        _ => {
                            return Err(PlanError::BadValue {
                                flag: "--guest",
                                value: v,
                                what: "builtin or linux",
                            })
                        }
                    }
                }
                "--alloc-mib" => o.alloc_mib = Some(positive("--alloc-mib", &value()?)?),
                "--kill-guest-after-phase" => {
                    o.kill_guest_after_phase = Some(num(
                        "--kill-guest-after-phase",
                        &value()?,
                        "a phase number",
                    )?)
                }
                other => return Err(PlanError::Usage(format!("unknown option `{other}`"))),
            }
        }
        if o.guest == GuestKind::Linux && (o.guest_mem_mib.is_some() || o.thp) {
            return Err(PlanError::Usage(format!(
                "--guest linux restores the booted-Linux snapshot ({LINUX_GUEST_MIB} MiB, thp off): \
drop --guest-mem and --thp (--alloc-mib sizes the allocator)"
            )));
        }
        if o.alloc_mib.is_some() && o.guest != GuestKind::Linux {
            return Err(PlanError::Usage(
                "--alloc-mib is for --guest linux (the built-in guest's region is its RAM)".into(),
            ));
        }
        if o.mode == Mode::Parallel && o.vms.is_some_and(|n| n != 1) {
            return Err(PlanError::Usage(
                "--mode parallel runs one guest: drop --vms".into(),
            ));
        }
        Ok(o)
    }
}

/// What the run will start.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Plan {
    pub vms: u32,
    pub guest_mib: u64,
    /// The allocator's region in each guest.
    pub alloc_mib: u64,
    pub cpus: u32,
    pub allocators: u32,
}

/// Sizes the run for a host with `total_mib` of RAM and `cpus` CPUs.
pub fn plan(o: &Options, total_mib: u64, cpus: u32) -> Result<Plan, PlanError> {
    let usable = total_mib.saturating_sub(HOST_RESERVE_MIB);
    if o.guest == GuestKind::Linux {
        let vms = match o.mode {
            Mode::Serial => o.vms.unwrap_or((o.overcommit.floor() as u32 + 1).max(2)),
            Mode::Parallel => 1,
        };
        let alloc_mib = o.alloc_mib.unwrap_or(LINUX_ALLOC_MIB);
        if alloc_mib + 128 > LINUX_GUEST_MIB {
            return Err(PlanError::TooBig {
                guest_mib: LINUX_GUEST_MIB,
                why: format!("an allocator of {alloc_mib} MiB leaves Linux less than 128 MiB"),
            });
        }
        let allocators = if o.mode == Mode::Parallel {
            o.allocators
        } else {
            1
        };
        return Ok(Plan {
            vms,
            guest_mib: LINUX_GUEST_MIB,
            alloc_mib,
            cpus: 2,
            allocators,
        });
    }
    let (vms, guest_mib, cpus, allocators) = match o.mode {
        Mode::Serial => {
            let vms = o
                .vms
                .unwrap_or_else(|| (o.overcommit.floor() as u32 + 1).max(2));
            let mib = o
                .guest_mem_mib
                .unwrap_or((o.overcommit * usable as f64 / vms as f64) as u64);
            (vms, mib, 1, 1)
        }
        Mode::Parallel => {
            let mib = o.guest_mem_mib.unwrap_or(usable);
            (1, mib, o.allocators.min(cpus.max(1)), o.allocators)
        }
    };
    if vms > 64 {
        return Err(PlanError::BadValue {
            flag: "--vms",
            value: vms.to_string(),
            what: "at most 64",
        });
    }
    if guest_mib < MIN_GUEST_MIB {
        return Err(PlanError::TooBig {
            guest_mib,
            why: format!("a guest needs at least {MIN_GUEST_MIB} MiB"),
        });
    }
    if guest_mib > total_mib {
        return Err(PlanError::TooBig {
            guest_mib,
            why: format!("more than the host's {total_mib} MiB of RAM"),
        });
    }
    // The allocator's region is cut into page-aligned parts per allocator.
    let alloc_mib = guest_mib - GUEST_RESERVE_MIB;
    Ok(Plan {
        vms,
        guest_mib,
        alloc_mib,
        cpus,
        allocators,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn sizes_like_the_seed() {
        let o = Options::parse(&args("--overcommit 2.0")).unwrap();
        let p = plan(&o, 24 * 1024, 2).unwrap();
        assert_eq!(p.vms, 3);
        assert_eq!(
            p.guest_mib,
            (2.0 * (24 * 1024 - HOST_RESERVE_MIB) as f64 / 3.0) as u64
        );
        let o = Options::parse(&args("--mode parallel --guest-mem 128")).unwrap();
        let p = plan(&o, 24 * 1024, 2).unwrap();
        assert_eq!((p.vms, p.guest_mib, p.cpus, p.allocators), (1, 128, 2, 4));
        assert_eq!(p.alloc_mib, 128 - GUEST_RESERVE_MIB);
        let o = Options::parse(&args("--vms=2 --guest-mem=64")).unwrap();
        assert_eq!(plan(&o, 24 * 1024, 2).unwrap().vms, 2);
    }

    #[test]
    fn bad_arguments_are_named() {
        for (a, needle) in [
            ("--mode both", "--mode"),
            ("--overcommit -1", "--overcommit"),
            ("--vms 0", "--vms"),
            ("--guest-mem lots", "--guest-mem"),
            ("--allocators 99", "--allocators"),
            ("--frobnicate", "--frobnicate"),
            ("--vms", "--vms needs a value"),
            ("--mode parallel --vms 3", "--vms"),
        ] {
            let e = Options::parse(&args(a)).unwrap_err().to_string();
            assert!(e.contains(needle), "{a}: {e}");
        }
        let o = Options::parse(&args("--guest-mem 8")).unwrap();
        assert!(plan(&o, 24 * 1024, 2).is_err());
        let o = Options::parse(&args("--guest-mem 999999")).unwrap();
        assert!(plan(&o, 24 * 1024, 2).is_err());
    }
}
