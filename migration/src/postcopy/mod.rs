//! Postcopy: the guest runs on the destination while the rest of its pages arrive, pushed in the
//! background or requested on the return path when the guest faults on them.

pub mod channel_place;
pub mod channel_push;
pub mod dest;
pub mod placer;
pub mod preempt;
pub mod recover;
pub mod source;

pub use dest::{
    probe_userfaultfd, ranges, DiscardRecord, ListenError, Listener, PageRefusal, PageRequest,
    PostcopyFigures,
};

/// The destination's last word after postcopy (the Complete section): its figures, the
/// downtime only it can measure (the source paused, this side resumed), and what the balloon
/// discarded once RAM left userfaultfd. Flattened: the wire form is one JSON object.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct CompleteRecord {
    #[serde(flatten)]
    pub figures: PostcopyFigures,
    /// None when this side has no figure (a NaN would not survive JSON).
    pub downtime_ms: Option<f64>,
    pub balloon_pages_discarded_at_end: u64,
}

impl CompleteRecord {
    /// As the status shows it (`migrate-status`'s `postcopy`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}
