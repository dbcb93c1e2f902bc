//! A page bitmap (one bit per 4 KiB page).

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: usize,
}

impl DirtyBitmap {
    pub fn new(pages: usize) -> Self {
        DirtyBitmap {
            words: vec![0; pages.div_ceil(64)],
            pages,
        }
    }

    pub fn full(pages: usize) -> Self {
        let mut b = Self::new(pages);
        for p in 0..pages {
            b.set(p);
        }
        b
    }

    /// From KVM-style words (bit i of word w = page w*64+i); extra bits are dropped.
    pub fn from_words(mut words: Vec<u64>, pages: usize) -> Self {
        words.resize(pages.div_ceil(64), 0);
        if !pages.is_multiple_of(64) {
            if let Some(last) = words.last_mut() {
                *last &= (1u64 << (pages % 64)) - 1;
            }
        }
        DirtyBitmap { words, pages }
    }

    pub fn pages(&self) -> usize {
        self.pages
    }

    /// The words holding pages `first..first + count` (`first` a multiple of 64), KVM-style.
    pub fn words_of(&self, first: usize, count: usize) -> &[u64] {
        let lo = (first / 64).min(self.words.len());
        let hi = (first + count).div_ceil(64).min(self.words.len());
        &self.words[lo..hi]
    }

    pub fn set(&mut self, page: usize) {
        if page < self.pages {
            self.words[page / 64] |= 1 << (page % 64);
        }
    }

    /// Sets pages `first..first + count` (clipped to the bitmap), a word at a time.
    pub fn set_range(&mut self, first: usize, count: usize) {
        let end = first.saturating_add(count).min(self.pages);
        let mut p = first;
        while p < end {
            let bit = p % 64;
            let n = (64 - bit).min(end - p);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            self.words[p / 64] |= mask;
            p += n;
        }
    }

    pub fn unset(&mut self, page: usize) {
        if page < self.pages {
            self.words[page / 64] &= !(1 << (page % 64));
        }
    }

    /// self = !self (within the page count).
    pub fn invert(&mut self) {
        for w in self.words.iter_mut() {
            *w = !*w;
        }
        let pages = self.pages;
        *self = DirtyBitmap::from_words(std::mem::take(&mut self.words), pages);
    }

    /// The first set page at or after `from` (no wrap-around).
    pub fn next_set_from(&self, from: usize) -> Option<usize> {
        if from >= self.pages {
            return None;
        }
        let mut wi = from / 64;
        let mut w = self.words[wi] & (!0u64 << (from % 64));
        loop {
            if w != 0 {
                return Some(wi * 64 + w.trailing_zeros() as usize);
            }
            wi += 1;
            w = *self.words.get(wi)?;
        }
    }

    pub fn get(&self, page: usize) -> bool {
        page < self.pages && self.words[page / 64] & (1 << (page % 64)) != 0
    }

    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// self |= other (same size).
    pub fn merge(&mut self, other: &DirtyBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
    }

    /// self &= other (same size).
    pub fn intersect(&mut self, other: &DirtyBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= *b;
        }
    }

    pub fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }

    /// Set pages in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut bits = w;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                Some(wi * 64 + b)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_range_matches_page_by_page() {
        for (first, count) in [
            (0, 0),
            (0, 1),
            (3, 64),
            (63, 2),
            (0, 200),
            (130, 70),
            (190, 50),
        ] {
            let mut a = DirtyBitmap::new(200);
            let mut b = DirtyBitmap::new(200);
            a.set_range(first, count);
            for p in first..first + count {
                b.set(p);
            }
            assert_eq!(a, b, "{first}+{count}");
        }
    }

    #[test]
    fn set_iterate_merge_intersect() {
        let mut a = DirtyBitmap::new(130);
        a.set(0);
        a.set(64);
        a.set(129);
        a.set(500); // out of range: ignored
        assert_eq!(a.iter().collect::<Vec<_>>(), vec![0, 64, 129]);
        let mut b = DirtyBitmap::new(130);
        b.set(64);
        b.set(65);
        let mut m = a.clone();
        m.merge(&b);
        assert_eq!(m.count(), 4);
        a.intersect(&b);
        assert_eq!(a.iter().collect::<Vec<_>>(), vec![64]);
        assert_eq!(m.next_set_from(1), Some(64));
        assert_eq!(m.next_set_from(66), Some(129));
        assert_eq!(m.next_set_from(130), None);
        let w = DirtyBitmap::from_words(vec![u64::MAX, u64::MAX, u64::MAX], 70);
        assert_eq!(w.count(), 70);
        assert_eq!(DirtyBitmap::full(70), w);
    }
}
