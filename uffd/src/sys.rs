//! A minimal userfaultfd binding (raw syscall and ioctls through libc). Written here rather than
//! taken from the `userfaultfd` crate because that crate's -sys part needs libclang at build time,
//! which would break `cargo run` on a fresh machine.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const UFFD_API: u64 = 0xaa;
/// Faults carry the faulting thread's id.
pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

// _IOWR/_IOR(0xaa, nr, size) as the kernel's uapi header computes them.
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;
const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;

/// Bits of `uffdio_register.ioctls` for the ioctls tern needs on a registered range.
pub const NEEDED_RANGE_IOCTLS: u64 = (1 << 0x02) | (1 << 0x03) | (1 << 0x04);

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// One fault as read from the descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub address: u64,
    pub write: bool,
    /// The faulting thread (UFFD_FEATURE_THREAD_ID).
    pub tid: u32,
}

/// How placing a page ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    Done,
    /// Someone placed it first (EEXIST): waiters were woken.
    AlreadyThere,
}

pub struct Userfaultfd {
    fd: OwnedFd,
    pub features: u64,
}

/// EAGAIN from COPY/ZEROPAGE means the address space is changing under us; it settles within
/// microseconds. Retry with a short sleep, but give up (an error, never a spin) after ~1 s.
fn again(retries: &mut u32, e: io::Error) -> io::Result<()> {
    const MAX_RETRIES: u32 = 10_000;
    *retries += 1;
    if *retries > MAX_RETRIES {
        return Err(io::Error::new(
            e.kind(),
            format!("{e} (still after {MAX_RETRIES} retries)"),
        ));
    }
    if *retries > 10 {
        std::thread::sleep(std::time::Duration::from_micros(100));
    }
    Ok(())
}

fn ioctl<T>(fd: RawFd, req: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: `arg` is a live, correctly laid out (repr(C)) argument for `req`.
    let rc = unsafe { libc::ioctl(fd, req, arg as *mut T) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Userfaultfd {
    /// Opens a userfaultfd that also sees faults taken in the kernel (KVM touches guest memory
    /// from kernel mode), non-blocking, with `features` requested.
    pub fn new(features: u64) -> io::Result<Self> {
        // SAFETY: plain syscall; the returned descriptor is owned below.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ..Default::default()
        };
        ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api)?;
        Ok(Userfaultfd {
            fd,
            features: api.features,
        })
    }

    /// Registers [start, start+len) for MISSING faults; returns the ioctls allowed on it.
    pub fn register(&self, start: u64, len: u64) -> io::Result<u64> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg)?;
        Ok(reg.ioctls)
    }

    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = UffdioRange { start, len };
        ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER, &mut range)
    }

    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = UffdioRange { start, len };
        ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &mut range)
    }

    /// Atomically places `data` (page-sized) at `dst` and wakes the waiters.
    pub fn copy(&self, dst: u64, data: &[u8]) -> io::Result<Placed> {
        let mut retries = 0u32;
        loop {
            let mut c = UffdioCopy {
                dst,
                src: data.as_ptr() as u64,
                len: data.len() as u64,
                mode: 0,
                copy: 0,
            };
            match ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut c) {
                Ok(()) => return Ok(Placed::Done),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    self.wake(dst, data.len() as u64)?;
                    return Ok(Placed::AlreadyThere);
                }
                // The address space changed under us (e.g. a concurrent discard): retry, a while.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => again(&mut retries, e)?,
                Err(e) => return Err(e),
            }
        }
    }

    /// Places `data` (whole pages) at `dst` with as few UFFDIO_COPY calls as it takes (one when
    /// no page of the range is there yet), waking the waiters. A page that is there already
    /// (EEXIST: another thread placed it) is woken and skipped; its index in the range (in
    /// pages) goes to `skipped`.
    pub fn copy_range(&self, dst: u64, data: &[u8], skipped: &mut Vec<usize>) -> io::Result<()> {
        let page = crate::PAGE as usize;
        let mut done = 0usize;
        let mut retries = 0u32;
        while done < data.len() {
            let rest = &data[done..];
            let mut c = UffdioCopy {
                dst: dst + done as u64,
                src: rest.as_ptr() as u64,
                len: rest.len() as u64,
                mode: 0,
                copy: 0,
            };
            match ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut c) {
                Ok(()) => return Ok(()),
                // Part of the range went in (the kernel stopped at a page it could not place):
                // go on from there.
                Err(_) if c.copy > 0 => done += (c.copy as usize).min(rest.len()),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    self.wake(dst + done as u64, page as u64)?;
                    skipped.push(done / page);
                    done += page;
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) => {
                    again(&mut retries, e)?
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// As [`Userfaultfd::copy_range`] with zero pages: maps the zero page over `len` bytes at
    /// `dst`, skipping (and waking) pages that are there already.
    pub fn zeropage_range(&self, dst: u64, len: u64, skipped: &mut Vec<usize>) -> io::Result<()> {
        let page = crate::PAGE;
        let mut done = 0u64;
        let mut retries = 0u32;
        while done < len {
            let mut z = UffdioZeropage {
                range: UffdioRange {
                    start: dst + done,
                    len: len - done,
                },
                mode: 0,
                zeropage: 0,
            };
            match ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z) {
                Ok(()) => return Ok(()),
                Err(_) if z.zeropage > 0 => done += (z.zeropage as u64).min(len - done),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    self.wake(dst + done, page)?;
                    skipped.push((done / page) as usize);
                    done += page;
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) => {
                    again(&mut retries, e)?
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Atomically maps the zero page at `dst` and wakes the waiters.
    pub fn zeropage(&self, dst: u64, len: u64) -> io::Result<Placed> {
        let mut retries = 0u32;
        loop {
            let mut z = UffdioZeropage {
                range: UffdioRange { start: dst, len },
                mode: 0,
                zeropage: 0,
            };
            match ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z) {
                Ok(()) => return Ok(Placed::Done),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    self.wake(dst, len)?;
                    return Ok(Placed::AlreadyThere);
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => again(&mut retries, e)?,
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits up to `timeout_ms` for faults and reads them into `out` (cleared first); other
    /// events are skipped. Returns with `out` empty on timeout.
    pub fn wait_faults(&self, timeout_ms: i32, out: &mut Vec<Fault>) -> io::Result<()> {
        self.wait_faults_or_woken(timeout_ms, None, out)
    }

    /// As [`Userfaultfd::wait_faults`], and returns early (with `out` empty) once `waker` is
    /// woken: a thread told to stop stops at once rather than at its next timeout.
    pub fn wait_faults_or_woken(
        &self,
        timeout_ms: i32,
        waker: Option<&Waker>,
        out: &mut Vec<Fault>,
    ) -> io::Result<()> {
        out.clear();
        let mut pfds =
            [self.fd.as_raw_fd(), waker.map_or(-1, |w| w.0.as_raw_fd())].map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        // SAFETY: polls valid descriptors (a negative one is ignored) for at most `timeout_ms`.
        if unsafe { libc::poll(pfds.as_mut_ptr(), 2, timeout_ms) } <= 0
            || pfds[0].revents & libc::POLLIN == 0
        {
            return Ok(());
        }
        self.read_faults(out)
    }

    /// Reads pending faults (non-blocking); other events are skipped.
    pub fn read_faults(&self, out: &mut Vec<Fault>) -> io::Result<()> {
        let mut buf = [0u8; 32 * 16];
        // SAFETY: reads into a local buffer of the given length.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(()),
                _ => Err(e),
            };
        }
        for msg in buf[..n as usize].chunks_exact(32) {
            if msg[0] != UFFD_EVENT_PAGEFAULT {
                continue;
            }
            let flags = u64::from_le_bytes(msg[8..16].try_into().unwrap_or([0; 8]));
            let address = u64::from_le_bytes(msg[16..24].try_into().unwrap_or([0; 8]));
            let tid = u32::from_le_bytes(msg[24..28].try_into().unwrap_or([0; 4]));
            out.push(Fault {
                address,
                write: flags & 1 != 0,
                tid,
            });
        }
        Ok(())
    }
}

impl AsRawFd for Userfaultfd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Wakes a thread in [`Userfaultfd::wait_faults_or_woken`] for good (an eventfd that stays
/// readable once written).
pub struct Waker(OwnedFd);

impl Waker {
    pub fn new() -> io::Result<Waker> {
        // SAFETY: creates a new descriptor; nothing else owns it.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        Ok(Waker(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub fn wake(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a local to an eventfd this value owns. It can only fail
        // when the counter would overflow, and then it is readable already.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fault taken by one thread is resolved by another with UFFDIO_COPY.
    #[test]
    fn resolves_a_missing_page_from_another_thread() {
        let Ok(uffd) = Userfaultfd::new(UFFD_FEATURE_THREAD_ID) else {
            eprintln!("userfaultfd unavailable here; nothing to test");
            return;
        };
        let len = 4096usize;
        // SAFETY: a fresh private anonymous mapping, unmapped at the end of the test.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let addr = p as u64;
        let ioctls = uffd.register(addr, len as u64).unwrap();
        assert_eq!(ioctls & NEEDED_RANGE_IOCTLS, NEEDED_RANGE_IOCTLS);
        let reader = std::thread::spawn(move || {
            // SAFETY: reads the first byte of the live mapping (blocks until resolved).
            unsafe { std::ptr::read_volatile(addr as *const u8) }
        });
        let mut faults = Vec::new();
        for _ in 0..1000 {
            uffd.read_faults(&mut faults).unwrap();
            if !faults.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert_eq!(faults.len(), 1);
        assert_eq!(faults[0].address & !0xfff, addr);
        assert!(faults[0].tid > 0);
        assert_eq!(uffd.copy(addr, &[0x5a; 4096]).unwrap(), Placed::Done);
        assert_eq!(reader.join().unwrap(), 0x5a);
        assert_eq!(uffd.copy(addr, &[1; 4096]).unwrap(), Placed::AlreadyThere);
        uffd.unregister(addr, len as u64).unwrap();
        // SAFETY: unmaps the mapping created above.
        unsafe { libc::munmap(p, len) };
    }

    #[test]
    fn ranges_are_placed_around_pages_that_are_there() {
        let Ok(uffd) = Userfaultfd::new(UFFD_FEATURE_THREAD_ID) else {
            return;
        };
        let len = 8 * 4096;
        // SAFETY: a fresh private anonymous mapping, unmapped at the end.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let addr = p as u64;
        uffd.register(addr, len as u64).unwrap();
        // Pages 2 and 5 are placed first (as a request's answer would be).
        assert_eq!(
            uffd.copy(addr + 2 * 4096, &[2; 4096]).unwrap(),
            Placed::Done
        );
        assert_eq!(
            uffd.copy(addr + 5 * 4096, &[5; 4096]).unwrap(),
            Placed::Done
        );
        let data: Vec<u8> = (0..6u8).flat_map(|i| [0x10 + i; 4096]).collect();
        let mut skipped = Vec::new();
        uffd.copy_range(addr, &data, &mut skipped).unwrap();
        assert_eq!(skipped, vec![2, 5]);
        let mut zeros = Vec::new();
        uffd.zeropage_range(addr + 5 * 4096, 3 * 4096, &mut zeros)
            .unwrap();
        assert_eq!(zeros, vec![0]);
        // SAFETY: the whole range is placed now; reads do not fault.
        let mem = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
        let first: Vec<u8> = (0..8).map(|i| mem[i * 4096]).collect();
        assert_eq!(first, vec![0x10, 0x11, 2, 0x13, 0x14, 5, 0, 0]);
        uffd.unregister(addr, len as u64).unwrap();
        // SAFETY: unmaps the mapping created above.
        unsafe { libc::munmap(p, len) };
    }
}
