//! Where lazy pages come from.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

/// Supplies guest page contents on first touch.
pub trait PageSource: Send {
    /// Fills `page` with guest page `gpa`; returns false when the page is all zeros (the caller
    /// then maps the zero page instead of copying).
    fn fetch(&mut self, gpa: u64, page: &mut [u8]) -> io::Result<bool>;
}

/// Pages from a file at offset = guest physical address; zeros beyond its end. An optional delay
/// per page that holds data stands in for a slow source (tests, benchmarks); zero pages (holes,
/// past the end) cost nothing, as they would for a sparse-aware store.
pub struct FileSource {
    file: File,
    len: u64,
    delay: Duration,
}

impl FileSource {
    pub fn open(path: &Path, delay: Duration) -> io::Result<Self> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Ok(FileSource { file, len, delay })
    }
}

impl PageSource for FileSource {
    fn fetch(&mut self, gpa: u64, page: &mut [u8]) -> io::Result<bool> {
        page.fill(0);
        if gpa >= self.len {
            return Ok(false);
        }
        let n = ((self.len - gpa) as usize).min(page.len());
        self.file.read_exact_at(&mut page[..n], gpa)?;
        let data = page.iter().any(|b| *b != 0);
        if data && !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_pages_and_zero_beyond_the_end() {
        let path = std::env::temp_dir().join(format!("tern-src-{}", std::process::id()));
        std::fs::write(&path, [7u8; 6000]).unwrap();
        let mut s = FileSource::open(&path, Duration::ZERO).unwrap();
        let mut page = [0u8; 4096];
        assert!(s.fetch(0, &mut page).unwrap());
        assert!(page.iter().all(|b| *b == 7));
        assert!(s.fetch(4096, &mut page).unwrap());
        assert_eq!(
            (page[0], page[6000 - 4096 - 1], page[6000 - 4096]),
            (7, 7, 0)
        );
        assert!(!s.fetch(8192, &mut page).unwrap());
        std::fs::remove_file(&path).unwrap();
    }
}
