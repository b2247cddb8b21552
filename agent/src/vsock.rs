//! The guest side of virtio-vsock: a listening `AF_VSOCK` stream socket and its connections.
//!
//! A listening vsock socket survives a reset of the vsock transport (which the VMM does on
//! restore): established connections end with an error, and `accept` goes on returning the
//! host's new connections. So the agent binds once and never re-binds.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// How many connections may wait to be accepted.
const BACKLOG: libc::c_int = 16;

/// A listening vsock socket bound to a port on any local CID.
#[derive(Debug)]
pub struct VsockListener {
    fd: OwnedFd,
}

/// One accepted vsock connection.
#[derive(Debug)]
pub struct VsockStream {
    // A socket read and written with read(2)/write(2), which File does.
    file: File,
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

impl VsockListener {
    /// Binds `port` on `VMADDR_CID_ANY` and listens.
    pub fn bind(port: u32) -> io::Result<Self> {
        // SAFETY: plain socket(2); the result is checked before use.
        let raw = check(unsafe {
            libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0)
        })?;
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let address = libc::sockaddr_vm {
            svm_family: libc::AF_VSOCK as libc::sa_family_t,
            svm_reserved1: 0,
            svm_port: port,
            svm_cid: libc::VMADDR_CID_ANY,
            svm_zero: [0; 4],
        };
        // SAFETY: the pointer and length describe `address`, a valid sockaddr_vm that the
        // kernel only reads.
        check(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&address as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        })?;
        // SAFETY: listen(2) on a socket we own.
        check(unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) })?;
        Ok(Self { fd })
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> io::Result<VsockStream> {
        // SAFETY: accept4(2) with null address pointers (the peer address is not wanted).
        let raw = check(unsafe {
            libc::accept4(
                self.fd.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        })?;
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(VsockStream {
            file: File::from(fd),
        })
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for VsockStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}
