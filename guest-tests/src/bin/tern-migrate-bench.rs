//! Migration benchmarks: `tern-migrate-bench` prints a table. Needs `cargo build --release --workspace` first
//! (it runs the `tern` next to itself). Everything is measured side by side in one run.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use guest_tests::tern_binary;

const GIB: usize = 1 << 30;

/// Throughput of a plain 1 GiB copy through a Unix socket between two threads, in MB/s.
fn raw_socket_copy() -> Result<f64> {
    let (mut a, mut b) = UnixStream::pair()?;
    let reader = std::thread::spawn(move || -> std::io::Result<usize> {
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0;
        while total < GIB {
            let n = b.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n;
        }
        Ok(total)
    });
    let chunk = vec![0x5au8; 1 << 20];
    let t0 = Instant::now();
    for _ in 0..GIB / chunk.len() {
        a.write_all(&chunk)?;
    }
    let got = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    let secs = t0.elapsed().as_secs_f64();
    if got != GIB {
        bail!("raw copy moved {got} bytes");
    }
    Ok(GIB as f64 / secs / 1e6)
}

struct Tern {
    child: Child,
}

impl Drop for Tern {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts tern and waits until its stderr (or stdout, for the guest) shows `ready`.
fn start(args: &[&str], ready: &str) -> Result<Tern> {
    let mut child = Command::new(tern_binary()?)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting tern")?;
    let out = child.stdout.take().context("stdout")?;
    let err = child.stderr.take().context("stderr")?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    for stream in [Box::new(out) as Box<dyn Read + Send>, Box::new(err)] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains(ready) => break,
            Ok(_) => {}
            Err(_) => bail!("tern {args:?} never printed `{ready}`"),
        }
    }
    // Keep draining so tern never blocks on a full pipe.
    std::thread::spawn(move || while rx.recv().is_ok() {});
    Ok(Tern { child })
}

fn remote(sock: &Path, args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new(tern_binary()?)
        .arg("remote")
        .arg("--api-socket")
        .arg(sock)
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "tern remote {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Migrates a guest started with `guest_args` once, after its output showed `ready`; returns the
/// source's final figures.
fn migrate_once(
    dir: &Path,
    name: &str,
    guest_args: &[&str],
    ready: &str,
) -> Result<serde_json::Value> {
    let sock = dir.join(format!("{name}.sock"));
    let mig = format!("unix:{}", dir.join(format!("{name}.mig")).display());
    let sock_s = sock.to_string_lossy().into_owned();
    let mut args: Vec<&str> = guest_args.to_vec();
    args.extend_from_slice(&["--api-socket", &sock_s]);
    let src = start(&args, ready)?;
    let _dst = start(
        &["--incoming", &mig, "--serial", "off"],
        "waiting for an incoming migration",
    )?;
    let status = remote(&sock, &["migrate", &mig]);
    drop(src);
    status
}

fn row(what: &str, s: &serde_json::Value) {
    println!(
        "| {what} | {:.1} | {:.1} | {:.0} | {} | {} | {} |",
        s["total_ms"].as_f64().unwrap_or(f64::NAN),
        s["downtime_ms"].as_f64().unwrap_or(f64::NAN),
        s["throughput_mbps"].as_f64().unwrap_or(f64::NAN),
        s["bytes"].as_u64().unwrap_or(0) / 1_000_000,
        s["iteration"].as_u64().unwrap_or(0),
        s["pages_full"].as_u64().unwrap_or(0),
    );
}

fn main() -> Result<()> {
    let dir: PathBuf = std::env::temp_dir().join(format!("tern-mbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let raw = raw_socket_copy()?;
    println!("| raw copy of 1 GiB through a Unix socket | {raw:.0} MB/s |");
    println!("|---|---|");
    println!();
    println!("| workload | total ms | downtime ms | MB/s | MB sent | iterations | full pages |");
    println!("|---|---|---|---|---|---|---|");
    let idle = migrate_once(
        &dir,
        "idle1g",
        &[
            "--memory",
            "size=1200M",
            "--cmdline",
            "suite=idle fill=1024",
        ],
        "idle: halting",
    )?;
    row("1 GiB filled, idle", &idle);
    for ws in [64, 256] {
        let cmd = format!("suite=dirty mib={ws} static=16");
        let s = migrate_once(
            &dir,
            &format!("dirty{ws}"),
            &["--memory", "size=1G", "--cmdline", &cmd],
            "dirty round=",
        )?;
        row(&format!("dirty working set {ws} MiB (300 ms budget)"), &s);
    }
    let big = migrate_once(
        &dir,
        "zero8g",
        &["--memory", "size=8G", "--cmdline", "suite=idle"],
        "idle: halting",
    )?;
    row("8 GiB, mostly untouched", &big);
    let ratio = idle["throughput_mbps"].as_f64().unwrap_or(0.0) / raw;
    println!();
    println!(
        "1 GiB idle migration throughput / raw socket copy: {:.0} %",
        ratio * 100.0
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
