//! Host-side harness for tern guest suites: finding the tern binary, small statistics, the KSM
//! stress test ([`ksm`]), the async page fault suite with its lazy memory file ([`apf`]), Linux guests restored from a
//! booted snapshot ([`linux`]) and a fault-injection relay for migrations ([`relay`]).

use std::path::PathBuf;

pub mod apf;
pub mod ksm;
pub mod linux;
pub mod linux_apf;
pub mod relay;

use anyhow::{bail, Context, Result};

/// The `tern` binary built alongside this crate's binaries (same target directory and profile).
pub fn tern_binary() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("TERN_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating this program")?;
    let dir = exe.parent().context("program has no directory")?;
    // Test binaries live one level deeper (target/<profile>/deps).
    for candidate in [dir.join("tern"), dir.join("../tern")] {
        if candidate.exists() {
            return Ok(candidate);
        }
    }
    bail!(
        "cannot find the tern binary next to {}: run `cargo build --release --workspace` first or set TERN_BIN",
        exe.display()
    )
}

/// The first number after `marker` in `text` (tern's stderr figures: "... after 12.5 ms",
/// "... placed N pages in 93.0 ms").
pub fn number_after(text: &str, marker: &str) -> Option<f64> {
    let rest = text.split(marker).nth(1)?;
    rest.split_whitespace().find_map(|w| w.parse::<f64>().ok())
}

/// The median of `values` (sorted in place); NaN for none.
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(super::median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(super::median(&mut []).is_nan());
    }

    #[test]
    fn number_after_a_marker() {
        let line = "tern: lazy memory: background pass placed 7006 pages in 127.6 ms (49 faults)";
        assert_eq!(super::number_after(line, " pages in"), Some(127.6));
        assert_eq!(super::number_after(line, "no such"), None);
    }
}
