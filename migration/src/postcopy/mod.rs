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

/// `migrate-status`'s `postcopy`: the destination's completion record (measured there, and as
/// the source received it), plus on the source what it answered and pushed. Flattened: one
/// JSON object, as before it was typed.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct PostcopyStatus {
    #[serde(flatten)]
    pub complete: CompleteRecord,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourcePushFigures>,
}

/// The source's side of a postcopy: pages it sent because they were asked for (and of those, on
/// the preempt channel) and pages its background push sent.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct SourcePushFigures {
    pub source_pages_requested: u64,
    pub source_pages_preempt: u64,
    pub source_pages_pushed: u64,
}
