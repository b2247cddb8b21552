//! The jail: confines a `grove-vmm` process before it reads any guest input or request.
//!
//! [`enter`] is called as root, right after the command line is parsed. It builds the jail
//! in steps, and any step that fails ends the process with a one-line error and exit
//! code 2, before a VM exists:
//!
//! 1. cgroup: a leaf `<own cgroup>/<parent>/<id>` with memory, CPU and pids limits, which
//!    this process joins ([`cgroup`]);
//! 2. a new PID namespace; the process forks, and the child is the namespace's init;
//! 3. the init: a new mount namespace (and a new, empty network namespace unless one is
//!    joined), a tmpfs root holding only bind mounts of the files the VM needs at their
//!    host paths and a few device nodes, `pivot_root` into it ([`mounts`]);
//! 4. the environment scrubbed, rlimits, unprivileged uid/gid without supplementary
//!    groups, every capability dropped, `no_new_privs`, every inherited descriptor above 2
//!    closed ([`creds`]);
//! 5. the init forks the VMM (PID 2: the kernel ignores default-action signals such as
//!    `SIGXFSZ` sent to a namespace's init, which must not shield the VMM), and stays to
//!    reap and to pass signals and the exit status back ([`process`]).
//!
//! [`enter`] returns only in that last process, which then runs the VM. See docs/jail.md.

pub mod cgroup;
pub mod creds;
pub mod mounts;
pub mod process;

use std::path::{Component, Path, PathBuf};

/// What a jail holds and how it is limited. Built from `grove-vmm --jail ...` flags.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JailConfig {
    /// Directory that becomes the VMM's root (a tmpfs is mounted over it); must exist.
    pub root: PathBuf,
    /// Unprivileged user the VMM runs as (not 0).
    pub uid: u32,
    /// Unprivileged group the VMM runs as (not 0).
    pub gid: u32,
    /// Files and directories bound read-only at the same path inside the jail.
    pub read_only: Vec<PathBuf>,
    /// Files and directories bound read-write at the same path inside the jail.
    pub read_write: Vec<PathBuf>,
    /// A network namespace to join (e.g. `/run/netns/grove-1`) instead of a new empty one;
    /// `/dev/net/tun` is then available in the jail.
    pub netns: Option<PathBuf>,
    /// cgroup limits; `None`: no cgroup is created.
    pub cgroup: Option<cgroup::CgroupConfig>,
    /// RLIMIT_NOFILE (soft and hard).
    pub max_open_files: u64,
    /// RLIMIT_FSIZE in bytes (soft and hard); `None`: unlimited.
    pub max_file_size: Option<u64>,
}

/// Default RLIMIT_NOFILE: a VM needs a few dozen descriptors (disks, eventfds, sockets).
pub const DEFAULT_MAX_OPEN_FILES: u64 = 1024;

/// A jail step that failed; the VMM does not start.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("the jail needs root (it creates namespaces, mounts and cgroups)")]
    NotRoot,
    #[error("--jail-uid and --jail-gid must not be 0")]
    RootIds,
    #[error("jail path {0} must be absolute")]
    NotAbsolute(String),
    #[error("jail path {0} must not contain '.' or '..' components")]
    DotComponent(String),
    #[error("jail path {0} does not exist")]
    Missing(String),
    #[error("jail directory {0} must be an existing directory other than /, named without symbolic links")]
    BadRoot(String),
    #[error("jail path {path} lies inside the jail directory {root}")]
    InsideRoot { path: String, root: String },
    #[error("cgroup: {0}")]
    Cgroup(#[from] cgroup::CgroupError),
    #[error("{step}")]
    Sys {
        step: String,
        #[source]
        source: std::io::Error,
    },
}

impl JailError {
    /// A failed system call, named by what it was for; the cause is `errno`.
    pub(crate) fn last_os(step: impl Into<String>) -> Self {
        JailError::Sys {
            step: step.into(),
            source: std::io::Error::last_os_error(),
        }
    }

    pub(crate) fn io(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let step = step.into();
        move |source| JailError::Sys { step, source }
    }
}

impl JailConfig {
    /// Checks everything that can be checked before any namespace or cgroup exists.
    pub fn validate(&self) -> Result<(), JailError> {
        // SAFETY: geteuid has no preconditions and touches no memory.
        if unsafe { libc::geteuid() } != 0 {
            return Err(JailError::NotRoot);
        }
        if self.uid == 0 || self.gid == 0 {
            return Err(JailError::RootIds);
        }
        let root = canonical(&self.root)?;
        if !root.is_dir() || root == Path::new("/") || root != self.root {
            return Err(JailError::BadRoot(self.root.display().to_string()));
        }
        for path in self.read_only.iter().chain(&self.read_write) {
            if canonical(path)?.starts_with(&root) {
                return Err(JailError::InsideRoot {
                    path: path.display().to_string(),
                    root: root.display().to_string(),
                });
            }
        }
        if let Some(ns) = &self.netns {
            canonical(ns)?;
        }
        if let Some(cg) = &self.cgroup {
            cg.validate()?;
        }
        Ok(())
    }
}

/// Where `path` really is, after checking it is absolute, plain (it is bound inside the
/// jail under this very name, which the VM uses) and exists.
fn canonical(path: &Path) -> Result<PathBuf, JailError> {
    if !path.is_absolute() {
        return Err(JailError::NotAbsolute(path.display().to_string()));
    }
    let plain = path
        .components()
        .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !plain {
        return Err(JailError::DotComponent(path.display().to_string()));
    }
    path.canonicalize()
        .map_err(|_| JailError::Missing(path.display().to_string()))
}

/// Confines this process as `config` says. Returns only in the jailed VMM process; the
/// processes outside (the original one) and the namespace's init wait for it and end with
/// its status. Must be called while the process has a single thread.
pub fn enter(config: &JailConfig) -> Result<(), JailError> {
    config.validate()?;
    let cgroup = config
        .cgroup
        .as_ref()
        .map(cgroup::Cgroup::create)
        .transpose()?;
    let result = process::spawn_namespaced(config);
    // Only the original process gets here with an error or after the jail ended; the
    // namespaced processes return Ok from spawn_namespaced only in the VMM.
    match result {
        Ok(process::Role::Vmm) => Ok(()),
        Ok(process::Role::Outside(status)) => {
            if let Some(cg) = cgroup {
                cg.remove();
            }
            process::exit_like(status)
        }
        Err(e) => {
            if let Some(cg) = cgroup {
                cg.remove();
            }
            Err(e)
        }
    }
}
