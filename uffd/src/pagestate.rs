//! Per-page state of userfaultfd-registered guest RAM, two bits a page in an atomic array, so the
//! fault thread and the threads that place pages can race on a page safely.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum PageState {
    /// Not here yet and nobody asked for it.
    Missing = 0,
    /// Being fetched (a postcopy destination asked the source for it); not here yet.
    Requested = 1,
    /// Placed (or valid from precopy).
    Received = 2,
}

impl PageState {
    fn from_bits(b: u64) -> PageState {
        match b {
            0 => PageState::Missing,
            1 => PageState::Requested,
            _ => PageState::Received,
        }
    }
}

pub struct PageStates {
    words: Vec<AtomicU64>,
    pages: usize,
    received: AtomicUsize,
}

const PER_WORD: usize = 32;

impl PageStates {
    /// All pages Received.
    pub fn all_received(pages: usize) -> Self {
        let full = (0..PER_WORD).fold(0u64, |w, i| w | (PageState::Received as u64) << (2 * i));
        PageStates {
            words: (0..pages.div_ceil(PER_WORD))
                .map(|_| AtomicU64::new(full))
                .collect(),
            pages,
            received: AtomicUsize::new(pages),
        }
    }

    /// All pages Missing.
    pub fn all_missing(pages: usize) -> Self {
        PageStates {
            words: (0..pages.div_ceil(PER_WORD))
                .map(|_| AtomicU64::new(0))
                .collect(),
            pages,
            received: AtomicUsize::new(0),
        }
    }

    pub fn pages(&self) -> usize {
        self.pages
    }

    pub fn get(&self, page: usize) -> PageState {
        let w = self.words[page / PER_WORD].load(Ordering::Acquire);
        PageState::from_bits((w >> (2 * (page % PER_WORD))) & 3)
    }

    /// Moves `page` from `from` to `to` if it is in `from`; true when this call did it.
    pub fn transition(&self, page: usize, from: PageState, to: PageState) -> bool {
        if page >= self.pages {
            return false;
        }
        let shift = 2 * (page % PER_WORD);
        let word = &self.words[page / PER_WORD];
        let mut cur = word.load(Ordering::Acquire);
        loop {
            if (cur >> shift) & 3 != from as u64 {
                return false;
            }
            let new = (cur & !(3 << shift)) | ((to as u64) << shift);
            match word.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
        if from == PageState::Received && to != PageState::Received {
            self.received.fetch_sub(1, Ordering::AcqRel);
        } else if from != PageState::Received && to == PageState::Received {
            self.received.fetch_add(1, Ordering::AcqRel);
        }
        true
    }

    /// Marks a page Received from whatever it was; true if it was not Received before.
    pub fn receive(&self, page: usize) -> bool {
        self.transition(page, PageState::Missing, PageState::Received)
            || self.transition(page, PageState::Requested, PageState::Received)
    }

    pub fn received(&self) -> usize {
        self.received.load(Ordering::Acquire)
    }

    pub fn complete(&self) -> bool {
        self.received() == self.pages
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_are_exclusive() {
        let s = PageStates::all_received(70);
        assert!(s.complete());
        assert!(s.transition(69, PageState::Received, PageState::Missing));
        assert!(!s.transition(69, PageState::Received, PageState::Missing));
        assert_eq!(s.get(69), PageState::Missing);
        assert_eq!(s.get(68), PageState::Received);
        assert!(s.transition(69, PageState::Missing, PageState::Requested));
        assert!(!s.transition(69, PageState::Missing, PageState::Requested));
        assert!(s.receive(69));
        assert!(!s.receive(69));
        assert!(s.complete());
        assert!(!s.transition(70, PageState::Received, PageState::Missing));
        let m = PageStates::all_missing(33);
        assert_eq!((m.get(32), m.received()), (PageState::Missing, 0));
        assert!(m.receive(32) && !m.complete());
    }
}
