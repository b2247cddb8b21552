//! Where the daemon keeps its state and listens, shared by `groved` and `grove`.

use std::path::PathBuf;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// `$GROVE_SOCKET`; else `/run/grove/groved.sock` for root; else
/// `$XDG_RUNTIME_DIR/grove/groved.sock`; else `~/.local/share/grove/groved.sock`.
pub fn default_socket() -> PathBuf {
    if let Some(p) = std::env::var_os("GROVE_SOCKET") {
        return PathBuf::from(p);
    }
    if is_root() {
        return PathBuf::from("/run/grove/groved.sock");
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(d).join("grove/groved.sock");
    }
    default_data_dir().join("groved.sock")
}

/// `$GROVE_DATA`; else `/var/lib/grove` for root; else `~/.local/share/grove`.
pub fn default_data_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("GROVE_DATA") {
        return PathBuf::from(p);
    }
    if is_root() {
        return PathBuf::from("/var/lib/grove");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| ".".into());
    home.join(".local/share/grove")
}
