//! Migration figures: live status for `migrate-status`, a progress line, and the final summary.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

/// Where a migration stands, and who owns the guest.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationState {
    #[default]
    None,
    Active,
    /// Done; on the source the guest lives on at the destination.
    Completed,
    /// Failed before the switch: the source kept (and resumed) its guest.
    Failed,
    /// Cancelled before the switch: the source resumed its guest, the destination dropped it.
    Cancelled,
    /// Source only: the switch was sent but the destination never confirmed it resumed (or the
    /// answer was lost). It may run the guest, so this copy stays paused for good.
    Postmigrate,
    /// Postcopy broke after the switch: the destination runs the guest with pages missing and
    /// the source holds them; both sides stay paused.
    PostcopyPaused,
    /// Recovering a paused postcopy: the destination listens anew / the source reconnects.
    PostcopyRecover,
}

impl MigrationState {
    /// Whether this side may run its guest again on its own: never once the other side may own it.
    pub fn guest_may_run_elsewhere(self) -> bool {
        matches!(
            self,
            MigrationState::Postmigrate
                | MigrationState::PostcopyPaused
                | MigrationState::PostcopyRecover
        )
    }
}

impl std::fmt::Display for MigrationState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = serde_json::to_value(self).unwrap_or_default();
        f.write_str(v.as_str().unwrap_or("?"))
    }
}

/// The step a postcopy (or local) migration is at, as `migrate-status` shows it. Destination:
/// ADVISE -> DISCARD -> LISTEN -> RUNNING -> END; source: precopy -> postcopy -> END.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub enum Phase {
    /// Plain precopy (or nothing yet).
    #[default]
    #[serde(rename = "")]
    None,
    #[serde(rename = "precopy")]
    Precopy,
    #[serde(rename = "postcopy")]
    Postcopy,
    #[serde(rename = "local")]
    Local,
    #[serde(rename = "ADVISE")]
    Advise,
    #[serde(rename = "DISCARD")]
    Discard,
    #[serde(rename = "LISTEN")]
    Listen,
    #[serde(rename = "RUNNING")]
    Running,
    #[serde(rename = "END")]
    End,
}

/// Which side of a migration this VM is.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub enum Role {
    /// No migration yet.
    #[default]
    #[serde(rename = "")]
    None,
    #[serde(rename = "source")]
    Source,
    #[serde(rename = "destination")]
    Destination,
}

impl Role {
    /// As `migrate-status` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::None => "",
            Role::Source => "source",
            Role::Destination => "destination",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A snapshot of a migration's progress, as `migrate-status` returns it.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct MigrationStatus {
    pub state: MigrationState,
    pub role: Role,
    pub endpoint: String,
    /// The migration's id (hex): picked by the source, read from the stream by the destination.
    pub migration_id: Option<crate::MigrationId>,
    pub iteration: u32,
    pub bytes: u64,
    pub pages_full: u64,
    pub pages_zero: u64,
    pub throughput_mbps: f64,
    pub dirty_rate_mbps: f64,
    /// RAM channels: extra connections precopy passes were split over (0: the main one only).
    pub channels: u32,
    pub remaining_bytes: u64,
    pub total_ms: f64,
    /// Precopy waited this long between passes so that a writing guest keeps running
    /// (`--precopy-guest-share`).
    pub paced_ms: f64,
    pub downtime_ms: f64,
    pub error: Option<String>,
    /// Where a postcopy or local migration stands (`""` for plain precopy).
    pub phase: Phase,
    /// `migrate-start-postcopy` was asked for.
    pub postcopy_requested: bool,
    /// `migrate-cancel` was asked for (honoured only before the switch).
    pub cancel_requested: bool,
    /// Source: the switch (stop-and-copy end or postcopy RUN) is under way; cancel is refused.
    pub switching: bool,
    /// Postcopy recovery: pages the destination still lacked when the connection came back.
    pub recovered_pages: u64,
    /// Destination, postcopy recovery: from the source's reconnection to the guest running again
    /// (ms), and the page requests it sent again.
    pub recovery_ms: f64,
    pub recovery_requests_resent: u64,
    /// Postcopy figures (destination: measured; source: as the destination reported them, and
    /// its own).
    pub postcopy: Option<crate::postcopy::PostcopyStatus>,
}

/// Shared between the migration thread and the control API.
#[derive(Clone, Default)]
pub struct StatusCell(Arc<Mutex<MigrationStatus>>);

impl StatusCell {
    pub fn get(&self) -> MigrationStatus {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    pub fn update(&self, f: impl FnOnce(&mut MigrationStatus)) {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()));
    }
    pub fn is_active(&self) -> bool {
        self.get().state == MigrationState::Active
    }
}

/// Nanoseconds since the Unix epoch: when the source paused, as the destination can compare it
/// (downtime across two local processes).
pub fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

pub fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// Rewrites one progress line on stderr when it is a terminal, else prints a line per call.
pub struct ProgressLine {
    tty: bool,
    last: Instant,
}

impl Default for ProgressLine {
    fn default() -> Self {
        // SAFETY: isatty only inspects the descriptor.
        let tty = unsafe { libc::isatty(2) } == 1;
        ProgressLine {
            tty,
            last: Instant::now(),
        }
    }
}

impl ProgressLine {
    pub fn show(&mut self, s: &MigrationStatus, force: bool) {
        if !force && self.last.elapsed().as_millis() < 200 {
            return;
        }
        self.last = Instant::now();
        let line = format!(
            "migrate: iteration {} | {:.1} MB sent | {:.0} MB/s | dirty {:.1} MB/s | remaining {:.1} MB",
            s.iteration,
            mb(s.bytes),
            s.throughput_mbps,
            s.dirty_rate_mbps,
            mb(s.remaining_bytes)
        );
        let mut err = std::io::stderr().lock();
        let _ = if self.tty {
            write!(err, "\r\x1b[K{line}")
        } else {
            writeln!(err, "{line}")
        };
    }

    pub fn finish(&self) {
        if self.tty {
            let _ = writeln!(std::io::stderr());
        }
    }
}

/// The closing summary both sides print.
pub fn summary(s: &MigrationStatus) -> String {
    let post = match &s.postcopy {
        Some(p) => {
            let f = &p.complete.figures;
            format!(
                "; postcopy: {} missing at the switch, {} requested, {} pushed, request latency \
p50 {:.0} us p99 {:.0} us",
                f.missing_at_switch,
                f.pages_requested,
                f.pages_pushed,
                f.request_latency_p50_us,
                f.request_latency_p99_us
            )
        }
        None => String::new(),
    };
    format!(
        "migration {} ({}): total {:.1} ms, downtime {:.1} ms, {:.1} MB in {} iterations, \
pages {} full + {} zero, {:.0} MB/s{post}",
        s.state,
        s.role,
        s.total_ms,
        s.downtime_ms,
        mb(s.bytes),
        s.iteration,
        s.pages_full,
        s.pages_zero,
        s.throughput_mbps
    )
}
