//! Linux guests from a booted snapshot: the test kernel and initramfs (`guest-tests/linux/build.sh`,
//! with tern's guest programs), booted once to its COM2 command channel (`tern.init=serve`) and
//! snapshotted into the cache; every user then restores that snapshot lazily (running in
//! milliseconds instead of a ~40-80 s boot here) and runs commands over COM2.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Guest RAM of the booted snapshot (`mergeable=on`: KSM suites need it; harmless otherwise).
pub const SNAPSHOT_MEMORY: &str = "size=512M,mergeable=on";
/// vCPUs of the booted snapshot.
pub const SNAPSHOT_CPUS: u32 = 2;
/// Appended to tern's default Linux command line: the guest serves commands on COM2, and keeps
/// time with kvmclock: on this host the guest's TSC is the host's (writing IA32_TSC does not move
/// it, docs/machine-kvm.md), so a snapshot restored N minutes later sees its TSC N minutes ahead,
/// and with `clocksource=tsc` Linux then spends minutes of emulated CPL0 catching its timer wheel
/// up; kvmclock restarts where the snapshot left it (KVM_SET_CLOCK). RCU stall reports are
/// off: on a host whose cores are shared, the emulated guest kernel looks stalled now and then,
/// and printing the report (stack dumps on the serial console) slows it down further.
pub const SNAPSHOT_CMDLINE: &str =
    "tern.init=serve clocksource=kvm-clock rcupdate.rcu_cpu_stall_suppress=1";
/// A boot to the command channel, generous: ~40-80 s here, more when the cores are shared.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(400);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The kernel and initramfs (built or found in the cache).
pub struct Image {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

pub fn image() -> Result<Image> {
    let out = Command::new("bash")
        .arg(repo_root().join("guest-tests/linux/build.sh"))
        .stderr(Stdio::inherit())
        .output()
        .context("running guest-tests/linux/build.sh")?;
    if !out.status.success() {
        bail!(
            "guest-tests/linux/build.sh failed ({:?})",
            out.status.code()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(PathBuf::from)
            .ok_or_else(|| anyhow!("no {key} line from build.sh: {text}"))
    };
    Ok(Image {
        kernel: value("KERNEL=")?,
        initramfs: value("INITRAMFS=")?,
    })
}

/// FNV-1a over the parts: a cache key (not a security boundary).
fn key(parts: &[&[u8]]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.iter().chain(&[0xff]) {
            h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// Holds an exclusive flock on a file while alive (closing the file releases it).
struct Lock(#[allow(dead_code)] std::fs::File);

impl Lock {
    fn take(path: &Path) -> Result<Lock> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            bail!(
                "flock {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(Lock(f))
    }
}

/// The booted-Linux snapshot for this kernel, initramfs, command line, guest size and snapshot
/// format: from the cache, or made now (one boot; concurrent callers wait for it).
pub fn booted_snapshot(tern: &Path) -> Result<PathBuf> {
    let img = image()?;
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let (kernel, initramfs) = (read(&img.kernel)?, read(&img.initramfs)?);
    let version = migration::stream::SNAPSHOT_VERSION.to_le_bytes();
    let shape = format!("{SNAPSHOT_MEMORY} {SNAPSHOT_CPUS} {SNAPSHOT_CMDLINE}");
    let k = key(&[&kernel, &initramfs, shape.as_bytes(), &version]);
    let cache = std::env::var_os("TERN_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cache"))
        .join("linux-snapshots");
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let snap = cache.join(format!("{k}.snap"));
    let _lock = Lock::take(&cache.join(".lock"))?;
    if snap.exists() {
        return Ok(snap);
    }
    let t = Instant::now();
    eprintln!(
        "linux-snapshot: booting the guest once for {} (key {k})",
        snap.display()
    );
    make_snapshot(tern, &img, &cache.join(format!("{k}.boot")), &snap)?;
    eprintln!(
        "linux-snapshot: ready in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(snap)
}

/// Deletes a cached snapshot that could not be restored (e.g. tern's state format changed).
pub fn forget_snapshot(snap: &Path) {
    let _ = std::fs::remove_file(snap);
}

fn make_snapshot(tern: &Path, img: &Image, work: &Path, snap: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work)?;
    let console = work.join("console");
    let api = work.join("api.sock");
    let mut child = Command::new(tern)
        .arg("--kernel")
        .arg(&img.kernel)
        .arg("--initramfs")
        .arg(&img.initramfs)
        .args(["--memory", SNAPSHOT_MEMORY])
        .args(["--cpus", &format!("boot={SNAPSHOT_CPUS}")])
        .args(["--cmdline-append", SNAPSHOT_CMDLINE])
        .arg("--serial")
        .arg(format!("file={}", console.display()))
        .arg("--serial2")
        .arg(format!("socket={}", work.join("com2.sock").display()))
        .arg("--api-socket")
        .arg(&api)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.join("stderr"))?)
        .spawn()
        .context("starting tern")?;
    let result = wait_for_file_line(&console, "tern-linux: serving", BOOT_TIMEOUT, &mut child)
        .and_then(|()| {
            remote(
                tern,
                &api,
                &["migrate", &format!("file:{}", snap.display())],
            )
        });
    let _ = child.kill();
    let _ = child.wait();
    result
        .map(|_| ())
        .with_context(|| format!("booting Linux for a snapshot (logs in {})", work.display()))
}

/// `tern remote --api-socket API ARGS...`: its stdout (the JSON result), or an error with both
/// of its outputs.
pub fn remote(tern: &Path, api: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(tern)
        .arg("remote")
        .arg("--api-socket")
        .arg(api)
        .args(args)
        .output()
        .context("tern remote")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "tern remote {args:?}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

fn wait_for_file_line(
    path: &Path,
    needle: &str,
    timeout: Duration,
    child: &mut Child,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if std::fs::read_to_string(path).is_ok_and(|t| t.contains(needle)) {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("tern ended ({status}) before `{needle}`");
        }
        if Instant::now() > deadline {
            bail!("no `{needle}` within {} s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A Linux guest restored from the booted snapshot, with its COM2 command channel.
pub struct LinuxVm {
    pub child: Child,
    pub dir: PathBuf,
    pub api: PathBuf,
    com2: Option<(UnixStream, BufReader<UnixStream>)>,
}

/// What a command printed and its exit status.
#[derive(Debug)]
pub struct Ran {
    pub status: i32,
    pub output: String,
}

impl LinuxVm {
    /// Restores `snap` in `dir` (COM1 to `dir/console`, COM2 on `dir/com2.sock`, API on
    /// `dir/api.sock`) with `extra` options (e.g. `--restore lazy`, `--postcopy`).
    pub fn restore(tern: &Path, snap: &Path, dir: &Path, extra: &[&str]) -> Result<LinuxVm> {
        let mut vm = Self::incoming(tern, &format!("file:{}", snap.display()), dir, extra)?;
        vm.connect(&vm.com2_path())?;
        Ok(vm)
    }

    /// tern receiving this guest from `uri` (a migration, or `file:` for a snapshot) in `dir`:
    /// COM1 to `dir/console`, COM2 on `dir/com2.sock`, API on `dir/api.sock`, plus `extra`.
    pub fn incoming(tern: &Path, uri: &str, dir: &Path, extra: &[&str]) -> Result<LinuxVm> {
        std::fs::create_dir_all(dir)?;
        let api = dir.join("api.sock");
        let child = Command::new(tern)
            .args(["--incoming", uri])
            .arg("--serial")
            .arg(format!("file={}", dir.join("console").display()))
            .arg("--serial2")
            .arg(format!("socket={}", dir.join("com2.sock").display()))
            .arg("--api-socket")
            .arg(&api)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr"))?)
            .spawn()
            .context("starting tern")?;
        Ok(LinuxVm {
            child,
            dir: dir.to_path_buf(),
            api,
            com2: None,
        })
    }

    /// Connects to this VM's COM2 socket (waits for it to appear).
    pub fn connect(&mut self, sock: &Path) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let s = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    bail!("COM2 socket {}: {e}\n{}", sock.display(), self.describe())
                }
                Err(_) => {
                    if let Some(st) = self.child.try_wait()? {
                        bail!("tern ended ({st})\n{}", self.describe());
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let r = BufReader::new(s.try_clone()?);
        self.com2 = Some((s, r));
        Ok(())
    }

    pub fn com2_path(&self) -> PathBuf {
        self.dir.join("com2.sock")
    }

    /// Runs `cmd` with the guest's sh, returning its output and status (within `timeout`).
    pub fn run(&mut self, cmd: &str, timeout: Duration) -> Result<Ran> {
        if cmd.contains('\n') {
            bail!("a command is one line");
        }
        let Some((w, r)) = self.com2.as_mut() else {
            bail!("not connected to COM2");
        };
        w.write_all(format!("{cmd}\n").as_bytes())?;
        r.get_ref().set_read_timeout(Some(timeout))?;
        let mut output = String::new();
        loop {
            let mut line = String::new();
            let n = r
                .read_line(&mut line)
                .with_context(|| format!("reading the answer to `{cmd}`"))?;
            if n == 0 {
                bail!("COM2 closed during `{cmd}`\n{}", self.describe());
            }
            if let Some(s) = line.trim_end().strip_prefix("tern-linux: done status=") {
                let status = s.parse().unwrap_or(-1);
                return Ok(Ran { status, output });
            }
            output.push_str(&line);
        }
    }

    /// Runs an idempotent `cmd` until it does not die of SIGSEGV (3 tries; said on stderr): a
    /// busybox applet started in a restored Linux guest now and then does (docs/machine-kvm.md,
    /// "Open"); fails unless it then exits 0.
    pub fn check_retrying(&mut self, cmd: &str, timeout: Duration) -> Result<String> {
        for _ in 0..3 {
            let ran = self.run(cmd, timeout)?;
            if ran.status == 139 {
                eprintln!("linux: `{cmd}` died of SIGSEGV in the guest; running it again");
                continue;
            }
            if ran.status != 0 {
                bail!("`{cmd}` exited {}: {}", ran.status, ran.output);
            }
            return Ok(ran.output);
        }
        bail!("`{cmd}` died of SIGSEGV three times\n{}", self.describe())
    }

    /// Runs `cmd` and fails unless it exits 0.
    pub fn check(&mut self, cmd: &str, timeout: Duration) -> Result<String> {
        let ran = self.run(cmd, timeout)?;
        if ran.status != 0 {
            bail!("`{cmd}` exited {}: {}", ran.status, ran.output);
        }
        Ok(ran.output)
    }

    /// Console and stderr, for failure messages.
    pub fn describe(&self) -> String {
        let read = |n: &str| std::fs::read_to_string(self.dir.join(n)).unwrap_or_default();
        let tail = |t: String| {
            let lines: Vec<&str> = t.lines().collect();
            lines[lines.len().saturating_sub(15)..].join("\n")
        };
        format!(
            "--- {} console (tail):\n{}\n--- stderr:\n{}",
            self.dir.display(),
            tail(read("console")),
            tail(read("stderr"))
        )
    }

    /// Waits for tern to exit; its status code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<i32>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st.code());
            }
            if Instant::now() > deadline {
                bail!(
                    "tern did not exit within {} s\n{}",
                    timeout.as_secs(),
                    self.describe()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for LinuxVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
