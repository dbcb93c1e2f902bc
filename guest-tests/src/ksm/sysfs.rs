//! ksmd's knobs in /sys/kernel/mm/ksm: the test's settings go in, the previous values come back
//! when the [`KsmSettings`] guard is dropped (normal end, error, or a stop signal turned into an
//! error by the caller). An exclusive lock on a file under /run/lock keeps two harnesses from
//! changing (and restoring) the settings under each other.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::KsmError;

pub const KSM_DIR: &str = "/sys/kernel/mm/ksm";
const LOCK_FILE: &str = "/run/lock/tern-ksm.lock";

/// What the test sets: scan rate (pages per wake-up, wake-up period) and ksmd on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ScanRate {
    pub pages_to_scan: u64,
    pub sleep_millisecs: u64,
}

impl ScanRate {
    /// Pages per second ksmd is allowed to scan (it may manage fewer: it is one CPU-bound thread).
    pub fn pages_per_sec(&self) -> f64 {
        self.pages_to_scan as f64 * 1000.0 / self.sleep_millisecs.max(1) as f64
    }
}

pub fn read_value(dir: &Path, name: &str) -> Result<String, KsmError> {
    let path = dir.join(name);
    std::fs::read_to_string(&path)
        .map(|s| s.trim().to_string())
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                KsmError::NoKsm(path.clone())
            } else {
                KsmError::Io {
                    what: "reading",
                    path: path.clone(),
                    source: e,
                }
            }
        })
}

pub fn read_u64(dir: &Path, name: &str) -> Result<u64, KsmError> {
    let v = read_value(dir, name)?;
    v.parse().map_err(|_| KsmError::Parse {
        path: dir.join(name),
        content: v,
    })
}

fn write_value(dir: &Path, name: &str, value: &str) -> Result<(), KsmError> {
    let path = dir.join(name);
    std::fs::write(&path, value).map_err(KsmError::io("writing", path))
}

/// The settings the test changed and their previous values; restores them on drop.
pub struct KsmSettings {
    dir: PathBuf,
    saved: Vec<(&'static str, String)>,
    _lock: File,
}

impl KsmSettings {
    /// Locks, saves `run`, `pages_to_scan`, `sleep_millisecs` (and `smart_scan` where the kernel
    /// has it: skipping pages that did not merge before makes merge times depend on history),
    /// then starts ksmd at `rate`.
    pub fn apply(dir: &Path, rate: ScanRate) -> Result<Self, KsmError> {
        let lock = File::create(LOCK_FILE).map_err(KsmError::io("creating", LOCK_FILE))?;
        // SAFETY: flock on an fd we own; blocks until another harness releases the lock.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(KsmError::io("locking", LOCK_FILE)(
                std::io::Error::last_os_error(),
            ));
        }
        let mut wanted: Vec<(&'static str, String)> = vec![
            ("pages_to_scan", rate.pages_to_scan.to_string()),
            ("sleep_millisecs", rate.sleep_millisecs.to_string()),
        ];
        if dir.join("smart_scan").exists() {
            wanted.push(("smart_scan", "0".into()));
        }
        wanted.push(("run", "1".into()));
        let mut guard = KsmSettings {
            dir: dir.to_path_buf(),
            saved: Vec::new(),
            _lock: lock,
        };
        for (name, value) in wanted {
            let old = read_value(dir, name)?;
            write_value(dir, name, &value)?;
            guard.saved.push((name, old));
        }
        Ok(guard)
    }

    /// Puts the previous values back (ksmd's `run` last). Idempotent.
    pub fn restore(&mut self) -> Result<(), KsmError> {
        let mut first_err = None;
        while let Some((name, value)) = self.saved.pop() {
            if let Err(e) = write_value(&self.dir, name, &value) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for KsmSettings {
    fn drop(&mut self) {
        if let Err(e) = self.restore() {
            eprintln!("tern-suite: error: restoring the KSM settings: {e}");
        }
    }
}

/// ksmd's global counters, in pages.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct KsmCounters {
    pub pages_shared: u64,
    pub pages_sharing: u64,
    pub full_scans: u64,
}

impl KsmCounters {
    pub fn read(dir: &Path) -> Result<Self, KsmError> {
        Ok(KsmCounters {
            pages_shared: read_u64(dir, "pages_shared")?,
            pages_sharing: read_u64(dir, "pages_sharing")?,
            full_scans: read_u64(dir, "full_scans")?,
        })
    }
}
