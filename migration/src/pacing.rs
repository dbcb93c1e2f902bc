//! Spacing precopy's dirty passes so that a writing guest keeps running.
//!
//! Every page a pass re-arms (write-protects again for the dirty log) costs the guest one
//! write-protect fault at its next write. Passes that follow each other as fast as the link
//! allows re-arm the guest's whole working set every few tens of milliseconds, and the guest
//! spends most of its time in those faults (docs/machine-kvm.md: ~6.4 µs a fault on this host,
//! so a guest rewriting 256 MiB kept 10-25 % of its write rate). The pages the dirty log reports
//! are exactly the pages that faulted since they were re-armed, so the guest's lost time over a
//! pass is about `dirty pages x fault cost`; waiting before the next re-arm until that is at
//! most `1 - share` of the time since the last one keeps the guest's share of its time.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::channels::ChannelSender;
use crate::error::MigrationError;
use crate::outgoing::PageSender;
use crate::peer::HEARTBEAT_INTERVAL;
use crate::progress::StatusCell;
use crate::stream::Section;

/// How precopy spaces its passes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PassPacing {
    /// The share of its time the guest should keep, 0.0 ..= 0.95 (0: passes back to back).
    pub guest_share: f64,
    /// What one write-protect fault costs the guest on this host.
    pub fault_cost: Duration,
}

/// The write-protect fault cost measured on the development host (docs/machine-kvm.md).
pub const MEASURED_FAULT_COST: Duration = Duration::from_nanos(6_400);

/// The highest share pacing aims for: beyond it the waits grow without bound.
pub const MAX_GUEST_SHARE: f64 = 0.95;

impl Default for PassPacing {
    fn default() -> Self {
        PassPacing {
            guest_share: 0.5,
            fault_cost: MEASURED_FAULT_COST,
        }
    }
}

impl PassPacing {
    /// Passes back to back, as fast as the link allows.
    pub const OFF: PassPacing = PassPacing {
        guest_share: 0.0,
        fault_cost: MEASURED_FAULT_COST,
    };

    /// The shortest time from one re-arm to the next after the guest dirtied `pages` pages
    /// (each of which cost it one fault).
    pub fn min_interval(&self, pages: u64) -> Duration {
        let share = self.guest_share.clamp(0.0, MAX_GUEST_SHARE);
        if share <= 0.0 || pages == 0 {
            return Duration::ZERO;
        }
        let lost = self.fault_cost.as_secs_f64() * pages as f64;
        Duration::from_secs_f64(lost / (1.0 - share))
    }

    /// When the next re-arm may begin, given the previous one began at `rearmed_at` and the
    /// guest dirtied `pages` pages since.
    pub fn next_rearm(&self, rearmed_at: Instant, pages: u64) -> Instant {
        rearmed_at + self.min_interval(pages)
    }
}

/// Waits until `until`, keeping every connection alive (the destination takes a silent one for
/// a dead peer). Ends early, with Ok, when postcopy is requested or `deadline` (precopy's
/// timeout) comes; a `migrate-cancel` ends it with the cancellation. Returns how long it waited.
pub(crate) fn wait<W: Write>(
    until: Instant,
    deadline: Instant,
    tx: &mut PageSender<W>,
    channels: &mut [ChannelSender],
    status: &StatusCell,
) -> Result<Duration, MigrationError> {
    let start = Instant::now();
    let end = until.min(deadline);
    let mut beat = start + HEARTBEAT_INTERVAL;
    loop {
        tx.check_cancel()?;
        let now = Instant::now();
        if now >= end || status.get().postcopy_requested {
            return Ok(now - start);
        }
        if now >= beat {
            tx.w.section(Section::Heartbeat, &[])?;
            tx.w.flush()?;
            for ch in channels.iter_mut() {
                ch.w.section(Section::Heartbeat, &[])?;
                ch.w.flush()?;
            }
            beat = now + HEARTBEAT_INTERVAL;
        }
        // Short steps: a cancel or a postcopy request is answered within them.
        std::thread::sleep((end - now).min(Duration::from_millis(10)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_share_waits_twice_the_fault_time() {
        let p = PassPacing {
            guest_share: 0.5,
            fault_cost: Duration::from_micros(5),
        };
        // 65536 faults of 5 µs: 328 ms lost, so 655 ms between re-arms.
        let d = p.min_interval(65_536);
        assert!((d.as_secs_f64() - 0.65536).abs() < 1e-6, "{d:?}");
    }

    #[test]
    fn off_and_clean_guests_never_wait() {
        assert_eq!(PassPacing::OFF.min_interval(1 << 20), Duration::ZERO);
        assert_eq!(PassPacing::default().min_interval(0), Duration::ZERO);
    }

    #[test]
    fn share_is_capped() {
        let p = PassPacing {
            guest_share: 1.0,
            fault_cost: Duration::from_micros(1),
        };
        // Capped at 95 %: 20x the fault time, not infinity.
        let d = p.min_interval(1000).as_secs_f64();
        assert!((d - 0.02).abs() < 1e-9, "{d}");
    }
}
