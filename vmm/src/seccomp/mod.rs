//! Per-thread seccomp filters (rust-vmm `seccompiler`): each of tern's threads, once set up,
//! may make only the system calls its work needs. `--seccomp on` (default) stops tern with a
//! report naming the thread and the call; `log` lets the call run and the kernel log it
//! (audit / dmesg `type=SECCOMP`); `off` installs nothing.
//!
//! Filters stack: a thread inherits its creator's filter. The main thread's (installed when the
//! event loop starts) therefore also covers what the threads it starts later need (API clients,
//! the outgoing migration); each thread adds its own on top.

mod args;
mod names;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};

/// `--seccomp` (parsed by clap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// A forbidden system call stops tern with a report naming it.
    On,
    /// The kernel logs a forbidden call and it runs.
    Log,
    /// No filters.
    Off,
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp filter for the {thread} thread: {source}")]
    Build {
        thread: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("installing the seccomp filter of the {thread} thread: {source}")]
    Install {
        thread: &'static str,
        source: seccompiler::Error,
    },
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

/// The kinds of thread tern runs, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The event loop, API clients and everything they start (the outgoing migration).
    Main,
    Vcpu,
    /// Lazy memory's and postcopy's userfaultfd threads.
    Faults,
    /// The outgoing migration and its return-path reader.
    Migration,
    /// The destination's stream reader.
    MigrationReader,
    /// The destination's postcopy page placer.
    PostcopyListen,
    /// The destination's postcopy preempt channel: accepts the source's second connection,
    /// then places the pages it brings.
    PostcopyPreempt,
    /// The destination's heartbeat: writes a section to the source every second.
    Heartbeat,
}

impl ThreadKind {
    fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::Faults => "userfaultfd",
            ThreadKind::Migration => "migration",
            ThreadKind::MigrationReader => "migration reader",
            ThreadKind::PostcopyListen => "postcopy listener",
            ThreadKind::PostcopyPreempt => "postcopy preempt",
            ThreadKind::Heartbeat => "heartbeat",
        }
    }

    fn allowed(self) -> Vec<i64> {
        use libc::*;
        // Every Rust thread: memory, locks, signals (SIGRTMIN kicks; SIGINT/SIGTERM handlers write
        // an eventfd on whichever thread they land), time, logging to stderr, exiting.
        let mut v = vec![
            SYS_brk,
            SYS_mmap,
            SYS_munmap,
            SYS_mremap,
            SYS_mprotect,
            SYS_madvise,
            SYS_futex,
            SYS_sched_yield,
            SYS_sched_getaffinity,
            SYS_rt_sigprocmask,
            SYS_rt_sigreturn,
            SYS_sigaltstack,
            SYS_restart_syscall,
            SYS_gettid,
            SYS_getpid,
            SYS_clock_gettime,
            SYS_clock_nanosleep,
            SYS_nanosleep,
            SYS_getrandom,
            SYS_write,
            SYS_writev,
            SYS_close,
            // glibc's malloc reads /proc/sys/vm/overcommit_memory when it trims a thread's heap.
            SYS_openat,
            SYS_read,
            // A panic's abort.
            SYS_rt_sigaction,
            SYS_exit,
            SYS_exit_group,
            SYS_tgkill,
            // Thread start (a thread's own set-up runs under its creator's filter).
            SYS_rseq,
            SYS_set_robust_list,
            SYS_prctl,
        ];
        let spawn = [SYS_clone, SYS_clone3];
        // Writing a snapshot file: synced, renamed into place, the temporary removed on failure.
        let snapshot_file = [
            SYS_fsync,
            SYS_fdatasync,
            SYS_rename,
            SYS_renameat,
            SYS_renameat2,
            SYS_unlink,
            SYS_unlinkat,
        ];
        let socket_io = [
            SYS_recvfrom,
            SYS_recvmsg,
            SYS_sendto,
            SYS_sendmsg,
            SYS_setsockopt,
            SYS_getsockopt,
            SYS_fcntl,
            SYS_poll,
            SYS_ppoll,
        ];
        match self {
            // sendto: COM2's output goes to its socket client from the vCPU thread.
            ThreadKind::Vcpu => v.extend([SYS_ioctl, SYS_sendto]),
            ThreadKind::Faults => {
                v.extend([SYS_ioctl, SYS_pread64, SYS_poll, SYS_ppoll, SYS_sendto])
            }
            ThreadKind::MigrationReader => v.extend([SYS_recvfrom, SYS_lseek]),
            // recvfrom: the RAM channels' postcopy placers read their own connection.
            ThreadKind::PostcopyListen => v.extend([SYS_ioctl, SYS_sendto, SYS_recvfrom]),
            // accept4 and the new connection's set-up (timeouts, try_clone's dup); unlink: the
            // Unix endpoint's path goes once the channel came.
            // sendto: the Abort to a preempt channel of another migration (over tcp:).
            ThreadKind::PostcopyPreempt => v.extend([
                SYS_ioctl,
                SYS_recvfrom,
                SYS_sendto,
                SYS_accept4,
                SYS_setsockopt,
                SYS_fcntl,
                SYS_unlink,
                SYS_unlinkat,
            ]),
            // write (in the base list) or sendto: the section to the source.
            ThreadKind::Heartbeat => v.push(SYS_sendto),
            ThreadKind::Migration => {
                v.extend(spawn);
                v.extend(socket_io);
                v.extend([
                    SYS_ioctl,
                    // /proc/self/pagemap: which guest pages hold data.
                    SYS_pread64,
                    SYS_socket,
                    SYS_connect,
                    SYS_fstat,
                    SYS_statx,
                    SYS_lseek,
                    SYS_shutdown,
                ]);
                v.extend(snapshot_file);
            }
            ThreadKind::Main => {
                v.extend(spawn);
                v.extend(socket_io);
                v.extend([
                    SYS_ioctl,
                    SYS_epoll_create1,
                    SYS_epoll_ctl,
                    SYS_epoll_wait,
                    SYS_epoll_pwait,
                    SYS_accept4,
                    SYS_timerfd_settime,
                    // Threads started from here add their own filters.
                    SYS_seccomp,
                    SYS_unlink,
                    SYS_unlinkat,
                    // What the outgoing migration (started from here) needs.
                    SYS_pread64,
                    SYS_socket,
                    SYS_connect,
                    SYS_fstat,
                    SYS_statx,
                    SYS_lseek,
                    SYS_shutdown,
                    // A destination that listens again for a postcopy recovery (bind_private).
                    SYS_bind,
                    SYS_listen,
                    SYS_umask,
                    SYS_newfstatat,
                ]);
                v.extend(snapshot_file);
            }
        }
        v
    }

    fn program(self, mode: SeccompMode) -> Result<BpfProgram, SeccompError> {
        let mismatch = match mode {
            SeccompMode::Log => SeccompAction::Log,
            _ => SeccompAction::Trap,
        };
        let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = self
            .allowed()
            .into_iter()
            .map(|nr| (nr, args::rules(self, nr).unwrap_or_default()))
            .collect();
        let build = |source| SeccompError::Build {
            thread: self.name(),
            source,
        };
        let filter = SeccompFilter::new(
            rules,
            mismatch,
            SeccompAction::Allow,
            std::env::consts::ARCH.try_into().map_err(build)?,
        )
        .map_err(build)?;
        filter.try_into().map_err(build)
    }
}

static MODE: OnceLock<SeccompMode> = OnceLock::new();

thread_local! {
    /// This thread's filter, for the SIGSYS report (read in the signal handler: no allocation).
    static KIND: Cell<&'static str> = const { Cell::new("unnamed") };
}

/// Sets the mode for the whole process (first call wins) and, for `on`, the SIGSYS handler that
/// reports a forbidden call. Threads started by the migration crate install theirs through its
/// thread-start hook.
pub fn init(mode: SeccompMode) -> Result<(), SeccompError> {
    let _ = MODE.set(mode);
    if mode == SeccompMode::On {
        // SAFETY: a plain sigaction with SA_SIGINFO; the handler only reads the siginfo, writes
        // to stderr and exits, all async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
                return Err(SeccompError::Handler(std::io::Error::last_os_error()));
            }
        }
    }
    migration::set_thread_start_hook(migration_thread);
    Ok(())
}

/// Installs `kind`'s filter on the calling thread (nothing with `--seccomp off`).
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    let mode = *MODE.get().unwrap_or(&SeccompMode::Off);
    if mode == SeccompMode::Off {
        return Ok(());
    }
    let program = kind.program(mode)?;
    seccompiler::apply_filter(&program).map_err(|source| SeccompError::Install {
        thread: kind.name(),
        source,
    })?;
    KIND.with(|k| k.set(kind.name()));
    // Tests: this thread makes a call no filter allows (`<thread>`: getppid; `<thread>:ioctl`: a
    // terminal ioctl; `<thread>:socket`: a netlink socket), to see it reported.
    if let Ok(probe) = std::env::var("TERN_TEST_SECCOMP_PROBE") {
        let (thread, call) = probe.split_once(':').unwrap_or((&probe, ""));
        if thread == kind.name() {
            probe_forbidden(call);
        }
    }
    Ok(())
}

/// A call the thread's filter refuses, for the tests.
fn probe_forbidden(call: &str) {
    match call {
        // SAFETY: FIONREAD on an invalid descriptor: EBADF at most, nothing changes.
        "ioctl" => unsafe {
            libc::ioctl(-1, libc::FIONREAD, std::ptr::null_mut::<libc::c_int>());
        },
        // SAFETY: creates a descriptor (closed by process exit, if the call is allowed).
        "socket" => unsafe {
            libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, 0);
        },
        // SAFETY: getppid has no arguments and no side effects.
        _ => unsafe {
            libc::syscall(libc::SYS_getppid);
        },
    }
}

/// Names a thread that runs under its creator's filter, for the report.
pub fn label(name: &'static str) {
    KIND.with(|k| k.set(name));
}

/// Installs a filter where a thread must not go on without one: failing, tern stops.
pub fn install_or_exit(kind: ThreadKind) {
    if let Err(e) = install(kind) {
        eprintln!("tern: error: {e}");
        std::process::exit(1);
    }
}

/// The migration crate's threads, by name.
fn migration_thread(name: &'static str) {
    let kind = match name {
        "migration-reader" | "migration-channel" => ThreadKind::MigrationReader,
        // A RAM channel's sender runs under the outgoing migration's filter.
        "migration-sender" => return label("migration sender"),
        "postcopy-faults" => ThreadKind::Faults,
        "postcopy-listen" => ThreadKind::PostcopyListen,
        // A RAM channel's connection after the postcopy switch: read and placed with
        // userfaultfd.
        "postcopy-channel" => ThreadKind::PostcopyListen,
        "postcopy-preempt" => ThreadKind::PostcopyPreempt,
        "heartbeat" => ThreadKind::Heartbeat,
        // The return-path reader runs under the outgoing migration's filter.
        _ => return label("migration return-path"),
    };
    install_or_exit(kind);
}

/// Exit status after a forbidden system call: as if killed by SIGSYS (128 + 31).
pub const FORBIDDEN_EXIT: i32 = 128 + libc::SIGSYS;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo; for SIGSYS from seccomp (si_code SYS_SECCOMP)
    // its si_syscall field is at offset 24 (after si_signo/errno/code, padding, si_call_addr).
    let nr = unsafe { *((info as *const u8).add(24) as *const libc::c_int) };
    let thread = KIND.with(|k| k.get());
    let mut buf = [0u8; 256];
    let mut w = Cursor {
        buf: &mut buf,
        len: 0,
    };
    w.put(b"tern: error: seccomp: the ");
    w.put(thread.as_bytes());
    w.put(b" thread made a forbidden system call: ");
    w.put(names::name(i64::from(nr)).unwrap_or("unknown").as_bytes());
    w.put(b" (");
    w.number(nr);
    w.put(b"); stopping\n");
    let len = w.len;
    // SAFETY: write(2) and _exit(2) are async-signal-safe; both are in every filter.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(FORBIDDEN_EXIT);
    }
}

/// Formatting without allocation, for the signal handler.
struct Cursor<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Cursor<'_> {
    fn put(&mut self, b: &[u8]) {
        let n = b.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&b[..n]);
        self.len += n;
    }

    fn number(&mut self, mut n: i32) {
        let mut digits = [0u8; 12];
        let mut i = digits.len();
        let negative = n < 0;
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10).unsigned_abs() as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        if negative {
            i -= 1;
            digits[i] = b'-';
        }
        self.put(&digits[i..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_builds() {
        for kind in [
            ThreadKind::Main,
            ThreadKind::Vcpu,
            ThreadKind::Faults,
            ThreadKind::Migration,
            ThreadKind::MigrationReader,
            ThreadKind::PostcopyListen,
            ThreadKind::PostcopyPreempt,
            ThreadKind::Heartbeat,
        ] {
            assert!(kind.program(SeccompMode::On).is_ok(), "{kind:?}");
            assert!(!kind.allowed().contains(&libc::SYS_execve), "{kind:?}");
        }
        use clap::ValueEnum;
        assert_eq!(SeccompMode::from_str("log", false), Ok(SeccompMode::Log));
        assert!(SeccompMode::from_str("maybe", false).is_err());
    }

    #[test]
    fn report_numbers_format_without_allocation() {
        let mut buf = [0u8; 32];
        let mut c = Cursor {
            buf: &mut buf,
            len: 0,
        };
        c.number(121);
        c.put(b" ");
        c.number(-5);
        c.put(b" ");
        c.number(0);
        let len = c.len;
        assert_eq!(&buf[..len], b"121 -5 0");
    }
}
