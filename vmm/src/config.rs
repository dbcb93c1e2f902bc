//! Option values and the parsers for tern's `key=value,...` option syntax (what a VM is built
//! from, split by who decides it, is in `machine`).

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--{option}: unknown key `{key}` (expected one of: {expected})")]
    UnknownKey {
        option: &'static str,
        key: String,
        expected: &'static str,
    },
    #[error("--{option}: `{item}` is not of the form key=value")]
    NotKeyValue { option: &'static str, item: String },
    #[error("--{option}: {key}=`{value}` is not a valid {what}")]
    BadValue {
        option: &'static str,
        key: &'static str,
        value: String,
        what: &'static str,
    },
    #[error("--memory: size must be at least 2 MiB (got {0} bytes)")]
    MemoryTooSmall(u64),
    #[error("--memory: size must be a whole number of 4 KiB pages (got {0} bytes)")]
    MemoryNotPageAligned(u64),
    #[error("--memory: size {size} bytes is larger than this host can back ({host} bytes of RAM + swap)")]
    MemoryTooLarge { size: u64, host: u64 },
    #[error("--memory: {0}")]
    Conflict(&'static str),
    #[error("--cpus: boot must be between 1 and {max} (got {got})")]
    BadCpuCount { got: u64, max: u8 },
}

/// Guest memory options (`--memory size=512M,mergeable=on,prefault=on`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryConfig {
    pub size: u64,
    /// madvise(MADV_MERGEABLE) on guest RAM so KSM can merge identical pages.
    pub mergeable: bool,
    /// Populate guest RAM up front (MADV_POPULATE_WRITE): slower start, no first-touch faults.
    pub prefault: bool,
    /// Lazy RAM: pages come from this file (offset = guest physical address) on first touch.
    pub lazy_from: Option<PathBuf>,
    /// Injected delay per lazy page, in microseconds (tests, benchmarks).
    pub lazy_delay_us: u64,
    /// Back guest RAM with a memfd mapped MAP_SHARED, so a local migration can hand it over.
    pub shared: bool,
    /// madvise(MADV_HUGEPAGE) on guest RAM: transparent huge pages where the host allows them.
    pub thp: bool,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            size: 512 << 20,
            mergeable: false,
            prefault: false,
            lazy_from: None,
            lazy_delay_us: 0,
            shared: false,
            thp: false,
        }
    }
}

/// Where the first serial port's output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialConfig {
    Tty,
    File(PathBuf),
    Off,
}

/// The second serial port (COM2, 0x2f8, IRQ 3): the host control channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Serial2Config {
    /// tern listens on a Unix socket at this path (created 0600) and connects one client at a
    /// time to the port.
    Socket(PathBuf),
    Off,
}

/// A virtio-balloon device (`--balloon size=SIZE,deflate-on-oom=on`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Initial target: how much memory the guest should give back.
    pub size: u64,
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM: the guest may take pages back under memory pressure.
    pub deflate_on_oom: bool,
}

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelImage {
    /// The built-in test guest embedded in tern.
    Builtin,
    /// An ELF vmlinux or bzImage on disk.
    Path(PathBuf),
}

/// Most vCPUs tern starts (the MP table and the built-in guest's per-CPU tables are sized for it).
pub const MAX_VCPUS: u8 = 64;

fn pairs<'a>(
    option: &'static str,
    text: &'a str,
) -> impl Iterator<Item = Result<(&'a str, &'a str), ConfigError>> {
    text.split(',').filter(|s| !s.is_empty()).map(move |item| {
        item.split_once('=')
            .ok_or_else(|| ConfigError::NotKeyValue {
                option,
                item: item.to_string(),
            })
    })
}

fn parse_switch(option: &'static str, key: &'static str, v: &str) -> Result<bool, ConfigError> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(ConfigError::BadValue {
            option,
            key,
            value: v.to_string(),
            what: "switch (on/off)",
        }),
    }
}

/// Parses a size such as `512M`, `2G`, `4096K` or a plain byte count.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let (digits, shift) = match t.char_indices().last()? {
        (i, 'K' | 'k') => (&t[..i], 10),
        (i, 'M' | 'm') => (&t[..i], 20),
        (i, 'G' | 'g') => (&t[..i], 30),
        (i, 'T' | 't') => (&t[..i], 40),
        _ => (t, 0),
    };
    let n: u64 = digits.parse().ok()?;
    n.checked_mul(1u64 << shift)
}

impl MemoryConfig {
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let mut cfg = MemoryConfig::default();
        for kv in pairs("memory", text) {
            let (k, v) = kv?;
            match k {
                "size" => {
                    cfg.size = parse_size(v).ok_or_else(|| ConfigError::BadValue {
                        option: "memory",
                        key: "size",
                        value: v.to_string(),
                        what: "size (e.g. 512M, 2G)",
                    })?
                }
                "mergeable" => cfg.mergeable = parse_switch("memory", "mergeable", v)?,
                "prefault" => cfg.prefault = parse_switch("memory", "prefault", v)?,
                "shared" => cfg.shared = parse_switch("memory", "shared", v)?,
                "thp" => cfg.thp = parse_switch("memory", "thp", v)?,
                "lazy-from" if !v.is_empty() => cfg.lazy_from = Some(v.into()),
                "lazy-delay-us" => {
                    cfg.lazy_delay_us = v.parse().map_err(|_| ConfigError::BadValue {
                        option: "memory",
                        key: "lazy-delay-us",
                        value: v.to_string(),
                        what: "number of microseconds",
                    })?
                }
                _ => {
                    return Err(ConfigError::UnknownKey {
                        option: "memory",
                        key: k.to_string(),
                        expected:
                            "size, mergeable, prefault, shared, thp, lazy-from, lazy-delay-us",
                    })
                }
            }
        }
        cfg.check()?;
        Ok(cfg)
    }

    /// The checks every memory configuration passes, from the command line or a migration stream.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.size < (2 << 20) {
            return Err(ConfigError::MemoryTooSmall(self.size));
        }
        if !self.size.is_multiple_of(4096) {
            return Err(ConfigError::MemoryNotPageAligned(self.size));
        }
        if self.lazy_from.is_some() && self.prefault {
            return Err(ConfigError::Conflict(
                "prefault=on and lazy-from populate RAM in opposite ways",
            ));
        }
        // KSM merges only private anonymous memory; lazy RAM's userfaultfd works on private.
        if self.shared && self.mergeable {
            return Err(ConfigError::Conflict(
                "shared=on and mergeable=on cannot be combined: KSM merges only private anonymous \
memory, and shared=on backs guest RAM with a shared memfd",
            ));
        }
        if self.shared && self.lazy_from.is_some() {
            return Err(ConfigError::Conflict(
                "lazy-from needs private guest RAM (shared=off)",
            ));
        }
        Ok(())
    }

    /// Refuses sizes the host cannot back: guest RAM is mapped NORESERVE, so the kernel would accept
    /// almost any size and the guest would be OOM-killed later instead of failing now.
    pub fn check_host_fits(&self, host_bytes: u64) -> Result<(), ConfigError> {
        if self.size > host_bytes {
            return Err(ConfigError::MemoryTooLarge {
                size: self.size,
                host: host_bytes,
            });
        }
        Ok(())
    }
}

pub fn parse_cpus(text: &str) -> Result<u8, ConfigError> {
    let mut boot = 1u64;
    for kv in pairs("cpus", text) {
        let (k, v) = kv?;
        match k {
            "boot" => {
                boot = v.parse().map_err(|_| ConfigError::BadValue {
                    option: "cpus",
                    key: "boot",
                    value: v.to_string(),
                    what: "number",
                })?
            }
            _ => {
                return Err(ConfigError::UnknownKey {
                    option: "cpus",
                    key: k.to_string(),
                    expected: "boot",
                })
            }
        }
    }
    check_vcpus(boot)
}

/// The vCPU count check, for the command line and a migration stream alike.
pub fn check_vcpus(n: u64) -> Result<u8, ConfigError> {
    match u8::try_from(n) {
        Ok(n) if (1..=MAX_VCPUS).contains(&n) => Ok(n),
        _ => Err(ConfigError::BadCpuCount {
            got: n,
            max: MAX_VCPUS,
        }),
    }
}

pub fn parse_serial(text: &str) -> Result<SerialConfig, ConfigError> {
    match text {
        "tty" => Ok(SerialConfig::Tty),
        "off" => Ok(SerialConfig::Off),
        _ => match text.split_once('=') {
            Some(("file", path)) if !path.is_empty() => Ok(SerialConfig::File(path.into())),
            _ => Err(ConfigError::BadValue {
                option: "serial",
                key: "mode",
                value: text.to_string(),
                what: "serial backend (tty, off, file=PATH)",
            }),
        },
    }
}

pub fn parse_serial2(text: &str) -> Result<Serial2Config, ConfigError> {
    match text.split_once('=') {
        None if text == "off" => Ok(Serial2Config::Off),
        Some(("socket", path)) if !path.is_empty() => Ok(Serial2Config::Socket(path.into())),
        _ => Err(ConfigError::BadValue {
            option: "serial2",
            key: "mode",
            value: text.to_string(),
            what: "serial2 backend (socket=PATH, off)",
        }),
    }
}

pub fn parse_balloon(text: &str) -> Result<BalloonConfig, ConfigError> {
    let mut b = BalloonConfig {
        size: 0,
        deflate_on_oom: false,
    };
    for kv in pairs("balloon", text) {
        let (k, v) = kv?;
        match k {
            "size" => {
                b.size = parse_size(v)
                    .filter(|n| n.is_multiple_of(4096))
                    .ok_or_else(|| ConfigError::BadValue {
                        option: "balloon",
                        key: "size",
                        value: v.to_string(),
                        what: "size in whole 4 KiB pages (e.g. 64M)",
                    })?
            }
            "deflate-on-oom" => b.deflate_on_oom = parse_switch("balloon", "deflate-on-oom", v)?,
            _ => {
                return Err(ConfigError::UnknownKey {
                    option: "balloon",
                    key: k.to_string(),
                    expected: "size, deflate-on-oom",
                })
            }
        }
    }
    Ok(b)
}

/// Host RAM plus swap, from /proc/meminfo.
pub fn host_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = info.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    Some(field("MemTotal:")? + field("SwapTotal:").unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_options() {
        let m = MemoryConfig::parse("size=1G,mergeable=on,prefault=off").unwrap();
        assert_eq!((m.size, m.mergeable, m.prefault), (1 << 30, true, false));
        assert_eq!(
            MemoryConfig::parse("size=0"),
            Err(ConfigError::MemoryTooSmall(0))
        );
        assert!(matches!(
            MemoryConfig::parse("size=12Q"),
            Err(ConfigError::BadValue { .. })
        ));
        assert!(matches!(
            MemoryConfig::parse("colour=blue"),
            Err(ConfigError::UnknownKey { .. })
        ));
        assert!(matches!(
            MemoryConfig::parse("size"),
            Err(ConfigError::NotKeyValue { .. })
        ));
        assert_eq!(parse_size("99999999999T"), None);
        assert_eq!(
            MemoryConfig::parse("size=3000001"),
            Err(ConfigError::MemoryNotPageAligned(3000001))
        );
    }

    #[test]
    fn shared_memory_options() {
        let m = MemoryConfig::parse("size=1G,shared=on").unwrap();
        assert!(m.shared && !m.mergeable && !m.thp);
        assert!(MemoryConfig::parse("thp=on,mergeable=on").unwrap().thp);
        assert!(MemoryConfig::parse("thp=sometimes").is_err());
        let err = MemoryConfig::parse("size=1G,shared=on,mergeable=on").unwrap_err();
        assert!(err.to_string().contains("KSM"), "{err}");
        assert!(MemoryConfig::parse("shared=on,lazy-from=/tmp/x").is_err());
        assert!(MemoryConfig::parse("shared=maybe").is_err());
    }

    #[test]
    fn cpu_and_serial_options() {
        assert_eq!(parse_cpus("boot=2"), Ok(2));
        assert!(matches!(
            parse_cpus("boot=0"),
            Err(ConfigError::BadCpuCount { .. })
        ));
        assert!(matches!(
            parse_cpus("boot=300"),
            Err(ConfigError::BadCpuCount { .. })
        ));
        assert_eq!(
            parse_serial("file=/tmp/x"),
            Ok(SerialConfig::File("/tmp/x".into()))
        );
        assert!(parse_serial("file=").is_err());
    }

    #[test]
    fn balloon_options() {
        assert_eq!(
            parse_balloon("size=64M,deflate-on-oom=on"),
            Ok(BalloonConfig {
                size: 64 << 20,
                deflate_on_oom: true
            })
        );
        assert_eq!(parse_balloon("").map(|b| b.size), Ok(0));
        assert!(matches!(
            parse_balloon("size=1000"),
            Err(ConfigError::BadValue { key: "size", .. })
        ));
        assert!(matches!(
            parse_balloon("deflate-on-oom=maybe"),
            Err(ConfigError::BadValue { .. })
        ));
        assert!(matches!(
            parse_balloon("pages=3"),
            Err(ConfigError::UnknownKey { .. })
        ));
    }

    #[test]
    fn serial2_options() {
        assert_eq!(parse_serial2("off"), Ok(Serial2Config::Off));
        assert_eq!(
            parse_serial2("socket=/tmp/com2.sock"),
            Ok(Serial2Config::Socket("/tmp/com2.sock".into()))
        );
        for bad in ["socket=", "socket", "tty", "file=/tmp/x", ""] {
            let err = parse_serial2(bad).unwrap_err();
            assert!(
                err.to_string().contains("--serial2"),
                "{bad}: {err} names the option"
            );
        }
    }
}
