//! `tern-suite apf`: runs the built-in guest's `apf` suite with lazy guest memory, writing the
//! pattern file the suite checks itself (a sparse file: zeros, the pattern at the suite's pages).

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

pub const USAGE: &str = "usage: tern-suite apf [--pages N] [--async-pf kvm|tern|off] \
[--lazy-delay-us US] [--memory SIZE] [--file PATH]";

/// Where the suite's lazy pages start by default (`lazy=` in the guest).
pub const LAZY_BASE: u64 = 0x400_0000;
const PAGE: u64 = 4096;
/// The suite's own limit (`pages` in 1..=MAX_PAGES).
const MAX_PAGES: u64 = 4096;

/// What the guest expects at every qword `x` of its lazy pages.
pub fn apf_pattern(x: u64) -> u64 {
    x.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x7465_726E_6170_6621
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub pages: u64,
    pub async_pf: String,
    pub lazy_delay_us: u64,
    pub memory: String,
    /// Where to write the pattern file (default: a temporary file, removed afterwards).
    pub file: Option<PathBuf>,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut o = Options {
            pages: 64,
            async_pf: "kvm".into(),
            lazy_delay_us: 1000,
            memory: "256M".into(),
            file: None,
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let value = it.next().with_context(|| format!("{flag} needs a value"))?;
            let number = || -> Result<u64> {
                value
                    .parse()
                    .with_context(|| format!("{flag} {value}: not a number"))
            };
            match flag.as_str() {
                "--pages" => o.pages = number()?,
                "--async-pf" => o.async_pf = value.clone(),
                "--lazy-delay-us" => o.lazy_delay_us = number()?,
                "--memory" => o.memory = value.clone(),
                "--file" => o.file = Some(value.into()),
                other => bail!("unknown option {other}"),
            }
        }
        if !(1..=MAX_PAGES).contains(&o.pages) {
            bail!("--pages must be in 1..={MAX_PAGES}");
        }
        if !["kvm", "tern", "off"].contains(&o.async_pf.as_str()) {
            bail!("--async-pf must be kvm, tern or off");
        }
        Ok(o)
    }
}

/// Writes a sparse file holding the pattern at [LAZY_BASE, LAZY_BASE + pages pages).
pub fn write_pattern_file(path: &Path, pages: u64) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.seek(SeekFrom::Start(LAZY_BASE))?;
    let mut page = Vec::with_capacity(PAGE as usize);
    for p in 0..pages {
        page.clear();
        let base = LAZY_BASE + p * PAGE;
        for q in 0..PAGE / 8 {
            page.extend_from_slice(&apf_pattern(base + q * 8).to_le_bytes());
        }
        f.write_all(&page)?;
    }
    Ok(())
}

/// The run's outcome: whether the guest passed, and its output.
pub struct Outcome {
    pub passed: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Writes the pattern file, runs tern with it and the suite, and removes a temporary file.
pub fn run(opts: &Options, tern: &Path) -> Result<Outcome> {
    let (file, temporary) = match &opts.file {
        Some(f) => (f.clone(), false),
        None => (
            std::env::temp_dir().join(format!("tern-apf-{}.img", std::process::id())),
            true,
        ),
    };
    write_pattern_file(&file, opts.pages)
        .with_context(|| format!("writing the pattern file {}", file.display()))?;
    let expect_async = u8::from(opts.async_pf != "off");
    let out = Command::new(tern)
        .arg("--memory")
        .arg(format!(
            "size={},lazy-from={},lazy-delay-us={}",
            opts.memory,
            file.display(),
            opts.lazy_delay_us
        ))
        .args(["--async-pf", &opts.async_pf, "--cmdline"])
        .arg(format!(
            "suite=apf pages={} expect_async={expect_async}",
            opts.pages
        ))
        .output();
    if temporary {
        let _ = std::fs::remove_file(&file);
    }
    let out = out.with_context(|| format!("running {}", tern.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    Ok(Outcome {
        passed: out.status.success()
            && stdout
                .lines()
                .any(|l| l.trim_end() == "tern-guest: apf PASS"),
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_and_pattern_file() {
        let args = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        let o = Options::parse(&args("--pages 8 --async-pf tern")).unwrap();
        assert_eq!((o.pages, o.async_pf.as_str()), (8, "tern"));
        assert!(Options::parse(&args("--pages 0")).is_err());
        assert!(Options::parse(&args("--async-pf maybe")).is_err());
        assert!(Options::parse(&args("--pages")).is_err());

        let path = std::env::temp_dir().join(format!("tern-apf-unit-{}.img", std::process::id()));
        write_pattern_file(&path, 2).unwrap();
        let data = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(data.len() as u64, LAZY_BASE + 2 * PAGE);
        let at = |x: u64| u64::from_le_bytes(data[x as usize..x as usize + 8].try_into().unwrap());
        assert_eq!(at(LAZY_BASE), apf_pattern(LAZY_BASE));
        assert_eq!(at(LAZY_BASE + PAGE + 8), apf_pattern(LAZY_BASE + PAGE + 8));
        assert_eq!(at(LAZY_BASE - 8), 0);
    }
}
