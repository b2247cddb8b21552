//! Dropping what the jailed VMM must not have: resources beyond its rlimits, root ids and
//! groups, capabilities, the ability to gain privileges, inherited descriptors, and the
//! starter's environment.

use caps::CapSet;

use super::{JailConfig, JailError};

fn setrlimit(resource: libc::__rlimit_resource_t, value: u64, name: &str) -> Result<(), JailError> {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit reads the rlimit struct, which lives across the call.
    if unsafe { libc::setrlimit(resource, &limit) } != 0 {
        return Err(JailError::last_os(format!("cannot set {name} to {value}")));
    }
    Ok(())
}

/// RLIMIT_NOFILE and RLIMIT_FSIZE (both soft and hard, so the VMM cannot raise them).
pub fn set_rlimits(config: &JailConfig) -> Result<(), JailError> {
    setrlimit(libc::RLIMIT_NOFILE, config.max_open_files, "RLIMIT_NOFILE")?;
    setrlimit(
        libc::RLIMIT_FSIZE,
        config.max_file_size.unwrap_or(libc::RLIM_INFINITY),
        "RLIMIT_FSIZE",
    )
}

/// Becomes `uid`/`gid` with no supplementary groups and no capabilities in any set, and
/// sets `no_new_privs`. Checks the result: the jail refuses to run half-dropped.
pub fn drop_privileges(config: &JailConfig) -> Result<(), JailError> {
    // The bounding set needs CAP_SETPCAP to shrink, so it goes while still root.
    caps::clear(None, CapSet::Bounding).map_err(caps_error("bounding"))?;
    caps::clear(None, CapSet::Ambient).map_err(caps_error("ambient"))?;
    let (uid, gid) = (config.uid, config.gid);
    // SAFETY: setgroups with a zero count reads no memory.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(JailError::last_os("cannot drop the supplementary groups"));
    }
    // SAFETY: plain integer arguments.
    if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
        return Err(JailError::last_os(format!("cannot become group {gid}")));
    }
    // SAFETY: plain integer arguments. Leaving uid 0 clears the permitted and effective
    // capability sets (no SECBIT_KEEP_CAPS is set).
    if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
        return Err(JailError::last_os(format!("cannot become user {uid}")));
    }
    for set in [CapSet::Effective, CapSet::Permitted, CapSet::Inheritable] {
        caps::clear(None, set).map_err(caps_error("process"))?;
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(JailError::last_os("cannot set no_new_privs"));
    }
    check_dropped(uid, gid)
}

fn caps_error(which: &'static str) -> impl FnOnce(caps::errors::CapsError) -> JailError {
    move |e| JailError::Sys {
        step: format!("cannot clear the {which} capabilities"),
        source: std::io::Error::other(e.to_string()),
    }
}

/// Reads back what [`drop_privileges`] did.
fn check_dropped(uid: u32, gid: u32) -> Result<(), JailError> {
    let fail = |what: &str| JailError::Sys {
        step: format!("privileges not dropped: {what}"),
        source: std::io::Error::other("check failed"),
    };
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: getresuid writes three uid_t through the given valid pointers.
    unsafe { libc::getresuid(&mut r, &mut e, &mut s) };
    if [r, e, s] != [uid; 3] {
        return Err(fail("user ids"));
    }
    // SAFETY: as above, for gid_t.
    unsafe { libc::getresgid(&mut r, &mut e, &mut s) };
    if [r, e, s] != [gid; 3] {
        return Err(fail("group ids"));
    }
    // SAFETY: getgroups with a zero count only returns the number of groups.
    if unsafe { libc::getgroups(0, std::ptr::null_mut()) } != 0 {
        return Err(fail("supplementary groups"));
    }
    for set in [
        CapSet::Effective,
        CapSet::Permitted,
        CapSet::Inheritable,
        CapSet::Bounding,
        CapSet::Ambient,
    ] {
        match caps::read(None, set) {
            Ok(held) if held.is_empty() => {}
            _ => return Err(fail("capabilities")),
        }
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) } != 1 {
        return Err(fail("no_new_privs"));
    }
    Ok(())
}

/// Closes every descriptor above standard error (what the starter left open, by design
/// or by mistake).
pub fn close_fds() -> Result<(), JailError> {
    // SAFETY: close_range takes integers; the descriptors it closes are owned by nothing
    // that is used afterwards (the caller holds no File or OwnedFd above 2).
    if unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) } != 0 {
        return Err(JailError::last_os("cannot close inherited descriptors"));
    }
    Ok(())
}

/// Clears the environment, and its text too: `clearenv` only forgets the strings, which
/// stay in memory (and in `/proc/<pid>/environ`) when no exec follows. Each string is
/// overwritten with zeros first; then, where the kernel allows it (root, and
/// CONFIG_CHECKPOINT_RESTORE), the process's environment range is made empty. Must run
/// while `/proc` is still the host's and before privileges are dropped.
pub fn scrub_environment() -> Result<(), JailError> {
    // SAFETY: the process has one thread, so nothing reads or changes the environment
    // meanwhile; each entry of `environ` up to the terminating null is a NUL-terminated
    // string in writable memory (the initial stack, or the heap for setenv's), which is
    // overwritten within its own length.
    unsafe {
        let mut entry = libc::environ;
        while !entry.is_null() && !(*entry).is_null() {
            let text = *entry;
            std::ptr::write_bytes(text, 0, libc::strlen(text));
            entry = entry.add(1);
        }
        if libc::clearenv() != 0 {
            return Err(JailError::last_os("cannot clear the environment"));
        }
    }
    // Field 51 of /proc/self/stat: the end of the environment range.
    let stat = std::fs::read_to_string("/proc/self/stat")
        .map_err(JailError::io("cannot read /proc/self/stat"))?;
    let env_end = stat
        .rfind(')')
        .and_then(|i| stat[i + 2..].split(' ').nth(48))
        .and_then(|v| v.parse::<libc::c_ulong>().ok());
    if let Some(end) = env_end {
        // SAFETY: prctl with integer arguments; it only moves the start of the range the
        // kernel reports, onto its end. Failure leaves the zeroed text visible, which is
        // harmless, so it is not an error.
        unsafe { libc::prctl(libc::PR_SET_MM, libc::PR_SET_MM_ENV_START, end, 0, 0) };
    }
    Ok(())
}
