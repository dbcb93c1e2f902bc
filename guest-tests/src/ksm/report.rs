//! The run's report: one row per phase, the guests' end states, the verdict; as a table and
//! as JSON.

use std::fmt::Write as _;

use super::guest::GuestState;
use super::host::{MIB, PAGE_SIZE};
use super::plan::{Options, Plan};

#[derive(Debug, Clone, serde::Serialize)]
pub struct PhaseRow {
    pub phase: String,
    pub secs: f64,
    /// Per guest: pages KSM merged at the end of the phase, and the allocator's region.
    pub merged_pages: Vec<u64>,
    pub region_pages: Vec<u64>,
    /// Time from the end of the fill until the merge target (or until merging stopped).
    pub merge_secs: Option<f64>,
    pub mem_available_mib: u64,
    pub split_mbps: Option<f64>,
    /// "PASS" or "FAIL <reason>".
    pub result: String,
}

impl PhaseRow {
    pub fn passed(&self) -> bool {
        self.result == "PASS"
    }

    /// Merged share of guest `g`'s region, in percent.
    pub fn merged_pct(&self, g: usize) -> f64 {
        let region = self.region_pages.get(g).copied().unwrap_or(0).max(1);
        100.0 * self.merged_pages.get(g).copied().unwrap_or(0) as f64 / region as f64
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub options: Options,
    pub plan: Plan,
    pub phases: Vec<PhaseRow>,
    pub guests: Vec<GuestState>,
    pub failure: Option<String>,
    pub settings_restored: bool,
    pub log_dir: String,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.failure.is_none() && self.settings_restored && self.phases.iter().all(|p| p.passed())
    }

    pub fn table(&self) -> String {
        let mut s = String::new();
        let p = &self.plan;
        let r = &self.options.rate;
        let _ = writeln!(
            s,
            "KSM test, {:?} mode: {} guest(s) x {} MiB (allocator region {} MiB, {} allocator(s) on {} vCPU(s)); ksmd {} pages / {} ms ({:.0} pages/s)",
            self.options.mode, p.vms, p.guest_mib, p.alloc_mib, p.allocators, p.cpus,
            r.pages_to_scan, r.sleep_millisecs, r.pages_per_sec()
        );
        let _ = writeln!(
            s,
            "| phase | time (s) | merge (s) | merged MiB per guest (% of region) | host MemAvailable (MiB) | split MB/s | result |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|");
        for row in &self.phases {
            let merged: Vec<String> = (0..row.merged_pages.len())
                .map(|g| {
                    format!(
                        "g{g} {:.1} ({:.0} %)",
                        (row.merged_pages[g] * PAGE_SIZE) as f64 / MIB as f64,
                        row.merged_pct(g)
                    )
                })
                .collect();
            let _ = writeln!(
                s,
                "| {} | {:.2} | {} | {} | {} | {} | {} |",
                row.phase,
                row.secs,
                row.merge_secs.map_or("-".into(), |m| format!("{m:.2}")),
                merged.join(", "),
                row.mem_available_mib,
                row.split_mbps.map_or("-".into(), |m| format!("{m:.0}")),
                row.result
            );
        }
        for (g, st) in self.guests.iter().enumerate() {
            let text = match st {
                GuestState::Running => "running".to_string(),
                GuestState::Stopped(why) => format!("stopped ({why})"),
                GuestState::Failed(why) => format!("FAIL {why}"),
            };
            let _ = writeln!(s, "guest {g}: {text}");
        }
        if let Some(f) = &self.failure {
            let _ = writeln!(s, "failure: {f}");
        }
        let _ = writeln!(
            s,
            "ksm settings restored: {}; logs: {}",
            if self.settings_restored { "yes" } else { "NO" },
            self.log_dir
        );
        let _ = writeln!(s, "RESULT: {}", if self.passed() { "PASS" } else { "FAIL" });
        s
    }
}
