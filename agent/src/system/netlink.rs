//! Just enough rtnetlink (`NETLINK_ROUTE`) to give an interface exactly one IPv4 address,
//! bring it up and replace the default route, without a helper process. The legacy
//! `SIOCSIFADDR`/`SIOCSIFNETMASK` ioctls were not used: they pick "the first address with
//! this label" separately for each call, so on an interface with several addresses the
//! address and the mask can land on different entries.
//!
//! Messages are built and parsed as plain bytes (native endian, 4-byte aligned, as the
//! kernel's `NLMSG_ALIGN`/`RTA_ALIGN`); only the socket calls are `unsafe`.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_DUMP: u16 = 0x300;
const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const RTM_NEWROUTE: u16 = 24;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
/// Route installed at boot/configuration time (what `ip route add` uses).
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;
const AF_INET: u8 = libc::AF_INET as u8;
const IFF_UP: u32 = libc::IFF_UP as u32;

/// One IPv4 address of an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InterfaceAddress {
    pub address: Ipv4Addr,
    pub prefix: u8,
}

fn align(len: usize) -> usize {
    len.div_ceil(4) * 4
}

/// A request being built: header, fixed payload, attributes.
struct Message(Vec<u8>);

impl Message {
    fn new(kind: u16, flags: u16, seq: u32, payload: &[u8]) -> Self {
        let mut bytes = vec![0u8; NLMSG_HDRLEN];
        bytes[4..6].copy_from_slice(&kind.to_ne_bytes());
        bytes[6..8].copy_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        bytes[8..12].copy_from_slice(&seq.to_ne_bytes());
        bytes.extend_from_slice(payload);
        bytes.resize(align(bytes.len()), 0);
        Self(bytes)
    }

    fn attr(mut self, kind: u16, data: &[u8]) -> Self {
        // Attribute payloads here are 4 bytes: the length always fits.
        let len = (4 + data.len()) as u16;
        self.0.extend_from_slice(&len.to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(data);
        self.0.resize(align(self.0.len()), 0);
        self
    }

    fn finish(mut self) -> Vec<u8> {
        // A few dozen bytes: fits in u32.
        let len = self.0.len() as u32;
        self.0[0..4].copy_from_slice(&len.to_ne_bytes());
        self.0
    }
}

/// `struct ifaddrmsg`.
fn ifaddrmsg(prefix: u8, index: u32) -> [u8; 8] {
    let mut m = [0u8; 8];
    m[0] = AF_INET;
    m[1] = prefix;
    m[3] = RT_SCOPE_UNIVERSE;
    m[4..8].copy_from_slice(&index.to_ne_bytes());
    m
}

/// One received netlink message: type, sequence number, payload.
struct Received<'a> {
    kind: u16,
    seq: u32,
    payload: &'a [u8],
}

/// Splits a datagram into messages; malformed lengths end the walk.
fn messages(mut buf: &[u8]) -> Vec<Received<'_>> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            break;
        }
        out.push(Received {
            kind: u16::from_ne_bytes([buf[4], buf[5]]),
            seq: u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]),
            payload: &buf[NLMSG_HDRLEN..len],
        });
        buf = &buf[align(len).min(buf.len())..];
    }
    out
}

/// The attributes after a fixed header of `skip` bytes: (type, data).
fn attributes(payload: &[u8], skip: usize) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut rest = payload.get(align(skip)..).unwrap_or_default();
    while rest.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        if len < 4 || len > rest.len() {
            break;
        }
        // The top two bits are flags (nested, byte order).
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        out.push((kind, &rest[4..len]));
        rest = &rest[align(len).min(rest.len())..];
    }
    out
}

/// An open rtnetlink socket.
pub(crate) struct Netlink {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    pub(crate) fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Self {
            fd,
            seq: 0,
            buf: vec![0u8; 32 * 1024],
        })
    }

    fn send(&mut self, message: &[u8]) -> io::Result<()> {
        // An unconnected netlink socket sends to the kernel.
        // SAFETY: the pointer and length describe `message`, which the kernel only reads.
        let sent = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                message.as_ptr().cast(),
                message.len(),
                0,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives one datagram into the buffer and returns its length.
    fn receive(&mut self) -> io::Result<usize> {
        loop {
            // SAFETY: the pointer and length describe our writable buffer.
            let got = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    0,
                )
            };
            if got >= 0 {
                return Ok(got as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends a request with `NLM_F_ACK` and waits for its acknowledgement.
    fn call(&mut self, build: impl FnOnce(u32) -> Message) -> io::Result<()> {
        let seq = self.next_seq();
        let message = build(seq).finish();
        self.send(&message)?;
        loop {
            let len = self.receive()?;
            for reply in messages(&self.buf[..len]) {
                if reply.seq != seq || reply.kind != NLMSG_ERROR {
                    continue;
                }
                let code = reply
                    .payload
                    .get(..4)
                    .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                    .ok_or_else(|| io::Error::other("short netlink acknowledgement"))?;
                return match code {
                    0 => Ok(()),
                    e => Err(io::Error::from_raw_os_error(-e)),
                };
            }
        }
    }

    /// The IPv4 addresses of the interface with index `index`.
    pub(crate) fn addresses(&mut self, index: u32) -> io::Result<Vec<InterfaceAddress>> {
        let seq = self.next_seq();
        let message = Message::new(RTM_GETADDR, NLM_F_DUMP, seq, &ifaddrmsg(0, 0)).finish();
        self.send(&message)?;
        let mut found = Vec::new();
        loop {
            let len = self.receive()?;
            for reply in messages(&self.buf[..len]) {
                if reply.seq != seq {
                    continue;
                }
                match reply.kind {
                    NLMSG_DONE => return Ok(found),
                    NLMSG_ERROR => {
                        let code = reply
                            .payload
                            .get(..4)
                            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                            .unwrap_or(-libc::EIO);
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    RTM_NEWADDR if reply.payload.len() >= 8 => {
                        let p = reply.payload;
                        let family = p[0];
                        let prefix = p[1];
                        let ifindex = u32::from_ne_bytes([p[4], p[5], p[6], p[7]]);
                        if family != AF_INET || ifindex != index {
                            continue;
                        }
                        let attrs = attributes(p, 8);
                        // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the
                        // peer on point-to-point links, otherwise the same.
                        let local = attrs
                            .iter()
                            .find(|(k, _)| *k == IFA_LOCAL)
                            .or_else(|| attrs.iter().find(|(k, _)| *k == IFA_ADDRESS));
                        if let Some((_, &[a, b, c, d])) = local {
                            found.push(InterfaceAddress {
                                address: Ipv4Addr::new(a, b, c, d),
                                prefix,
                            });
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Adds (or refreshes) an address.
    pub(crate) fn add_address(&mut self, index: u32, addr: InterfaceAddress) -> io::Result<()> {
        let octets = addr.address.octets();
        self.call(|seq| {
            Message::new(
                RTM_NEWADDR,
                NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
                seq,
                &ifaddrmsg(addr.prefix, index),
            )
            .attr(IFA_LOCAL, &octets)
            .attr(IFA_ADDRESS, &octets)
        })
    }

    /// Removes an address; one that is already gone is not an error.
    pub(crate) fn delete_address(&mut self, index: u32, addr: InterfaceAddress) -> io::Result<()> {
        let octets = addr.address.octets();
        let result = self.call(|seq| {
            Message::new(RTM_DELADDR, NLM_F_ACK, seq, &ifaddrmsg(addr.prefix, index))
                .attr(IFA_LOCAL, &octets)
                .attr(IFA_ADDRESS, &octets)
        });
        match result {
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(()),
            other => other,
        }
    }

    /// Sets `IFF_UP` on the interface.
    pub(crate) fn set_up(&mut self, index: u32) -> io::Result<()> {
        // struct ifinfomsg: family, pad, type, index, flags, change.
        let mut info = [0u8; 16];
        info[4..8].copy_from_slice(&index.to_ne_bytes());
        info[8..12].copy_from_slice(&IFF_UP.to_ne_bytes());
        info[12..16].copy_from_slice(&IFF_UP.to_ne_bytes());
        self.call(|seq| Message::new(RTM_NEWLINK, NLM_F_ACK, seq, &info))
    }

    /// Makes `gateway` on interface `index` the default route of the main table, replacing
    /// the existing one in one step.
    pub(crate) fn replace_default_route(
        &mut self,
        index: u32,
        gateway: Ipv4Addr,
    ) -> io::Result<()> {
        // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
        let mut rtmsg = [0u8; 12];
        rtmsg[0] = AF_INET;
        rtmsg[4] = RT_TABLE_MAIN;
        rtmsg[5] = RTPROT_BOOT;
        rtmsg[6] = RT_SCOPE_UNIVERSE;
        rtmsg[7] = RTN_UNICAST;
        self.call(|seq| {
            Message::new(
                RTM_NEWROUTE,
                NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
                seq,
                &rtmsg,
            )
            .attr(RTA_GATEWAY, &gateway.octets())
            .attr(RTA_OIF, &index.to_ne_bytes())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_layout() {
        let bytes = Message::new(RTM_NEWADDR, NLM_F_ACK, 7, &ifaddrmsg(30, 2))
            .attr(IFA_LOCAL, &[172, 16, 0, 2])
            .finish();
        assert_eq!(bytes.len(), 16 + 8 + 8);
        assert_eq!(
            u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
            32
        );
        assert_eq!(u16::from_ne_bytes([bytes[4], bytes[5]]), RTM_NEWADDR);
        assert_eq!(
            u16::from_ne_bytes([bytes[6], bytes[7]]),
            NLM_F_ACK | NLM_F_REQUEST
        );
        assert_eq!(
            u32::from_ne_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]),
            7
        );
        assert_eq!(&bytes[16..18], &[AF_INET, 30]);
        let parsed = messages(&bytes);
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].seq, 7);
        assert_eq!(
            attributes(parsed[0].payload, 8),
            [(IFA_LOCAL, &[172u8, 16, 0, 2][..])]
        );
    }

    #[test]
    fn malformed_replies_do_not_panic() {
        assert!(messages(&[0xff; 10]).is_empty());
        let mut bogus = vec![0u8; 20];
        bogus[0..4].copy_from_slice(&100u32.to_ne_bytes());
        assert!(messages(&bogus).is_empty());
        assert!(attributes(&[8, 0, 1, 0, 1, 2], 0).is_empty());
        assert!(attributes(&[], 8).is_empty());
    }
}
