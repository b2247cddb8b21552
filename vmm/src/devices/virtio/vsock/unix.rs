//! The host side's Unix sockets: the listening socket at `uds_path`, the `CONNECT <port>\n`
//! line a client sends first, and connecting to `<uds_path>_<port>` without blocking.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use event_manager::EventSet;

use super::device::VsockError;

/// Longest `CONNECT` line, newline excluded: `CONNECT 4294967295` is 18 bytes.
pub const MAX_CONNECT_LINE: usize = 32;

/// The listening socket; its file is removed when dropped, unless another replaced it.
pub(super) struct Listener {
    path: PathBuf,
    /// Device and inode of the socket file we created.
    identity: (u64, u64),
    pub listener: UnixListener,
    /// The events registered with the event loop (empty: not registered).
    pub registered: EventSet,
}

impl Listener {
    /// Listens at `path` with mode 0600 (the socket reaches into the guest). A stale socket
    /// nobody listens on is replaced; a live one or any other file is an error.
    pub fn bind(path: &Path) -> Result<Self, VsockError> {
        clear_stale(path)?;
        let bind_err = |source| VsockError::Bind {
            path: path.to_owned(),
            source,
        };
        let listener = bind_private(path).map_err(bind_err)?;
        let identity = fs::symlink_metadata(path)
            .map(|m| (m.dev(), m.ino()))
            .map_err(bind_err)?;
        let me = Self {
            path: path.to_owned(),
            identity,
            listener,
            registered: EventSet::empty(),
        };
        me.listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(me)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let ours = fs::symlink_metadata(&self.path)
            .map(|m| (m.dev(), m.ino()) == self.identity)
            .unwrap_or(false);
        if ours {
            if let Err(e) = fs::remove_file(&self.path) {
                log::warn!(
                    "cannot remove the vsock socket {}: {e}",
                    self.path.display()
                );
            }
        }
    }
}

/// Removes a socket file nobody listens on (left by a VMM that died, or by the VM a snapshot
/// was taken from once it stopped).
fn clear_stale(path: &Path) -> Result<(), VsockError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(VsockError::Bind {
                path: path.to_owned(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(VsockError::NotASocket(path.to_owned()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(VsockError::InUse(path.to_owned())),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            log::info!("removing stale vsock socket {}", path.display());
            match fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(VsockError::Bind {
                    path: path.to_owned(),
                    source: e,
                }),
                _ => Ok(()),
            }
        }
        Err(source) => Err(VsockError::Bind {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Binds inside a fresh 0700 directory next to `path`, makes the socket 0600, then links it
/// into place, so it is never reachable with the umask's looser mode (the control socket
/// does the same). Where the temporary name would not fit a socket address, binds in place
/// and chmods at once.
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = parent.join(format!(
        ".grove-vsock-{}-{}",
        std::process::id(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    ));
    let temp = dir.join("s");
    if temp.as_os_str().len() >= 108 {
        let listener = UnixListener::bind(path)?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
        return Ok(listener);
    }
    fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let result = (|| {
        let listener = UnixListener::bind(&temp)?;
        fs::set_permissions(&temp, fs::Permissions::from_mode(0o600))?;
        fs::hard_link(&temp, path)?;
        Ok(listener)
    })();
    let _ = fs::remove_file(&temp);
    let _ = fs::remove_dir(&dir);
    result
}

/// `<uds_path>_<port>`: where a guest connection to host port `port` goes.
pub fn port_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut path = OsString::from(uds_path.as_os_str());
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

/// Connects a non-blocking stream socket to `path`. A Unix stream connect either completes at
/// once or fails; with a non-blocking socket a listener whose backlog is full makes it fail
/// with `EAGAIN` instead of stalling the event loop.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid (empty) value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: no memory is passed; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un whose first `len` bytes hold the family and the
    // NUL-terminated path; it outlives the call, which only reads it.
    let ret = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

/// Parses a `CONNECT <port>` line (without its newline; a trailing `\r` is allowed).
pub fn parse_connect(line: &[u8]) -> Result<u32, &'static str> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let port = line
        .strip_prefix(b"CONNECT ")
        .ok_or("expected \"CONNECT <port>\"")?;
    if port.is_empty() || port.len() > 10 || !port.iter().all(u8::is_ascii_digit) {
        return Err("the port is not a decimal number");
    }
    std::str::from_utf8(port)
        .ok()
        .and_then(|p| p.parse().ok())
        .ok_or("the port is out of range")
}

/// How far a client's handshake got.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum HandshakeStep {
    /// No complete line yet.
    Pending,
    /// `CONNECT <port>` received.
    Connect(u32),
    /// Closed, broken, or not the protocol: drop the client.
    Failed(&'static str),
}

/// A host client accepted on the listening socket that has not sent its line yet.
pub(super) struct Handshake {
    pub stream: UnixStream,
    line: Vec<u8>,
    pub deadline: Instant,
    pub registered: EventSet,
}

impl Handshake {
    pub fn new(stream: UnixStream, deadline: Instant) -> Self {
        Self {
            stream,
            line: Vec::new(),
            deadline,
            registered: EventSet::empty(),
        }
    }

    /// Reads what the client sent so far, one byte at a time so that nothing after the
    /// newline is consumed: those bytes are the start of the data for the guest.
    pub fn read(&mut self) -> HandshakeStep {
        let mut byte = [0u8; 1];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => return HandshakeStep::Failed("closed before CONNECT"),
                Ok(_) if byte[0] == b'\n' => {
                    return match parse_connect(&self.line) {
                        Ok(port) => HandshakeStep::Connect(port),
                        Err(e) => HandshakeStep::Failed(e),
                    }
                }
                Ok(_) if self.line.len() == MAX_CONNECT_LINE => {
                    return HandshakeStep::Failed("CONNECT line too long")
                }
                Ok(_) => self.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return HandshakeStep::Pending,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return HandshakeStep::Failed("read error"),
            }
        }
    }
}
