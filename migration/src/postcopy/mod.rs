//! Postcopy: the guest runs on the destination while the rest of its pages arrive, pushed in the
//! background or requested on the return path when the guest faults on them.

pub mod dest;
pub mod placer;
pub mod preempt;
pub mod recover;
pub mod source;

pub use dest::{
    probe_userfaultfd, ranges, DiscardRecord, Listener, PageRefusal, PageRequest, PostcopyFigures,
};
