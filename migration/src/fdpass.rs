//! File descriptors over a Unix socket (SCM_RIGHTS): a local migration hands guest RAM over.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;

/// Most descriptors one message carries (guest RAM has at most a few regions).
pub const MAX_FDS: usize = 8;

fn cmsg_space(fds: usize) -> usize {
    // SAFETY: CMSG_SPACE only computes a size.
    unsafe { libc::CMSG_SPACE((fds * std::mem::size_of::<RawFd>()) as u32) as usize }
}

/// Sends all of `data` in one message, with `fds` attached to its first byte.
pub fn send_with_fds(s: &UnixStream, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} fds, at most {MAX_FDS} fit one message", fds.len()),
        ));
    }
    // u64 words keep the control buffer aligned for cmsghdr.
    let mut control = vec![0u64; cmsg_space(MAX_FDS).div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = cmsg_space(fds.len()) as _;
        // SAFETY: msg_control points at a zeroed buffer of at least msg_controllen bytes, so
        // CMSG_FIRSTHDR returns a header inside it with room for fds.len() descriptors.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN((fds.len() * std::mem::size_of::<RawFd>()) as u32) as _;
            let out = libc::CMSG_DATA(c).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                out.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    // SAFETY: msg describes live buffers (data, control) for the duration of the call.
    let n = unsafe { libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // Descriptors went with the first byte; the rest, if the socket took only part, goes plainly.
    let rest = &data[n as usize..];
    if !rest.is_empty() {
        io::Write::write_all(&mut &*s, rest)?;
    }
    Ok(())
}

/// Receives up to `buf.len()` bytes (at least one unless the peer closed) and the descriptors
/// that came with them. More than [`MAX_FDS`] descriptors is an error (the kernel drops the rest).
pub fn recv_with_fds(s: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<File>)> {
    let mut control = vec![0u64; cmsg_space(MAX_FDS).div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = cmsg_space(MAX_FDS) as _;
    // SAFETY: msg describes live buffers (buf, control) the kernel may fill.
    let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut files = Vec::new();
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of well-formed headers;
    // CMSG_FIRSTHDR/NXTHDR stay inside them, and each SCM_RIGHTS payload holds descriptors
    // that are now ours (wrapped in File at once, so every one is closed on any error below).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let bytes = ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    files.push(File::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the peer sent more than {MAX_FDS} file descriptors"),
        ));
    }
    Ok((n as usize, files))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::fd::AsFd;

    #[test]
    fn descriptors_cross_with_their_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let p = std::env::temp_dir().join(format!("tern-fdpass-{}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        let _ = std::fs::remove_file(&p);
        f.write_all(b"shared").unwrap();
        send_with_fds(&a, b"HEADER", &[f.as_fd()]).unwrap();
        (&a).write_all(b"more").unwrap();
        let mut buf = [0u8; 6];
        let (n, files) = recv_with_fds(&b, &mut buf).unwrap();
        assert_eq!((n, &buf), (6, b"HEADER"));
        assert_eq!(files.len(), 1);
        let mut got = String::new();
        let mut g = &files[0];
        g.seek(SeekFrom::Start(0)).unwrap();
        g.read_to_string(&mut got).unwrap();
        assert_eq!(got, "shared");
        let mut rest = [0u8; 4];
        (&b).read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"more");
        drop(a);
        let (n, files) = recv_with_fds(&b, &mut buf).unwrap();
        assert_eq!((n, files.len()), (0, 0), "end of stream");
    }

    #[test]
    fn plain_bytes_bring_no_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(b"TERNMIG").unwrap();
        let mut buf = [0u8; 16];
        let (n, files) = recv_with_fds(&b, &mut buf).unwrap();
        assert_eq!((n, files.len()), (7, 0));
    }
}
