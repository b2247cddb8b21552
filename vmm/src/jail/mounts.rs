//! The jail's filesystem: a tmpfs root that holds only bind mounts of the VM's own files,
//! at the same absolute paths as on the host (so qcow2 backing paths, snapshot paths and
//! socket paths mean the same inside and out), and a minimal `/dev`.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::{JailConfig, JailError};

/// Kernel module directory the VMM looks at to detect a PVM host (`vstate::kvm::is_pvm`).
const PVM_MODULE: &str = "/sys/module/kvm_pvm";

fn cstr(path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| JailError::NotAbsolute(path.display().to_string()))
}

fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), JailError> {
    let step = || format!("cannot mount {}", target.display());
    let source = source.map(cstr).transpose()?;
    let target_c = cstr(target)?;
    let fstype = fstype.map(|s| CString::new(s).map_err(|_| JailError::last_os(step())));
    let fstype = fstype.transpose()?;
    let data = data.map(|s| CString::new(s).map_err(|_| JailError::last_os(step())));
    let data = data.transpose()?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    let r = unsafe {
        libc::mount(
            ptr(&source),
            target_c.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    if r != 0 {
        return Err(JailError::last_os(step()));
    }
    Ok(())
}

/// `path` inside the not yet pivoted root.
fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Binds `source` at the same path under `root`, read-only unless `writable`; never
/// with set-uid programs, devices or executables.
fn bind(root: &Path, source: &Path, writable: bool) -> Result<(), JailError> {
    let target = inside(root, source);
    let meta = std::fs::metadata(source)
        .map_err(JailError::io(format!("cannot read {}", source.display())))?;
    let parent = target.parent().unwrap_or(root);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(parent)
        .map_err(JailError::io(format!("cannot create {}", parent.display())))?;
    if meta.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&target)
    } else if target.exists() {
        Ok(())
    } else {
        std::fs::File::create(&target).map(drop)
    }
    .map_err(JailError::io(format!("cannot create {}", target.display())))?;
    mount(Some(source), &target, None, libc::MS_BIND, None)?;
    let mut flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV;
    flags |= libc::MS_NOEXEC;
    if !writable {
        flags |= libc::MS_RDONLY;
    }
    mount(None, &target, None, flags, None)
}

/// Makes the character device `name` (numbered as on the host) under `root/dev`.
fn device(root: &Path, name: &str, mode: u32, owner: Option<(u32, u32)>) -> Result<(), JailError> {
    let host = Path::new("/dev").join(name);
    let meta = std::fs::metadata(&host)
        .map_err(JailError::io(format!("cannot find {}", host.display())))?;
    if !meta.file_type().is_char_device() {
        return Err(JailError::Missing(host.display().to_string()));
    }
    let target = root.join("dev").join(name);
    if let Some(parent) = target.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(JailError::io(format!("cannot create {}", parent.display())))?;
    }
    let c = cstr(&target)?;
    // SAFETY: mknod reads the NUL-terminated path; the mode and device number are plain
    // integers.
    if unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | mode, meta.rdev()) } != 0 {
        return Err(JailError::last_os(format!(
            "cannot create {}",
            target.display()
        )));
    }
    // SAFETY: as above; chmod sets the exact mode whatever the umask.
    if unsafe { libc::chmod(c.as_ptr(), mode) } != 0 {
        return Err(JailError::last_os(format!(
            "cannot chmod {}",
            target.display()
        )));
    }
    if let Some((uid, gid)) = owner {
        // SAFETY: as above.
        if unsafe { libc::chown(c.as_ptr(), uid, gid) } != 0 {
            return Err(JailError::last_os(format!(
                "cannot chown {}",
                target.display()
            )));
        }
    }
    Ok(())
}

/// In a new mount namespace: builds the jail's root over `config.root` and pivots into
/// it. The old root is detached; afterwards only the jail's files exist for this process.
pub fn build_and_pivot(config: &JailConfig) -> Result<(), JailError> {
    // Nothing mounted here may propagate back to the host, or the other way.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    let root = &config.root;
    // Exec and set-uid are never needed; devices are (the nodes made below).
    mount(
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=0755,size=1m,nr_inodes=4096"),
    )?;
    // Parents before children, so a read-only file inside a writable directory (or the
    // other way round) ends up on top.
    let mut binds: Vec<(&PathBuf, bool)> = config
        .read_only
        .iter()
        .map(|p| (p, false))
        .chain(config.read_write.iter().map(|p| (p, true)))
        .collect();
    binds.sort_by_key(|(p, _)| p.components().count());
    for (path, writable) in binds {
        bind(root, path, writable)?;
    }
    if Path::new(PVM_MODULE).is_dir() {
        bind(root, Path::new(PVM_MODULE), false)?;
    }
    device(root, "kvm", 0o600, Some((config.uid, config.gid)))?;
    device(root, "null", 0o666, None)?;
    device(root, "urandom", 0o666, None)?;
    if config.netns.is_some() {
        device(root, "net/tun", 0o666, None)?;
    }
    pivot(root)?;
    // The root itself (mount points and device nodes) is read-only from now on.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC,
        None,
    )
}

/// `pivot_root(root, root)` then detaching the old root stacked under it: no directory
/// for the old root is needed, and nothing of it stays reachable.
fn pivot(root: &Path) -> Result<(), JailError> {
    std::env::set_current_dir(root)
        .map_err(JailError::io(format!("cannot enter {}", root.display())))?;
    let dot = c".";
    // SAFETY: pivot_root takes two NUL-terminated paths and touches no other memory.
    if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } != 0 {
        return Err(JailError::last_os("pivot_root"));
    }
    // SAFETY: umount2 takes a NUL-terminated path and flags.
    if unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(JailError::last_os("cannot detach the old root"));
    }
    std::env::set_current_dir("/").map_err(JailError::io("cannot enter the new root"))
}
