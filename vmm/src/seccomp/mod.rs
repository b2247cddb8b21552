//! seccomp-BPF allowlists for the VMM's threads (see docs/seccomp.md).
//!
//! Each thread installs the filter of its [`ThreadKind`] on itself, after its set-up and
//! before it runs guest code or handles a request: a vCPU thread before its first
//! `KVM_RUN`, the event loop before its loop, the control thread before it serves its
//! socket, the main thread once the VM is built (it then only waits and tears down).
//! Filters are per thread (no `TSYNC`), so each kind gets exactly what its code calls.
//!
//! A system call outside the allowlist makes the kernel raise `SIGSYS` in the calling
//! thread ([`SeccompAction::Trap`]); the handler here writes one line naming the thread
//! kind, the call and its first arguments to standard error with `write(2)` and ends the
//! process with `_exit(`[`EXIT_CODE`]`)`, so the parent can tell a filter kill from every
//! other way the VMM ends.
//!
//! [`disable`] turns all of this off for the process (`grove-vmm --no-seccomp`, for
//! debugging only).

mod filters;

use std::cell::Cell;
use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};

pub use filters::syscall_name;

/// The exit status of a VMM killed by its seccomp filter (Firecracker's "bad syscall" code,
/// so people who run both need to learn only one number).
pub const EXIT_CODE: u8 = 148;

/// The kinds of threads a running VMM has; each has its own allowlist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The process's first thread, after the VM is built: waits for the VM's exit, then
    /// stops the other threads, flushes the disks and exits.
    Main,
    /// The device thread: virtio queues (block files, TAP, vsock Unix sockets), the serial
    /// console's input.
    EventLoop,
    /// A vCPU thread: `KVM_RUN`, port and MMIO exits into the devices, state reads for
    /// snapshots.
    Vcpu,
    /// Control requests: status, pause/resume, snapshots (memory and state files, disk
    /// branching, dirty logs), memory digests, shutdown. Also used by the short-lived
    /// thread that prepares the disks' next branch overlays.
    Control,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 4] = [Self::Main, Self::EventLoop, Self::Vcpu, Self::Control];

    pub fn name(self) -> &'static str {
        match self {
            Self::Main => "main",
            Self::EventLoop => "event-loop",
            Self::Vcpu => "vcpu",
            Self::Control => "control",
        }
    }
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter for the {kind} thread")]
    Build {
        kind: ThreadKind,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
    #[error("cannot install the seccomp filter on the {kind} thread")]
    Install {
        kind: ThreadKind,
        #[source]
        source: seccompiler::Error,
    },
}

static DISABLED: AtomicBool = AtomicBool::new(false);

/// Turns the filters off for this process: [`apply`] then does nothing. For debugging only
/// (`grove-vmm --no-seccomp`): a VMM without filters gives a guest that escapes into it the
/// whole of the kernel's system call surface.
pub fn disable() {
    DISABLED.store(true, Ordering::SeqCst);
}

/// Whether [`apply`] installs filters (the default) or was [`disable`]d.
pub fn is_enabled() -> bool {
    !DISABLED.load(Ordering::SeqCst)
}

/// Installs the allowlist of `kind` on the calling thread (nothing if [`disable`]d). Call it
/// after the thread's set-up and before it touches guest code or requests; it cannot be
/// undone, and threads the caller starts afterwards inherit it.
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    apply_combined(&[kind])
}

/// Installs one allowlist of what any of `kinds` may call, for a thread that does the work
/// of several kinds (the event loop while it also serves the control socket); a filter
/// cannot be widened once installed, so the union is built up front. A thread that opens
/// no files also gets the open refusal (see `filters::rules`).
pub fn apply_combined(kinds: &[ThreadKind]) -> Result<(), SeccompError> {
    let Some(&first) = kinds.first() else {
        return Ok(());
    };
    if !is_enabled() {
        return Ok(());
    }
    let program = compile(kinds)?;
    let refuse_open = if filters::opens_files(kinds) {
        None
    } else {
        Some(compile_open_refusal()?)
    };
    install_sigsys_handler()?;
    let armed = test_hook::armed_for(kinds);
    // Attach this thread to a malloc arena now, while it may still probe the CPU count.
    std::hint::black_box(Vec::<u8>::with_capacity(64));
    THREAD_KIND.with(|k| k.set(first.name()));
    let install = |program: &BpfProgram| {
        seccompiler::apply_filter(program).map_err(|source| SeccompError::Install {
            kind: first,
            source,
        })
    };
    // The refusal first: once the allowlist is on, seccomp(2) itself is forbidden. When
    // several filters match, the kernel takes the strictest answer: EACCES from the
    // refusal beats the allowlist's allow.
    if let Some(refusal) = &refuse_open {
        install(refusal)?;
    }
    install(&program)?;
    if armed {
        test_hook::forbidden_call();
    }
    Ok(())
}

/// The BPF program for a thread doing the work of `kinds`.
pub fn compile(kinds: &[ThreadKind]) -> Result<BpfProgram, SeccompError> {
    let first = kinds.first().copied().unwrap_or(ThreadKind::Main);
    let build = |source| SeccompError::Build {
        kind: first,
        source,
    };
    let rules = filters::rules(kinds).map_err(build)?;
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| build(e))?;
    let filter = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, arch)
        .map_err(build)?;
    filter.try_into().map_err(build)
}

/// The companion filter of threads that open no files: `openat` fails with `EACCES`.
fn compile_open_refusal() -> Result<BpfProgram, SeccompError> {
    let build = |source| SeccompError::Build {
        kind: ThreadKind::Vcpu,
        source,
    };
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| build(e))?;
    let filter = SeccompFilter::new(
        filters::refuse_open_rules(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        arch,
    )
    .map_err(build)?;
    filter.try_into().map_err(build)
}

thread_local! {
    // The kind whose filter this thread runs under, for the SIGSYS message.
    static THREAD_KIND: Cell<&'static str> = const { Cell::new("unfiltered") };
}

/// `si_code` of a SIGSYS raised by a seccomp filter.
const SYS_SECCOMP: c_int = 1;

/// The start of `siginfo_t` as the kernel fills it for SIGSYS (`_sigsys` member).
#[repr(C)]
struct SigsysInfo {
    signo: c_int,
    errno: c_int,
    code: c_int,
    _pad: c_int,
    call_addr: *mut c_void,
    syscall: c_int,
    arch: u32,
}

/// A fixed buffer for building the message without allocating (async-signal-safe).
struct Line {
    buf: [u8; 320],
    len: usize,
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn push_dec(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }

    fn push_hex(&mut self, n: u64) {
        let mut digits = [0u8; 16];
        let mut i = digits.len();
        let mut n = n;
        loop {
            i -= 1;
            digits[i] = b"0123456789abcdef"[(n & 0xf) as usize];
            n >>= 4;
            if n == 0 {
                break;
            }
        }
        self.push(b"0x");
        self.push(&digits[i..]);
    }
}

/// The first three arguments of the trapped call, from the saved registers.
#[cfg(target_arch = "x86_64")]
fn call_args(ctx: *mut c_void) -> Option<[u64; 3]> {
    if ctx.is_null() {
        return None;
    }
    // SAFETY: with SA_SIGINFO the kernel passes the interrupted context as a `ucontext_t`;
    // only its saved general registers are read.
    let gregs = unsafe { (*(ctx as *const libc::ucontext_t)).uc_mcontext.gregs };
    Some([
        gregs[libc::REG_RDI as usize] as u64,
        gregs[libc::REG_RSI as usize] as u64,
        gregs[libc::REG_RDX as usize] as u64,
    ])
}

#[cfg(not(target_arch = "x86_64"))]
fn call_args(_ctx: *mut c_void) -> Option<[u64; 3]> {
    None
}

/// Builds the one-line report of a trapped call.
fn report(kind: &str, syscall: c_int, args: Option<[u64; 3]>) -> Line {
    let mut line = Line {
        buf: [0; 320],
        len: 0,
    };
    line.push(b"grove-vmm: error: seccomp: the ");
    line.push(kind.as_bytes());
    line.push(b" thread made a forbidden system call: ");
    line.push_dec(u64::from(syscall.unsigned_abs()));
    if let Some(name) = syscall_name(i64::from(syscall)) {
        line.push(b" (");
        line.push(name.as_bytes());
        line.push(b")");
    }
    if let Some(args) = args {
        line.push(b" with arguments ");
        for (i, a) in args.iter().enumerate() {
            if i > 0 {
                line.push(b", ");
            }
            line.push_hex(*a);
        }
    }
    line.push(b"; exiting with code ");
    line.push_dec(u64::from(EXIT_CODE));
    line.push(b"\n");
    line
}

extern "C" fn handle_sigsys(_num: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    if info.is_null() {
        return;
    }
    // SAFETY: the kernel passes a valid siginfo_t; for SIGSYS its layout starts as
    // `SigsysInfo` (signo, errno, code, then the `_sigsys` member of the union).
    let info = unsafe { &*(info as *const SigsysInfo) };
    if info.code != SYS_SECCOMP {
        // Not from a filter (someone sent SIGSYS with kill(2)): ignore it.
        return;
    }
    // A const-initialised thread-local without a destructor: a plain TLS read.
    let kind = THREAD_KIND.with(Cell::get);
    let line = report(kind, info.syscall, call_args(ctx));
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is valid for `len`
    // bytes. Every filter allows both, so they cannot trap again.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::_exit(c_int::from(EXIT_CODE));
    }
}

/// Installs the process-wide SIGSYS handler (once).
fn install_sigsys_handler() -> Result<(), SeccompError> {
    static RESULT: OnceLock<Result<(), i32>> = OnceLock::new();
    let result = RESULT.get_or_init(|| {
        // SAFETY: a zeroed sigaction is a valid value to fill in.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = handle_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        // SAFETY: `action.sa_mask` is a valid sigset_t to initialise.
        unsafe { libc::sigemptyset(&mut action.sa_mask) };
        // SAFETY: installs a handler that only reads its arguments, then calls write(2)
        // and _exit(2); `action` is fully initialised.
        if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
        }
        Ok(())
    });
    result.map_err(|errno| SeccompError::Handler(std::io::Error::from_raw_os_error(errno)))
}

/// A way for tests to check that a filter kills: in debug builds only, the environment
/// variable `GROVE_VMM_SECCOMP_TEST_HOOK=<kind>` makes the first thread of that kind call
/// `getppid(2)` (allowed to no kind) right after installing its filter. Release builds
/// (what the daemon runs) contain none of this.
mod test_hook {
    use super::ThreadKind;

    pub const VAR: &str = "GROVE_VMM_SECCOMP_TEST_HOOK";

    #[cfg(debug_assertions)]
    pub fn armed_for(kinds: &[ThreadKind]) -> bool {
        std::env::var(VAR).is_ok_and(|v| kinds.iter().any(|k| k.name() == v))
    }

    #[cfg(not(debug_assertions))]
    pub fn armed_for(_kinds: &[ThreadKind]) -> bool {
        false
    }

    pub fn forbidden_call() {
        // SAFETY: getppid takes no arguments and has no side effects; the filter traps it.
        unsafe { libc::syscall(libc::SYS_getppid) };
    }
}

pub use test_hook::VAR as TEST_HOOK_VAR;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles() {
        for kind in ThreadKind::ALL {
            let program = compile(&[kind]).unwrap();
            assert!(!program.is_empty(), "{kind}");
        }
        assert!(!compile(&[ThreadKind::EventLoop, ThreadKind::Control])
            .unwrap()
            .is_empty());
    }

    #[test]
    fn threads_that_open_no_files_get_eacces_instead_of_a_kill() {
        let opened = std::thread::spawn(|| {
            apply(ThreadKind::Vcpu).unwrap();
            std::fs::File::open("/proc/self/status").map(drop)
        })
        .join()
        .unwrap();
        let e = opened.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
        // The control kind opens files.
        let opened = std::thread::spawn(|| {
            apply(ThreadKind::Control).unwrap();
            std::fs::File::open("/proc/self/status").map(drop)
        })
        .join()
        .unwrap();
        assert!(opened.is_ok(), "{opened:?}");
    }

    #[test]
    fn the_report_is_one_line_naming_the_call() {
        let line = report("vcpu", 110, Some([1, 0xae80, 0]));
        let text = std::str::from_utf8(&line.buf[..line.len]).unwrap();
        assert_eq!(
            text,
            "grove-vmm: error: seccomp: the vcpu thread made a forbidden system call: 110 \
             (getppid) with arguments 0x1, 0xae80, 0x0; exiting with code 148\n"
        );
    }
}
