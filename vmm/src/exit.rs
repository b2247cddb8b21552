//! Why a VM stopped, and the one place every thread reports it to.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use vmm_sys_util::eventfd::EventFd;

/// The reason a VM stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset itself (i8042 reset line, or a KVM reset event): a clean exit.
    GuestReset,
    /// The guest powered itself off through an interface the VMM sees (KVM system event).
    GuestPowerOff,
    /// The host asked the VMM to stop.
    Stopped,
    /// A vCPU hit something the VMM cannot continue from (triple fault, KVM error, ...).
    VcpuError { index: u8, message: String },
}

impl VmExit {
    /// Process exit code of `grove-vmm` for this reason: 0 for clean exits, 1 for errors.
    /// (2 is reserved for bad input detected before the VM started.)
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::GuestReset | VmExit::GuestPowerOff | VmExit::Stopped => 0,
            VmExit::VcpuError { .. } => 1,
        }
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::GuestReset => write!(f, "guest reset"),
            VmExit::GuestPowerOff => write!(f, "guest powered off"),
            VmExit::Stopped => write!(f, "stopped by the host"),
            VmExit::VcpuError { index, message } => write!(f, "vCPU {index} failed: {message}"),
        }
    }
}

/// Collects the first exit reason reported by any thread and wakes whoever waits for it.
#[derive(Debug)]
pub struct ExitNotifier {
    reason: Mutex<Option<VmExit>>,
    // Set with the reason; read lock-free on the vCPU exit path.
    requested: AtomicBool,
    evt: EventFd,
}

impl ExitNotifier {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            requested: AtomicBool::new(false),
            evt: EventFd::new(0)?,
        })
    }

    /// Records `reason` unless an earlier one was recorded, and wakes the waiter.
    pub fn notify(&self, reason: VmExit) {
        let mut slot = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            log::debug!("VM exit requested: {reason}");
            *slot = Some(reason);
            self.requested.store(true, Ordering::Release);
        }
        drop(slot);
        if let Err(e) = self.evt.write(1) {
            log::error!("cannot signal VM exit: {e}");
        }
    }

    /// Whether some thread asked the VM to stop (cheap: no lock).
    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// The reason recorded so far, if any.
    pub fn reason(&self) -> Option<VmExit> {
        self.reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Blocks until some thread calls [`notify`](Self::notify).
    pub fn wait(&self) -> VmExit {
        loop {
            if let Some(r) = self.reason() {
                return r;
            }
            if let Err(e) = self.evt.read() {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    log::error!("cannot wait for VM exit: {e}");
                    return VmExit::Stopped;
                }
            }
        }
    }
}
