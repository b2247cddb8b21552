//! Opening a TAP device: the host end of a virtio-net device.
//!
//! `TUNSETIFF` on `/dev/net/tun` attaches to the TAP of that name in the calling process's
//! network namespace, creating it if none exists (a TAP created this way disappears when the
//! VMM exits; one made persistent beforehand, e.g. with `ip tuntap add`, stays). The device
//! is opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`: Ethernet frames, no packet-info
//! prefix, and a 12-byte vnet header in front of every frame, whose layout is virtio's. No
//! offloads are enabled (`TUNSETOFFLOAD 0`), so the kernel checksums and segments every
//! frame before handing it over and never sends a frame longer than the TAP's MTU allows.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::VNET_HDR_LEN;

const TUN_PATH: &str = "/dev/net/tun";

/// Errors opening a TAP.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("invalid TAP name {name:?}: {reason}")]
    Name { name: String, reason: &'static str },
    #[error("cannot open {TUN_PATH} (is the tun module loaded?)")]
    OpenTun(#[source] io::Error),
    #[error(
        "cannot attach to TAP {name} (it needs CAP_NET_ADMIN, or a persistent TAP this user \
         owns; EBUSY means another process has it open)"
    )]
    Attach {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot configure TAP {name}: {step}")]
    Configure {
        name: String,
        step: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Checks an interface name the way the kernel does (`dev_valid_name`): 1 to 15 bytes, not
/// `.` or `..`, no `/`, `:`, whitespace or NUL.
pub fn check_ifname(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() >= libc::IFNAMSIZ {
        return Err("interface names have at most 15 bytes");
    }
    if name == "." || name == ".." {
        return Err("it cannot be . or ..");
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
    {
        return Err("it cannot contain '/', ':', NUL or whitespace");
    }
    Ok(())
}

/// An open TAP queue: frames in both directions with a 12-byte vnet header.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to (or creates) the TAP `name` in this thread's network namespace.
    pub fn open(name: &str) -> Result<Self, TapError> {
        check_ifname(name).map_err(|reason| TapError::Name {
            name: name.to_string(),
            reason,
        })?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(TapError::OpenTun)?;
        let fd = file.as_raw_fd();

        // SAFETY: ifreq is plain old data (a byte array and a union of integers and
        // pointers); all zeroes is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            // The name is at most 15 bytes (checked above), so a NUL terminator remains.
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as _;
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is, for the
        // duration of the call; `fd` is the open tun device.
        if unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut req) } < 0 {
            return Err(TapError::Attach {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        let configure = |step, source| TapError::Configure {
            name: name.to_string(),
            step,
            source,
        };
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which points to
        // `hdr_len` for the duration of the call.
        if unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(configure(
                "set the vnet header size",
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: TUNSETOFFLOAD takes its flags by value and touches no memory of ours.
        if unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, 0 as libc::c_ulong) } < 0 {
            return Err(configure("disable offloads", io::Error::last_os_error()));
        }
        Ok(Self {
            file,
            name: name.to_string(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl super::FrameIo for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.file.write(frame)
    }
}
