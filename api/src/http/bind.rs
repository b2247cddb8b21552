//! Creating the API's Unix socket so that nobody but its owner can ever connect, not even in
//! the moment between `bind` and `chmod`.

use std::fs::{self, DirBuilder, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::net::UnixListener;

/// Binds a Unix socket at `path` with mode 0600, for [`super::Listeners::unix`].
///
/// The socket is bound in a fresh 0700 directory next to `path`, made 0600, then renamed into
/// place, so it is never reachable with a looser mode (`bind` applies the umask, not a mode).
/// A `path` that exists is refused unless it is a stale socket (one nobody listens on any
/// more, as a crashed daemon leaves behind), which the rename replaces; a socket something
/// still listens on is refused with `AddrInUse`, anything else with `AlreadyExists`. The
/// caller removes the socket when it is done. Must be called inside a tokio runtime.
pub fn bind_unix(path: impl AsRef<Path>) -> io::Result<UnixListener> {
    let path = path.as_ref();
    refuse_existing(path)?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let private = private_dir(parent)?;
    let result = bind_in(&private, path);
    // The directory is empty when the rename worked, and holds the socket when it did not.
    let _ = fs::remove_file(private.join("s"));
    let _ = fs::remove_dir(&private);
    let listener = result?;
    listener.set_nonblocking(true)?;
    UnixListener::from_std(listener)
}

fn bind_in(private: &Path, path: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    let tmp = private.join("s");
    let listener = std::os::unix::net::UnixListener::bind(&tmp).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("binding a Unix socket in {}: {e}", private.display()),
        )
    })?;
    fs::set_permissions(&tmp, Permissions::from_mode(0o600))?;
    // Checked again just before the rename, which would replace whatever is there.
    refuse_existing(path)?;
    fs::rename(&tmp, path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("moving the API socket to {}: {e}", path.display()),
        )
    })?;
    Ok(listener)
}

/// Ok if `path` does not exist or is a socket nobody listens on.
fn refuse_existing(path: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; remove it or choose another path",
                path.display()
            ),
        ));
    }
    match StdUnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "something is listening on {} already (another groved?)",
                path.display()
            ),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(()),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("checking whether {} is stale: {e}", path.display()),
        )),
    }
}

/// A new directory in `parent` that only this user can enter.
fn private_dir(parent: &Path) -> io::Result<PathBuf> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    // Short, because a socket path has to fit in 108 bytes.
    for _ in 0..100 {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = parent.join(format!(".gs{}.{n}", std::process::id()));
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {
                // The umask may have taken bits away; make it exactly 0700.
                if let Err(e) = fs::set_permissions(&dir, Permissions::from_mode(0o700)) {
                    let _ = fs::remove_dir(&dir);
                    return Err(e);
                }
                return Ok(dir);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("creating a private directory in {}: {e}", parent.display()),
                ))
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!(
            "could not create a private directory in {}",
            parent.display()
        ),
    ))
}
