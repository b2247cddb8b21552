//! The allowlists, one per thread kind, with the reason for every entry.
//!
//! Found by reading the code each thread runs and by tracing the KVM test-guest suites
//! (`strace -f` over `vmm/tests/kvm_*.rs` and the `grove-vmm` binary), then checked by
//! running those suites with the filters on. Calls a thread makes while it starts (stack
//! `mmap`, `sigaltstack`, `rseq`, `set_robust_list`, naming itself with `prctl`, the
//! event loop's `epoll_create1` and `eventfd2`) happen before its filter is installed and
//! are not listed.
//!
//! `ioctl` is allowed only for the request numbers a kind needs; `mmap`/`mprotect` never
//! with `PROT_EXEC`; `socket` only for `AF_UNIX`; `tgkill` only for signals to this
//! process. Nothing allows `clone`/`clone3`, `execve`, `ptrace`, `prctl` or `mount`, nor
//! any KVM request that creates objects or changes memory slots: no filtered thread can
//! start a thread or a program. Only the control kind opens files by path (snapshots
//! and disk overlays go wherever the caller asks).

use std::collections::BTreeMap;
use std::os::raw::c_uint;

use seccompiler::{
    BackendError, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition, SeccompRule,
};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

use super::ThreadKind;

/// The KVM ioctl group (`KVMIO` in linux/kvm.h).
const KVMIO: c_uint = 0xAE;

// vCPU ioctls: running, and reading the state a snapshot saves.
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_bindings::kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_bindings::kvm_sregs);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_bindings::kvm_msrs);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_bindings::kvm_lapic_state);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_bindings::kvm_mp_state);
ioctl_ior_nr!(
    KVM_GET_VCPU_EVENTS,
    KVMIO,
    0x9f,
    kvm_bindings::kvm_vcpu_events
);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_bindings::kvm_debugregs);
ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_bindings::kvm_xsave);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_bindings::kvm_xcrs);
// VM ioctls a snapshot reads.
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_bindings::kvm_dirty_log);
ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_bindings::kvm_irqchip);
ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_bindings::kvm_clock_data);
ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_bindings::kvm_pit_state2);

/// `sys!(read)` is the number of `read(2)` on this architecture.
macro_rules! sys {
    ($name:ident) => {
        libc::$name as i64
    };
}

/// Every system call named in any list, for the SIGSYS report.
const NAMES: &[(&str, i64)] = &[
    ("read", sys!(SYS_read)),
    ("write", sys!(SYS_write)),
    ("close", sys!(SYS_close)),
    ("lseek", sys!(SYS_lseek)),
    ("mmap", sys!(SYS_mmap)),
    ("mprotect", sys!(SYS_mprotect)),
    ("munmap", sys!(SYS_munmap)),
    ("brk", sys!(SYS_brk)),
    ("rt_sigprocmask", sys!(SYS_rt_sigprocmask)),
    ("rt_sigreturn", sys!(SYS_rt_sigreturn)),
    ("ioctl", sys!(SYS_ioctl)),
    ("pread64", sys!(SYS_pread64)),
    ("pwrite64", sys!(SYS_pwrite64)),
    ("readv", sys!(SYS_readv)),
    ("writev", sys!(SYS_writev)),
    ("sched_yield", sys!(SYS_sched_yield)),
    ("mremap", sys!(SYS_mremap)),
    ("madvise", sys!(SYS_madvise)),
    ("nanosleep", sys!(SYS_nanosleep)),
    ("getpid", sys!(SYS_getpid)),
    ("socket", sys!(SYS_socket)),
    ("connect", sys!(SYS_connect)),
    ("sendto", sys!(SYS_sendto)),
    ("recvfrom", sys!(SYS_recvfrom)),
    ("sendmsg", sys!(SYS_sendmsg)),
    ("recvmsg", sys!(SYS_recvmsg)),
    ("shutdown", sys!(SYS_shutdown)),
    ("exit", sys!(SYS_exit)),
    ("fcntl", sys!(SYS_fcntl)),
    ("flock", sys!(SYS_flock)),
    ("fsync", sys!(SYS_fsync)),
    ("fdatasync", sys!(SYS_fdatasync)),
    ("ftruncate", sys!(SYS_ftruncate)),
    ("getcwd", sys!(SYS_getcwd)),
    ("rename", sys!(SYS_rename)),
    ("mkdir", sys!(SYS_mkdir)),
    ("rmdir", sys!(SYS_rmdir)),
    ("unlink", sys!(SYS_unlink)),
    ("readlink", sys!(SYS_readlink)),
    ("getppid", sys!(SYS_getppid)),
    ("sigaltstack", sys!(SYS_sigaltstack)),
    ("gettid", sys!(SYS_gettid)),
    ("futex", sys!(SYS_futex)),
    ("sched_getaffinity", sys!(SYS_sched_getaffinity)),
    ("getdents64", sys!(SYS_getdents64)),
    ("clock_gettime", sys!(SYS_clock_gettime)),
    ("clock_nanosleep", sys!(SYS_clock_nanosleep)),
    ("exit_group", sys!(SYS_exit_group)),
    ("epoll_wait", sys!(SYS_epoll_wait)),
    ("epoll_ctl", sys!(SYS_epoll_ctl)),
    ("tgkill", sys!(SYS_tgkill)),
    ("openat", sys!(SYS_openat)),
    ("mkdirat", sys!(SYS_mkdirat)),
    ("newfstatat", sys!(SYS_newfstatat)),
    ("unlinkat", sys!(SYS_unlinkat)),
    ("fallocate", sys!(SYS_fallocate)),
    ("accept4", sys!(SYS_accept4)),
    ("epoll_pwait", sys!(SYS_epoll_pwait)),
    ("preadv", sys!(SYS_preadv)),
    ("pwritev", sys!(SYS_pwritev)),
    ("renameat2", sys!(SYS_renameat2)),
    ("getrandom", sys!(SYS_getrandom)),
    ("statx", sys!(SYS_statx)),
    ("fstat", sys!(SYS_fstat)),
    ("fstatfs", sys!(SYS_fstatfs)),
    ("timerfd_settime", sys!(SYS_timerfd_settime)),
    ("setsockopt", sys!(SYS_setsockopt)),
    ("link", sys!(SYS_link)),
    ("linkat", sys!(SYS_linkat)),
    ("chmod", sys!(SYS_chmod)),
    ("fchmod", sys!(SYS_fchmod)),
    ("fchmodat", sys!(SYS_fchmodat)),
    ("rseq", sys!(SYS_rseq)),
    ("clone", sys!(SYS_clone)),
    ("clone3", sys!(SYS_clone3)),
    ("execve", sys!(SYS_execve)),
    ("prctl", sys!(SYS_prctl)),
    ("seccomp", sys!(SYS_seccomp)),
    ("rt_sigaction", sys!(SYS_rt_sigaction)),
];

/// The name of system call `nr`, when it is one these filters know.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    NAMES.iter().find(|(_, n)| *n == nr).map(|(name, _)| *name)
}

/// One argument test: (argument index, width, operator, value).
type Cond = (u8, Len, Op, u64);

/// How a call is allowed: always, or when all the conditions of any one entry hold.
enum Allow {
    Always,
    When(Vec<Vec<Cond>>),
}

/// Syscall number -> how it is allowed; kinds merge into a union.
#[derive(Default)]
struct Table(BTreeMap<i64, Allow>);

impl Table {
    fn allow(&mut self, calls: &[i64]) {
        for &nr in calls {
            self.0.insert(nr, Allow::Always);
        }
    }

    fn allow_if(&mut self, nr: i64, conds: Vec<Cond>) {
        match self.0.entry(nr).or_insert_with(|| Allow::When(Vec::new())) {
            Allow::Always => {}
            Allow::When(alternatives) => alternatives.push(conds),
        }
    }

    /// `ioctl(fd, request, ...)` for each request in `requests`.
    fn allow_ioctls(&mut self, requests: &[u64]) {
        for &request in requests {
            // The kernel takes the request as an unsigned int: compare the low 32 bits.
            self.allow_if(sys!(SYS_ioctl), vec![(1, Len::Dword, Op::Eq, request)]);
        }
    }

    fn into_rules(self) -> Result<BTreeMap<i64, Vec<SeccompRule>>, BackendError> {
        self.0
            .into_iter()
            .map(|(nr, allow)| {
                let rules = match allow {
                    // An empty chain matches unconditionally.
                    Allow::Always => Vec::new(),
                    Allow::When(alternatives) => alternatives
                        .into_iter()
                        .map(|conds| {
                            let conds = conds
                                .into_iter()
                                .map(|(i, len, op, v)| SeccompCondition::new(i, len, op, v))
                                .collect::<Result<Vec<_>, _>>()?;
                            SeccompRule::new(conds)
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                };
                Ok((nr, rules))
            })
            .collect()
    }
}

/// Whether a thread doing the work of `kinds` opens files by path.
pub fn opens_files(kinds: &[ThreadKind]) -> bool {
    kinds.contains(&ThreadKind::Control)
}

/// The union of the allowlists of `kinds`.
///
/// A thread that opens no files still gets `openat` here: glibc opens files behind the
/// program's back (malloc reads `/proc/sys/vm/overcommit_memory` the first time any
/// thread's heap shrinks, and `/sys/devices/system/cpu/online` when it sizes its arenas),
/// and copes when that fails. So such threads also get [`refuse_open_rules`] in a second
/// filter, which makes every `openat` fail with `EACCES` instead of killing the VMM.
pub fn rules(kinds: &[ThreadKind]) -> Result<BTreeMap<i64, Vec<SeccompRule>>, BackendError> {
    let mut table = Table::default();
    common(&mut table);
    for kind in kinds {
        match kind {
            ThreadKind::Main => main(&mut table),
            ThreadKind::EventLoop => event_loop(&mut table),
            ThreadKind::Vcpu => vcpu(&mut table),
            ThreadKind::Control => control(&mut table),
        }
    }
    if !opens_files(kinds) {
        table.allow(&[sys!(SYS_openat)]);
    }
    table.into_rules()
}

/// The companion filter of threads that open no files: `openat` matches (and fails with
/// `EACCES`), everything else is left to the allowlist.
pub fn refuse_open_rules() -> BTreeMap<i64, Vec<SeccompRule>> {
    BTreeMap::from([(sys!(SYS_openat), Vec::new())])
}

/// `tgkill(this process, any thread, signal)`.
fn allow_signal_to_self(table: &mut Table, signal: i32) {
    table.allow_if(
        sys!(SYS_tgkill),
        vec![
            (0, Len::Dword, Op::Eq, u64::from(std::process::id())),
            (2, Len::Dword, Op::Eq, signal as u64),
        ],
    );
}

/// What every thread of a Rust program needs once it runs.
fn common(t: &mut Table) {
    t.allow(&[
        // Memory: the allocator grows and trims its heaps and arenas, large buffers are
        // mapped and unmapped directly, thread stacks are released at thread exit.
        sys!(SYS_brk),
        sys!(SYS_munmap),
        sys!(SYS_mremap),
        sys!(SYS_madvise),
        // Locks, condition variables, channels, thread joins.
        sys!(SYS_futex),
        sys!(SYS_sched_yield),
        // Clocks (normally the vDSO; the system call is its fallback).
        sys!(SYS_clock_gettime),
        // Log lines to standard error, and the SIGSYS handler's own report.
        sys!(SYS_write),
        // Dropping any descriptor.
        sys!(SYS_close),
        // Returning from a signal handler (the vCPU kick), and thread exit: the runtime
        // removes its alternate signal stack, glibc blocks signals, the thread exits.
        sys!(SYS_rt_sigreturn),
        sys!(SYS_sigaltstack),
        sys!(SYS_rt_sigprocmask),
        sys!(SYS_exit),
        // Process exit, including the SIGSYS handler's _exit.
        sys!(SYS_exit_group),
        // Thread and process ids (glibc's pthread_kill and abort ask for them).
        sys!(SYS_gettid),
        sys!(SYS_getpid),
        // Hash map seeds: the standard library draws them once per thread.
        sys!(SYS_getrandom),
        // glibc's malloc sizes its arenas by the CPUs this thread may run on.
        sys!(SYS_sched_getaffinity),
    ]);
    // Anonymous and file mappings, never executable.
    for call in [sys!(SYS_mmap), sys!(SYS_mprotect)] {
        t.allow_if(
            call,
            vec![(2, Len::Dword, Op::MaskedEq(libc::PROT_EXEC as u64), 0)],
        );
    }
    // The standard library checks, in debug builds, that a descriptor it closes is open.
    t.allow_if(
        sys!(SYS_fcntl),
        vec![(1, Len::Dword, Op::Eq, libc::F_GETFD as u64)],
    );
    // abort() (a panic in release builds) raises SIGABRT on itself.
    allow_signal_to_self(t, libc::SIGABRT);
    // On a SIGSEGV or SIGBUS that is not a stack overflow, the runtime's handler restores
    // the default action and returns to fault again: a crash stays a crash instead of
    // turning into a filter kill.
    for signal in [libc::SIGSEGV, libc::SIGBUS] {
        t.allow_if(
            sys!(SYS_rt_sigaction),
            vec![(0, Len::Dword, Op::Eq, signal as u64)],
        );
    }
}

/// The main thread after set-up: waits for the VM's exit, then stops the vCPUs (kick
/// signal, joins), stops the event loop (eventfd write), flushes the disks, restores the
/// terminal, drops everything (unlinking the control and vsock sockets) and exits.
fn main(t: &mut Table) {
    t.allow(&[
        // The exit notifier's eventfd.
        sys!(SYS_read),
        // Flushing the disks at exit: a qcow2 image writes its cached metadata
        // (refcounts, L2 tables; the file may grow), then syncs. Refusing any of these
        // would lose the guest's last writes.
        sys!(SYS_pread64),
        sys!(SYS_pwrite64),
        sys!(SYS_preadv),
        sys!(SYS_pwritev),
        sys!(SYS_lseek),
        sys!(SYS_ftruncate),
        sys!(SYS_fallocate),
        sys!(SYS_fsync),
        sys!(SYS_fdatasync),
        // Removing the sockets it created; checking they are still its own first.
        sys!(SYS_unlink),
        sys!(SYS_statx),
        sys!(SYS_newfstatat),
        // Stopping epoll watches when devices are dropped.
        sys!(SYS_epoll_ctl),
    ]);
    allow_signal_to_self(t, crate::vstate::vcpu::kick_signal());
    // Terminal back to canonical mode (tcgetattr/tcsetattr).
    t.allow_ioctls(&[libc::TCGETS, libc::TCSETS, libc::TCSETSW, libc::TCSETSF]);
}

/// The event-loop thread: every device's I/O.
fn event_loop(t: &mut Table) {
    t.allow(&[
        // The loop itself.
        sys!(SYS_epoll_wait),
        sys!(SYS_epoll_pwait),
        sys!(SYS_epoll_ctl),
        // Eventfds (queue notifications, interrupts), the console's input, TAP frames,
        // vsock streams.
        sys!(SYS_read),
        sys!(SYS_readv),
        sys!(SYS_writev),
        // Block devices: raw and qcow2 files (the qcow2 layer grows its file and punches
        // holes for discards).
        sys!(SYS_pread64),
        sys!(SYS_pwrite64),
        sys!(SYS_preadv),
        sys!(SYS_pwritev),
        sys!(SYS_lseek),
        sys!(SYS_fsync),
        sys!(SYS_fdatasync),
        sys!(SYS_fallocate),
        sys!(SYS_ftruncate),
        sys!(SYS_fstat),
        sys!(SYS_statx),
        // vsock: host clients connect to the VM's socket; guest connections go out to
        // `<socket>_<port>`.
        sys!(SYS_accept4),
        sys!(SYS_connect),
        sys!(SYS_recvfrom),
        sys!(SYS_sendto),
        sys!(SYS_recvmsg),
        sys!(SYS_sendmsg),
        sys!(SYS_shutdown),
    ]);
    // vsock's periodic deadline timer (connections waiting for a handshake), armed and
    // disarmed as connections come and go.
    t.allow(&[sys!(SYS_timerfd_settime)]);
    // Only Unix sockets (guest-initiated vsock connections).
    t.allow_if(
        sys!(SYS_socket),
        vec![(0, Len::Dword, Op::Eq, libc::AF_UNIX as u64)],
    );
    // Non-blocking sockets.
    t.allow_ioctls(&[libc::FIONBIO]);
    for cmd in [libc::F_GETFL, libc::F_SETFL] {
        t.allow_if(sys!(SYS_fcntl), vec![(1, Len::Dword, Op::Eq, cmd as u64)]);
    }
}

/// A vCPU thread: runs the guest; its port and MMIO exits run device code (serial output,
/// eventfd writes for queue notifications and interrupts); saves its state for snapshots.
///
/// Beyond the common calls (channel waits are `futex`; serial output and eventfd writes
/// are `write`), only KVM requests (`ioctl` on its own vCPU).
fn vcpu(t: &mut Table) {
    t.allow_ioctls(&[
        KVM_RUN(),
        KVM_GET_REGS(),
        KVM_GET_SREGS(),
        KVM_GET_MSRS(),
        KVM_GET_LAPIC(),
        KVM_GET_MP_STATE(),
        KVM_GET_VCPU_EVENTS(),
        KVM_GET_DEBUGREGS(),
        KVM_GET_TSC_KHZ(),
        KVM_GET_XSAVE(),
        KVM_GET_XCRS(),
    ]);
}

/// The `control` thread: its own event loop serving the control socket, and the
/// requests: snapshot directories written atomically (create, write, fsync, rename, remove
/// on failure; a live snapshot copies memory and reads the dirty log while the guest
/// runs), disk overlays created and locked, vCPUs kicked for pause/resume/save.
fn control(t: &mut Table) {
    t.allow(&[
        // The loop itself.
        sys!(SYS_epoll_wait),
        sys!(SYS_epoll_pwait),
        sys!(SYS_epoll_ctl),
        // The control socket (accepted connections are non-blocking).
        sys!(SYS_accept4),
        sys!(SYS_recvfrom),
        sys!(SYS_sendto),
        sys!(SYS_read),
        // Snapshot and overlay files.
        sys!(SYS_openat),
        sys!(SYS_pread64),
        sys!(SYS_pwrite64),
        sys!(SYS_preadv),
        sys!(SYS_pwritev),
        sys!(SYS_lseek),
        sys!(SYS_fsync),
        sys!(SYS_fdatasync),
        sys!(SYS_ftruncate),
        sys!(SYS_fallocate),
        sys!(SYS_flock),
        sys!(SYS_fstat),
        sys!(SYS_statx),
        sys!(SYS_newfstatat),
        // The qcow2 layer asks the file system of a new overlay for its block size.
        sys!(SYS_fstatfs),
        sys!(SYS_readlink),
        sys!(SYS_getcwd),
        sys!(SYS_mkdir),
        sys!(SYS_mkdirat),
        sys!(SYS_rename),
        sys!(SYS_renameat2),
        sys!(SYS_unlink),
        sys!(SYS_unlinkat),
        sys!(SYS_rmdir),
        sys!(SYS_getdents64),
        // A disk branch hard-links the running layer to its frozen name and makes the
        // frozen layer read-only.
        sys!(SYS_link),
        sys!(SYS_linkat),
        sys!(SYS_chmod),
        sys!(SYS_fchmod),
        sys!(SYS_fchmodat),
        // Waits between retries.
        sys!(SYS_clock_nanosleep),
        sys!(SYS_nanosleep),
    ]);
    // Kicking vCPUs out of KVM_RUN for pause, resume and saving their state.
    allow_signal_to_self(t, crate::vstate::vcpu::kick_signal());
    t.allow_ioctls(&[
        libc::FIONBIO,
        KVM_GET_IRQCHIP(),
        KVM_GET_PIT2(),
        KVM_GET_CLOCK(),
        KVM_GET_DIRTY_LOG(),
    ]);
    for cmd in [
        libc::F_GETFL,
        libc::F_SETFL,
        libc::F_SETFD,
        libc::F_DUPFD_CLOEXEC,
    ] {
        t.allow_if(sys!(SYS_fcntl), vec![(1, Len::Dword, Op::Eq, cmd as u64)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_request_numbers_match_linux() {
        // Values from linux/kvm.h on x86_64.
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS(), 0x8138_ae83);
        assert_eq!(KVM_GET_MSRS(), 0xc008_ae88);
        assert_eq!(KVM_GET_LAPIC(), 0x8400_ae8e);
        assert_eq!(KVM_GET_XSAVE(), 0x9000_aea4);
        assert_eq!(KVM_GET_DIRTY_LOG(), 0x4010_ae42);
        assert_eq!(KVM_GET_IRQCHIP(), 0xc208_ae62);
        assert_eq!(KVM_GET_CLOCK(), 0x8030_ae7c);
        assert_eq!(KVM_GET_PIT2(), 0x8070_ae9f);
    }

    #[test]
    fn a_union_allows_what_either_kind_allows() {
        let vcpu = rules(&[ThreadKind::Vcpu]).unwrap();
        let both = rules(&[ThreadKind::Vcpu, ThreadKind::Control]).unwrap();
        assert!(!vcpu.contains_key(&sys!(SYS_flock)));
        assert!(both.contains_key(&sys!(SYS_flock)));
        // Opening is refused (EACCES) for a vCPU thread, allowed with the control kind.
        assert!(!opens_files(&[ThreadKind::Vcpu]));
        assert!(opens_files(&[ThreadKind::Vcpu, ThreadKind::Control]));
        // ioctl keeps its argument checks: vCPU requests plus the control ones.
        let ioctls = |r: &BTreeMap<i64, Vec<SeccompRule>>| r[&sys!(SYS_ioctl)].len();
        assert_eq!(ioctls(&vcpu), 11);
        assert_eq!(ioctls(&both), 11 + 5);
    }

    #[test]
    fn no_kind_may_start_threads_or_programs() {
        for kind in ThreadKind::ALL {
            let r = rules(&[kind]).unwrap();
            for nr in [
                sys!(SYS_clone),
                sys!(SYS_clone3),
                sys!(SYS_execve),
                sys!(SYS_getppid),
                sys!(SYS_prctl),
                sys!(SYS_seccomp),
            ] {
                assert!(!r.contains_key(&nr), "{kind} allows {:?}", syscall_name(nr));
            }
        }
    }
}
