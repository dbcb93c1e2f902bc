//! Host readings (MemAvailable, merged pages per process) and the stop signal.

use std::sync::atomic::{AtomicI32, Ordering};

use super::KsmError;

pub const PAGE_SIZE: u64 = 4096;
pub const MIB: u64 = 1 << 20;

/// A `/proc/meminfo` field in MiB.
pub fn meminfo_mib(field: &str) -> Result<u64, KsmError> {
    let path = "/proc/meminfo";
    let text = std::fs::read_to_string(path).map_err(KsmError::io("reading", path))?;
    parse_meminfo(&text, field).ok_or_else(|| KsmError::Parse {
        path: path.into(),
        content: format!("no {field} line"),
    })
}

pub fn parse_meminfo(text: &str, field: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.split(':').next() == Some(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

pub fn mem_available_mib() -> Result<u64, KsmError> {
    meminfo_mib("MemAvailable")
}

/// Pages of process `pid` that KSM has merged (`/proc/PID/ksm_merging_pages`). statm's third
/// field does not count KSM pages, so this is the per-process measure.
pub fn merging_pages(pid: u32) -> Result<u64, KsmError> {
    let path = format!("/proc/{pid}/ksm_merging_pages");
    let text = std::fs::read_to_string(&path).map_err(KsmError::io("reading", &path))?;
    text.trim().parse().map_err(|_| KsmError::Parse {
        path: path.into(),
        content: text.trim().to_string(),
    })
}

pub fn online_cpus() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop(sig: libc::c_int) {
    STOP_SIGNAL.store(sig, Ordering::SeqCst);
}

/// Turns SIGINT and SIGTERM into a flag that every wait loop of the harness checks, so a stop
/// goes through the normal exit path (guests stopped, KSM settings restored).
pub fn install_stop_handler() -> Result<(), KsmError> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction with a handler that only stores to an atomic is valid;
        // no SA_RESTART, so blocking calls return EINTR and the loops notice the flag.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_stop as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(KsmError::io("installing a handler for", "SIGINT/SIGTERM")(
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

/// Err(Interrupted) once SIGINT or SIGTERM arrived.
pub fn check_stop() -> Result<(), KsmError> {
    match STOP_SIGNAL.load(Ordering::SeqCst) {
        0 => Ok(()),
        libc::SIGINT => Err(KsmError::Interrupted("SIGINT")),
        _ => Err(KsmError::Interrupted("SIGTERM")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn meminfo_fields() {
        let text = "MemTotal:       24684092 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(super::parse_meminfo(text, "MemTotal"), Some(24105));
        assert_eq!(super::parse_meminfo(text, "MemAvailable"), Some(2));
        assert_eq!(super::parse_meminfo(text, "Mem"), None);
    }
}
