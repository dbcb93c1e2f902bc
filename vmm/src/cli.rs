//! Command-line interface.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::apf::AsyncPfMode;
use crate::config::{self, KernelImage, MemoryConfig, Serial2Config};
use crate::logger::LogLevel;
use crate::machine::{BalloonSpec, BootConfig, HostOptions, MachineConfig, VmConfig};
use crate::seccomp::SeccompMode;

/// The command line Linux guests get when none is given: what this machine's nested KVM needs
/// (see README.md, "Linux guests").
pub const LINUX_DEFAULT_CMDLINE: &str = "console=ttyS0 noxsave \
clearcpuid=308,59,534,288,151,590,298,145,141,154,297,580 mitigations=off nokaslr tsc=reliable \
no_timer_check reboot=k panic=-1 rdinit=/init rodata=off random.trust_cpu=on";

/// The built-in guest's default suite.
pub const BUILTIN_DEFAULT_CMDLINE: &str = "suite=hello";

/// An on/off option clap parses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

#[derive(Debug, Parser)]
#[command(
    name = "tern",
    version,
    about = "tern: a small KVM virtual machine monitor with live migration",
    long_about = "tern boots a guest on KVM. Without --kernel it boots its built-in test guest, \
whose suite is chosen with --cmdline \"suite=NAME\" (hello, memtest, dirty, idle). \
`tern remote` drives a running tern through its --api-socket.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Send a command to a running tern's API socket.
    Remote(RemoteArgs),
}

#[derive(Debug, Args)]
pub struct RemoteArgs {
    /// The running tern's --api-socket.
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
    #[command(subcommand)]
    pub command: RemoteCommand,
}

#[derive(Debug, Subcommand)]
pub enum RemoteCommand {
    /// VM state, vCPUs, memory, uptime.
    Status,
    /// Pause all vCPUs.
    Pause,
    /// Resume all vCPUs. Refused where the guest may run elsewhere (a source in postmigrate, either
    /// side of a broken postcopy).
    Resume {
        /// Resume a parked source anyway: only when you know the destination never ran the guest
        /// (it is gone), or the guest runs twice.
        #[arg(long)]
        force: bool,
    },
    /// Migrate the guest to unix:PATH, tcp:HOST:PORT or file:PATH (a snapshot); waits for the end.
    /// unix:PATH,local=on hands shared=on guest RAM over to a destination on this host instead of
    /// copying it.
    Migrate {
        uri: String,
        /// Return at once; follow with migrate-status.
        #[arg(long)]
        detach: bool,
        /// Reconnect a paused postcopy (state postcopy-paused) to a destination that runs
        /// `migrate-recover URI`, and send it the pages it still lacks.
        #[arg(long)]
        resume: bool,
    },
    /// Destination of a paused postcopy (state postcopy-paused): listen on URI for the source's
    /// `migrate URI --resume`.
    MigrateRecover { uri: String },
    /// The current or last migration's figures, as JSON.
    MigrateStatus,
    /// Switch the running migration to postcopy (needs --postcopy on both sides; refused when
    /// no precopy runs on this side).
    MigrateStartPostcopy,
    /// Cancel the running outgoing migration before its switch: the guest keeps running here and
    /// the destination drops what it received. Refused once the switch has begun.
    MigrateCancel,
    /// Set the balloon's target: how much memory the guest should give back (e.g. 64M; 0
    /// gives it all back to the guest). Needs --balloon.
    Balloon { size: String },
    /// Stop the VM and tern. Refused where this side holds pages a guest running on the
    /// destination still needs (a postcopy source), unless --force.
    Quit {
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Guest RAM: size=SIZE[,mergeable=on|off][,prefault=on|off][,shared=on|off]
    /// [,lazy-from=FILE[,lazy-delay-us=N]]. Private anonymous memory by default, which is what
    /// KSM can merge: mergeable=on marks it MADV_MERGEABLE; prefault=on populates it before the
    /// guest starts; shared=on backs it with memfds a local migration hands over (not with
    /// mergeable=on: KSM merges only private anonymous memory); lazy-from=FILE fills each page
    /// from FILE (offset = guest physical address) on first touch (userfaultfd).
    #[arg(long, value_name = "size=SIZE,...", default_value = "size=512M")]
    pub memory: String,

    /// vCPUs: boot=N, each on its own thread.
    #[arg(long, value_name = "boot=N", default_value = "boot=1")]
    pub cpus: String,

    /// ELF vmlinux or bzImage to boot (default: the built-in test guest).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// Kernel command line (default: "suite=hello" for the built-in guest, or the Linux options
    /// this machine needs for a Linux kernel).
    #[arg(long, value_name = "STRING")]
    pub cmdline: Option<String>,

    /// Words appended to the command line (the default one or --cmdline), e.g.
    /// `--cmdline-append "tern.run=sleep,20"` for a Linux guest.
    #[arg(long, value_name = "STRING")]
    pub cmdline_append: Option<String>,

    /// Initramfs to load for a Linux kernel.
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,

    /// First serial port (COM1, 0x3f8): tty (tern's stdin/stdout), file=PATH or off.
    #[arg(long, value_name = "tty|file=PATH|off", default_value = "tty")]
    pub serial: String,

    /// Second serial port (COM2, 0x2f8, IRQ 3), the host control channel: socket=PATH (tern
    /// listens on a Unix socket, created 0600, and connects one client at a time: its bytes go to
    /// the guest, the guest's output to it; output is dropped while no client is connected) or off.
    #[arg(long, value_name = "socket=PATH|off", default_value = "off")]
    pub serial2: String,

    /// A virtio-balloon device (virtio-mmio): size=SIZE is the initial target the guest is asked
    /// to give back (`tern remote balloon SIZE` changes it), deflate-on-oom=on lets the guest take
    /// pages back under memory pressure.
    #[arg(long, value_name = "size=SIZE[,deflate-on-oom=on|off]")]
    pub balloon: Option<String>,

    /// QEMU's pc-testdev (kvm-unit-tests' runner passes on): a scratch register at 0xe0, a
    /// flush-page port at 0xe4, IRQ-line ports at 0x2000 and 64 KiB of MMIO at 0xff000000. Off by
    /// default, as QEMU has it only with `-device pc-testdev`.
    #[arg(
        long,
        value_enum,
        value_name = "on|off",
        default_value = "off",
        conflicts_with = "incoming"
    )]
    pub testdev: Switch,

    /// Paravirtual async page faults: kvm (KVM owns the protocol), tern (tern owns the MSRs and
    /// the PAGE_NOT_PRESENT / PAGE_READY injection), off (not offered to the guest).
    #[arg(long, value_enum, value_name = "kvm|tern|off", default_value = "kvm")]
    pub async_pf: AsyncPfMode,

    /// seccomp filters on every thread: on (a forbidden system call stops tern with a report
    /// naming it), log (the kernel logs it and it runs), off.
    #[arg(long, value_enum, value_name = "on|log|off", default_value = "on")]
    pub seccomp: SeccompMode,

    /// Log level on stderr: error, warn, info, debug.
    #[arg(
        long,
        value_enum,
        value_name = "error|warn|info|debug",
        default_value = "warn"
    )]
    pub log_level: LogLevel,

    /// Control API: a Unix socket (created 0600) speaking newline-delimited JSON (docs/api.md).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// Receive a migrated guest from unix:PATH, tcp:HOST:PORT or file:PATH (a snapshot) instead
    /// of booting one; the stream carries the VM's configuration.
    #[arg(long, value_name = "URI", conflicts_with_all = ["kernel", "initramfs", "cmdline", "cmdline_append", "memory", "cpus", "balloon"])]
    pub incoming: Option<String>,

    /// `--incoming file:` only: `eager` reads all of the snapshot's RAM before the guest runs;
    /// `lazy` runs it at once and serves pages from the file on first touch (and in the
    /// background).
    #[arg(long, value_enum, default_value = "eager", requires = "incoming")]
    pub restore: crate::migrate::restore::RestoreMode,

    /// `--restore lazy`: wait this long for each stored page the file gives (a stand-in for
    /// slow storage, as `lazy-delay-us` is for lazy memory; async-PF tests use it).
    #[arg(long, value_name = "US", default_value_t = 0, requires = "incoming")]
    pub restore_delay_us: u64,

    /// Outgoing migrations: stop the guest once the rest fits this downtime at the measured
    /// bandwidth.
    #[arg(long, value_name = "MS", default_value_t = 300)]
    pub downtime_ms: u64,

    /// Outgoing migrations: stop the guest after this many dirty-page iterations at the latest.
    #[arg(long, value_name = "N", default_value_t = 30)]
    pub max_iterations: u32,

    /// Outgoing migrations: stop the guest after this many seconds of precopy at the latest
    /// (with --postcopy: switch to postcopy then).
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    pub timeout: u64,

    /// Outgoing precopy: space the dirty passes so that a guest that keeps writing keeps about
    /// this share of its time (each page a pass write-protects again costs the guest one fault
    /// at its next write, --write-fault-us). 0 sends the passes back to back; at most 95.
    #[arg(long, value_name = "PERCENT", default_value_t = 50,
          value_parser = clap::value_parser!(u8).range(0..=95))]
    pub precopy_guest_share: u8,

    /// What one write-protect fault costs a guest on this host, in µs (pacing of
    /// --precopy-guest-share; 6.4 measured on the development host, docs/machine-kvm.md).
    #[arg(long, value_name = "US", default_value_t = 6.4, value_parser = parse_fault_us)]
    pub write_fault_us: f64,

    /// Enable postcopy (both sides): the source may switch to postcopy (`tern remote
    /// migrate-start-postcopy`, --postcopy-after-iterations, or --timeout) and the destination
    /// accepts it (userfaultfd).
    #[arg(long)]
    pub postcopy: bool,

    /// Outgoing migrations with --postcopy: switch after this many precopy iterations.
    #[arg(long, value_name = "N", requires = "postcopy")]
    pub postcopy_after_iterations: Option<u32>,

    /// Outgoing postcopy: send requested pages on a second connection (the preempt channel) so
    /// they never wait behind the background push; `off` keeps everything on one connection.
    #[arg(long, value_enum, value_name = "on|off", default_value = "on")]
    pub postcopy_preempt: Switch,

    /// Outgoing postcopy: limit the background push to this many bytes a second (`K`, `M`, `G`
    /// suffixes: 64M is 64 MiB/s); requested pages always go at once. Default: no limit.
    #[arg(long, value_name = "SIZE", requires = "postcopy", value_parser = parse_bandwidth)]
    pub postcopy_bandwidth: Option<u64>,
}

/// A `--write-fault-us` that is not a number of microseconds in range.
#[derive(Debug, thiserror::Error)]
#[error("invalid --write-fault-us {0:?}: microseconds, 0 to 10000")]
pub struct FaultCostError(String);

fn parse_fault_us(text: &str) -> Result<f64, FaultCostError> {
    match text.parse::<f64>() {
        Ok(us) if us.is_finite() && (0.0..=10_000.0).contains(&us) => Ok(us),
        _ => Err(FaultCostError(text.to_string())),
    }
}

impl RunArgs {
    /// How precopy spaces its passes (--precopy-guest-share, --write-fault-us).
    pub fn pacing(&self) -> migration::pacing::PassPacing {
        migration::pacing::PassPacing {
            guest_share: f64::from(self.precopy_guest_share) / 100.0,
            fault_cost: std::time::Duration::from_secs_f64(self.write_fault_us / 1e6),
        }
    }
}

/// A `--postcopy-bandwidth` that is not a positive size.
#[derive(Debug, thiserror::Error)]
#[error("invalid --postcopy-bandwidth {0:?}: bytes a second, e.g. 64M")]
pub struct BandwidthError(String);

fn parse_bandwidth(text: &str) -> Result<u64, BandwidthError> {
    match config::parse_size(text) {
        Some(n) if n > 0 => Ok(n),
        _ => Err(BandwidthError(text.to_string())),
    }
}

impl RunArgs {
    /// The VM to boot: the machine and what to load into it (COM2 if the host gives it a
    /// backend).
    pub fn vm_config(&self, host: &HostOptions) -> anyhow::Result<VmConfig> {
        let memory = MemoryConfig::parse(&self.memory)?;
        if let Some(host) = config::host_memory_bytes() {
            memory.check_host_fits(host)?;
        }
        let kernel = match &self.kernel {
            Some(p) => KernelImage::Path(p.clone()),
            None => KernelImage::Builtin,
        };
        let cmdline = match (&self.cmdline, &kernel) {
            (Some(c), _) => c.clone(),
            (None, KernelImage::Builtin) => BUILTIN_DEFAULT_CMDLINE.into(),
            // A multiboot kernel gets only its path (kvm-unit-tests reads its arguments here).
            (None, KernelImage::Path(p)) if crate::boot::is_multiboot(p) => String::new(),
            (None, KernelImage::Path(_)) => LINUX_DEFAULT_CMDLINE.into(),
        };
        let cmdline = match &self.cmdline_append {
            Some(extra) => format!("{cmdline} {extra}"),
            None => cmdline,
        };
        let balloon = self
            .balloon
            .as_deref()
            .map(config::parse_balloon)
            .transpose()?;
        Ok(VmConfig {
            machine: MachineConfig {
                memory,
                vcpus: config::parse_cpus(&self.cpus)?,
                balloon: balloon.as_ref().map(|b| BalloonSpec {
                    deflate_on_oom: b.deflate_on_oom,
                }),
                serial2: host.serial2 != Serial2Config::Off,
                testdev: self.testdev == Switch::On,
            },
            boot: BootConfig {
                kernel,
                cmdline,
                initramfs: self.initramfs.clone(),
                balloon_target: balloon.map_or(0, |b| b.size),
            },
        })
    }

    /// What this host chooses for the VM it runs, booted or received.
    pub fn host_options(&self) -> anyhow::Result<HostOptions> {
        Ok(HostOptions {
            serial: config::parse_serial(&self.serial)?,
            serial2: config::parse_serial2(&self.serial2)?,
            async_pf: self.async_pf,
            postcopy: self.postcopy,
            restore: self.restore,
            restore_delay: std::time::Duration::from_micros(self.restore_delay_us),
            api_socket: self.api_socket.clone(),
            seccomp: self.seccomp,
        })
    }
}
