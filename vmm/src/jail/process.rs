//! The jail's processes: the starter outside (waits, forwards signals, cleans the cgroup),
//! the PID namespace's init (builds the jail, then reaps), and the VMM (PID 2).
//!
//! The VMM is not the namespace's init on purpose: the kernel drops signals whose action
//! is the default when they are sent to an init, which would turn `SIGXFSZ` (RLIMIT_FSIZE)
//! into a mere `EFBIG` and make `SIGTERM` a no-op.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};

use super::{creds, mounts, JailConfig, JailError};

/// Which process returned from [`spawn_namespaced`].
#[derive(Debug)]
pub enum Role {
    /// The jailed VMM: go on and run the VM.
    Vmm,
    /// The starter, once the jail ended with this status.
    Outside(Status),
}

/// How a jailed process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Code(i32),
    Signal(i32),
}

/// The process signals are passed on to (the init, seen from the starter; the VMM, seen
/// from the init).
static FORWARD_TO: AtomicI32 = AtomicI32::new(0);
const FORWARDED: [libc::c_int; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];

extern "C" fn forward(signal: libc::c_int) {
    let pid = FORWARD_TO.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe and takes integers only.
        unsafe { libc::kill(pid, signal) };
    }
}

fn forward_signals_to(pid: libc::pid_t) {
    FORWARD_TO.store(pid, Ordering::Relaxed);
    for signal in FORWARDED {
        // SAFETY: `forward` only loads an atomic and calls kill, both async-signal-safe.
        unsafe { libc::signal(signal, forward as *const () as libc::sighandler_t) };
    }
}

/// Waits for child `pid`, reaping (in an init) any other process that ends meanwhile.
fn wait_for(pid: libc::pid_t) -> Status {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status through a valid pointer.
        let r = unsafe { libc::waitpid(-1, &mut status, 0) };
        if r == pid {
            if libc::WIFSIGNALED(status) {
                return Status::Signal(libc::WTERMSIG(status));
            }
            if libc::WIFEXITED(status) {
                return Status::Code(libc::WEXITSTATUS(status));
            }
        } else if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // No child left: cannot happen while `pid` has not been reaped.
            return Status::Code(1);
        }
    }
}

/// An exit code that carries a signal through the init (which cannot be killed by one it
/// would forward): 128 + the signal number, as shells do.
fn encode(status: Status) -> i32 {
    match status {
        Status::Code(c) => c,
        Status::Signal(s) => 128 + s,
    }
}

fn decode(status: Status) -> Status {
    match status {
        Status::Code(c) if (129..=128 + 64).contains(&c) => Status::Signal(c - 128),
        other => other,
    }
}

/// Ends this process the way the jailed VMM ended: the same exit code, or killed by the
/// same signal (without a core dump).
pub fn exit_like(status: Status) -> ! {
    match status {
        Status::Code(c) => std::process::exit(c),
        Status::Signal(s) => {
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: setrlimit reads the struct; signal, sigprocmask and raise take
            // integers and a sigset that lives on the stack across the calls.
            unsafe {
                libc::setrlimit(libc::RLIMIT_CORE, &none);
                libc::signal(s, libc::SIG_DFL);
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, s);
                libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                libc::raise(s);
            }
            std::process::exit(128 + s)
        }
    }
}

fn fork() -> Result<libc::pid_t, JailError> {
    // SAFETY: the caller has a single thread (checked by `enter`'s contract), so the child
    // inherits no lock held by another thread.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(JailError::last_os("cannot fork"));
    }
    Ok(pid)
}

fn unshare(flags: libc::c_int, what: &str) -> Result<(), JailError> {
    // SAFETY: unshare takes flags only.
    if unsafe { libc::unshare(flags) } != 0 {
        return Err(JailError::last_os(format!(
            "cannot create a {what} namespace"
        )));
    }
    Ok(())
}

/// Creates the PID namespace and its init. Returns `Role::Vmm` in the jailed VMM and
/// `Role::Outside` in the starter once the jail ended; the init never returns.
pub fn spawn_namespaced(config: &JailConfig) -> Result<Role, JailError> {
    // The init learns of the starter's death from the write end closing.
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(JailError::last_os("cannot create a pipe"));
    }
    // SAFETY: pipe2 returned two new descriptors that nothing else owns.
    let (alive_r, alive_w) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    unshare(libc::CLONE_NEWPID, "PID")?;
    let init = fork()?;
    if init == 0 {
        drop(alive_w);
        match init_process(config, alive_r) {
            Ok(()) => return Ok(Role::Vmm),
            Err(e) => {
                eprintln!("grove-vmm: error: jail: {:#}", anyhow::Error::from(e));
                std::process::exit(2);
            }
        }
    }
    drop(alive_r);
    forward_signals_to(init);
    let status = decode(wait_for(init));
    drop(alive_w);
    Ok(Role::Outside(status))
}

/// The namespace's init: builds the jail around itself, forks the VMM into it and waits.
/// Returns only in the VMM.
fn init_process(config: &JailConfig, alive: OwnedFd) -> Result<(), JailError> {
    // SAFETY: umask takes and returns a mode.
    unsafe { libc::umask(0o022) };
    creds::scrub_environment()?;
    match &config.netns {
        Some(path) => {
            let ns = std::fs::File::open(path)
                .map_err(JailError::io(format!("cannot open {}", path.display())))?;
            // SAFETY: setns takes a descriptor that stays open across the call.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(JailError::last_os(format!(
                    "cannot join the network namespace {}",
                    path.display()
                )));
            }
        }
        None => unshare(libc::CLONE_NEWNET, "network")?,
    }
    unshare(libc::CLONE_NEWNS, "mount")?;
    mounts::build_and_pivot(config)?;
    creds::set_rlimits(config)?;
    creds::drop_privileges(config)?;
    // After the credential change, which clears it: die with the starter.
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        return Err(JailError::last_os("cannot set the parent-death signal"));
    }
    let mut poll = libc::pollfd {
        fd: alive.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes one pollfd that lives across the call.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    if ready != 0 {
        // The write end closed (or poll failed): the starter is gone.
        std::process::exit(1);
    }
    drop(alive);
    creds::close_fds()?;
    let vmm = fork()?;
    if vmm == 0 {
        return Ok(());
    }
    forward_signals_to(vmm);
    std::process::exit(encode(wait_for(vmm)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_survive_the_trip_through_the_init() {
        for status in [
            Status::Code(0),
            Status::Code(2),
            Status::Signal(libc::SIGXFSZ),
            Status::Signal(libc::SIGKILL),
            Status::Signal(libc::SIGSYS),
        ] {
            assert_eq!(decode(Status::Code(encode(status))), status);
        }
    }
}
