//! The privileged operations behind `identity`, `reseed` and `clock`, as a trait so that the
//! request handlers can be tested on a host without changing the host.
//!
//! [`LinuxSystem`] does them with system calls only: no helper processes, because under the
//! emulated guest kernel of Grove's CI hosts a fork+exec costs 130 ms or more while a system
//! call costs about 0.4 ms, and these run on the critical path of making a clone ready.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

mod netlink;

/// The system changes the agent makes.
pub trait System: Send + Sync {
    /// `sethostname(2)`.
    fn set_hostname(&self, name: &str) -> io::Result<()>;
    /// Mixes `entropy` into the kernel's input pool, credited in full, and reseeds the
    /// kernel's random number generator from it.
    fn add_entropy(&self, entropy: &[u8]) -> io::Result<()>;
    /// Sets `CLOCK_REALTIME`.
    fn set_clock(&self, unix_nanos: u64) -> io::Result<()>;
    /// Gives `interface` the address `address/prefix`, brings it up, and makes `gateway` the
    /// only default route.
    fn set_address(
        &self,
        interface: &str,
        address: Ipv4Addr,
        prefix: u8,
        gateway: Ipv4Addr,
    ) -> io::Result<()>;
}

/// The real operations on the running Linux kernel (need root).
#[derive(Debug, Clone, Copy, Default)]
pub struct LinuxSystem;

/// `_IOW('R', 0x03, int[2])`: add entropy to the input pool and credit it.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG from the input pool now.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// The error of the last system call if `ret` is negative.
fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The `struct rand_pool_info` argument of `RNDADDENTROPY`: entropy count in bits, buffer
/// size in bytes, then the bytes, as native-endian 32-bit words.
fn rand_pool_info(entropy: &[u8]) -> io::Result<Vec<u32>> {
    let too_large = || io::Error::new(io::ErrorKind::InvalidInput, "too much entropy at once");
    let bits = entropy
        .len()
        .checked_mul(8)
        .and_then(|b| i32::try_from(b).ok())
        .ok_or_else(too_large)?;
    let size = i32::try_from(entropy.len()).map_err(|_| too_large())?;
    let mut words = Vec::with_capacity(2 + entropy.len().div_ceil(4));
    words.push(bits as u32);
    words.push(size as u32);
    for chunk in entropy.chunks(4) {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        words.push(u32::from_ne_bytes(word));
    }
    Ok(words)
}

/// `unix_nanos` as a `timespec`.
fn timespec(unix_nanos: u64) -> io::Result<libc::timespec> {
    let secs = unix_nanos / 1_000_000_000;
    Ok(libc::timespec {
        tv_sec: libc::time_t::try_from(secs)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "time out of range"))?,
        // Below 10^9: fits in any c_long.
        tv_nsec: (unix_nanos % 1_000_000_000) as libc::c_long,
    })
}

impl System for LinuxSystem {
    fn set_hostname(&self, name: &str) -> io::Result<()> {
        // SAFETY: the pointer and length describe `name`'s bytes, which the kernel only reads.
        check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })?;
        Ok(())
    }

    fn add_entropy(&self, entropy: &[u8]) -> io::Result<()> {
        let info = rand_pool_info(entropy)?;
        let urandom = File::options().write(true).open("/dev/urandom")?;
        // SAFETY: `info` is a `struct rand_pool_info` whose buffer holds `buf_size` bytes
        // (the words after the two counts); the kernel only reads it.
        check(unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) })?;
        // SAFETY: RNDRESEEDCRNG takes no argument.
        check(unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) })?;
        Ok(())
    }

    fn set_clock(&self, unix_nanos: u64) -> io::Result<()> {
        let time = timespec(unix_nanos)?;
        // SAFETY: `time` is a valid timespec the kernel only reads.
        check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &time) })?;
        Ok(())
    }

    fn set_address(
        &self,
        interface: &str,
        address: Ipv4Addr,
        prefix: u8,
        gateway: Ipv4Addr,
    ) -> io::Result<()> {
        if prefix > 32 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "prefix length above 32",
            ));
        }
        let name = CString::new(interface)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "bad interface name"))?;
        // SAFETY: `name` is a valid NUL-terminated string the call only reads.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            return Err(io::Error::last_os_error());
        }
        let wanted = netlink::InterfaceAddress { address, prefix };
        let mut netlink = netlink::Netlink::open()?;
        let current = netlink.addresses(index)?;
        // Others first: deleting a primary address after adding the new one (a secondary
        // when in the same subnet) could take the new one with it.
        for other in current.iter().filter(|a| **a != wanted) {
            netlink.delete_address(index, *other)?;
        }
        if !current.contains(&wanted) {
            netlink.add_address(index, wanted)?;
        }
        netlink.set_up(index)?;
        netlink.replace_default_route(index, gateway)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rand_pool_info_layout() {
        let words = rand_pool_info(&[1, 2, 3, 4, 5]).expect("small");
        assert_eq!(words[0], 40, "bits");
        assert_eq!(words[1], 5, "bytes");
        assert_eq!(words[2], u32::from_ne_bytes([1, 2, 3, 4]));
        assert_eq!(words[3], u32::from_ne_bytes([5, 0, 0, 0]));
        assert_eq!(words.len(), 4);
    }

    #[test]
    fn timespec_splits_nanos() {
        let t = timespec(1_767_225_600_123_456_789).expect("in range");
        assert_eq!((t.tv_sec, t.tv_nsec), (1_767_225_600, 123_456_789));
        let t = timespec(999).expect("in range");
        assert_eq!((t.tv_sec, t.tv_nsec), (0, 999));
    }

    /// Runs `f` on a new thread that first enters new namespaces of `flags` (namespaces are
    /// per thread, so the test process and the host are untouched). `None` if this host
    /// does not allow it (not root).
    fn in_namespaces<T: Send + 'static>(
        flags: libc::c_int,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        std::thread::spawn(move || {
            // SAFETY: unshare(2) only changes this thread's namespaces, which end with it.
            if unsafe { libc::unshare(flags) } != 0 {
                eprintln!(
                    "skipped: cannot create namespaces ({}); needs root",
                    io::Error::last_os_error()
                );
                return None;
            }
            Some(f())
        })
        .join()
        .expect("namespace thread")
    }

    #[test]
    fn sets_the_hostname_in_a_uts_namespace() {
        let name = in_namespaces(libc::CLONE_NEWUTS, || {
            LinuxSystem
                .set_hostname("grove-clone-7")
                .expect("sethostname");
            let mut buf = [0u8; 65];
            // SAFETY: the buffer is writable for its length.
            let ret = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
            assert_eq!(ret, 0);
            let end = buf.iter().position(|&b| b == 0).expect("NUL");
            String::from_utf8_lossy(&buf[..end]).into_owned()
        });
        if let Some(name) = name {
            assert_eq!(name, "grove-clone-7");
        }
    }

    /// Default routes of the main table (`/proc/thread-self/net/route`): (interface, gateway).
    fn default_routes() -> Vec<(String, Ipv4Addr)> {
        let text = std::fs::read_to_string("/proc/thread-self/net/route").expect("route table");
        let hex = |s: &str| Ipv4Addr::from(u32::from_be(u32::from_str_radix(s, 16).expect("hex")));
        text.lines()
            .skip(1)
            .map(|line| line.split_whitespace().collect::<Vec<_>>())
            .filter(|f| hex(f[1]).is_unspecified() && hex(f[7]).is_unspecified())
            .map(|f| (f[0].to_owned(), hex(f[2])))
            .collect()
    }

    /// The `IFF_UP` flag of `interface`, through `SIOCGIFFLAGS` (sysfs shows the namespace
    /// it was mounted in, not this thread's).
    fn is_up(interface: &str) -> bool {
        use std::os::fd::{FromRawFd, OwnedFd};
        // SAFETY: plain socket(2); checked below.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        assert!(raw >= 0, "socket");
        // SAFETY: a new descriptor that nothing else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: `ifreq` is plain data; all zeroes is valid.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (slot, &b) in ifr.ifr_name.iter_mut().zip(interface.as_bytes()) {
            *slot = b as libc::c_char;
        }
        // SAFETY: SIOCGIFFLAGS reads the name and writes the flags of this valid ifreq.
        let ret = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) };
        assert_eq!(ret, 0, "SIOCGIFFLAGS");
        // SAFETY: SIOCGIFFLAGS filled in the flags.
        let flags = unsafe { ifr.ifr_ifru.ifru_flags };
        flags & libc::IFF_UP as libc::c_short != 0
    }

    fn addresses(interface: &str) -> Vec<netlink::InterfaceAddress> {
        let name = CString::new(interface).expect("name");
        // SAFETY: a valid NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        netlink::Netlink::open()
            .expect("netlink")
            .addresses(index)
            .expect("addresses")
    }

    #[test]
    fn sets_address_and_default_route_in_a_network_namespace() {
        let result = in_namespaces(libc::CLONE_NEWNET, || {
            let system = LinuxSystem;
            assert!(!is_up("lo"), "a new namespace starts with lo down");
            system
                .set_address(
                    "lo",
                    Ipv4Addr::new(10, 1, 2, 3),
                    24,
                    Ipv4Addr::new(10, 1, 2, 1),
                )
                .expect("first address");
            // Bringing lo up gives it 127.0.0.1/8 as well.
            let first = (addresses("lo"), default_routes(), is_up("lo"));
            // A new identity leaves exactly one address and one default route.
            system
                .set_address(
                    "lo",
                    Ipv4Addr::new(10, 9, 0, 2),
                    30,
                    Ipv4Addr::new(10, 9, 0, 1),
                )
                .expect("second address");
            let second = (addresses("lo"), default_routes(), is_up("lo"));
            // Applying the same identity again changes nothing.
            system
                .set_address(
                    "lo",
                    Ipv4Addr::new(10, 9, 0, 2),
                    30,
                    Ipv4Addr::new(10, 9, 0, 1),
                )
                .expect("same address");
            let third = (addresses("lo"), default_routes());
            let missing = system.set_address(
                "grove-none0",
                Ipv4Addr::new(10, 0, 0, 2),
                24,
                Ipv4Addr::new(10, 0, 0, 1),
            );
            (first, second, third, missing.is_err())
        });
        let Some((first, second, third, missing_fails)) = result else {
            return;
        };
        let addr = |a, b, c, d, prefix| netlink::InterfaceAddress {
            address: Ipv4Addr::new(a, b, c, d),
            prefix,
        };
        assert!(first.0.contains(&addr(10, 1, 2, 3, 24)), "{:?}", first.0);
        assert_eq!(first.1, [("lo".to_owned(), Ipv4Addr::new(10, 1, 2, 1))]);
        assert!(first.2, "up");
        assert_eq!(second.0, [addr(10, 9, 0, 2, 30)]);
        assert_eq!(second.1, [("lo".to_owned(), Ipv4Addr::new(10, 9, 0, 1))]);
        assert!(second.2, "still up");
        assert_eq!(third.0, second.0);
        assert_eq!(third.1, second.1);
        assert!(missing_fails, "an unknown interface is an error");
    }

    #[test]
    fn adds_entropy_when_privileged() {
        // As root this mixes 32 bytes into the host's pool and reseeds it, which is harmless;
        // otherwise the kernel refuses with EPERM, which shows the ioctl was well-formed
        // enough to reach the permission check.
        match LinuxSystem.add_entropy(&[0x5a; 32]) {
            Ok(()) => {}
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}"),
        }
    }
}
