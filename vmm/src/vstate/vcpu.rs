//! vCPUs: configuration, the per-vCPU thread with its explicit state machine, and the exit
//! handler.
//!
//! Each vCPU thread is `Paused`, `Running` or `Exited`, and changes state only on a typed
//! [`VcpuEvent`] from its [`VcpuHandle`] (or on a guest exit that stops the VM). To deliver
//! an event to a thread that sits in `KVM_RUN`, the handle sends it and then kicks the
//! thread with a real-time signal whose handler sets `kvm_run.immediate_exit`: `KVM_RUN`
//! returns `EINTR` at once, even if the signal landed just before the ioctl was entered,
//! and a pending port or MMIO read is completed first, so the vCPU stops at an
//! instruction boundary.

use std::cell::Cell;
use std::os::raw::{c_int, c_void};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_run, CpuId, Msrs, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::vcpu_state::{self, VcpuArchState, VcpuStateError};
use super::vm::Vm;
use crate::boot::{regs, KernelEntry};
use crate::devices::bus::Bus;
use crate::exit::{ExitNotifier, VmExit};

/// How long a caller waits for a vCPU to acknowledge an event before giving up.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors creating, configuring or controlling a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {index}")]
    Create {
        index: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot configure vCPU {index}: {step}")]
    Configure {
        index: u8,
        step: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: KVM accepted only {set} of {wanted} boot MSRs")]
    Msrs {
        index: u8,
        set: usize,
        wanted: usize,
    },
    #[error("cannot build the MSR list")]
    MsrList(#[source] vmm_sys_util::fam::Error),
    #[error("cannot install the vCPU kick signal handler")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
    #[error("cannot start the thread of vCPU {index}")]
    Spawn {
        index: u8,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot signal vCPU {index}")]
    Kick {
        index: u8,
        #[source]
        source: vmm_sys_util::errno::Error,
    },
    #[error("vCPU {index} did not acknowledge {event:?} within {ACK_TIMEOUT:?}")]
    NoAck { index: u8, event: VcpuEvent },
    #[error("vCPU {index} thread is gone")]
    ThreadGone { index: u8 },
    #[error("vCPU {index} answered {got} to {event:?}")]
    UnexpectedReply {
        index: u8,
        event: VcpuEvent,
        got: &'static str,
    },
    #[error("vCPU {index} is running: pause it before saving its state")]
    NotPaused { index: u8 },
    #[error(transparent)]
    State(#[from] VcpuStateError),
    #[error("vCPU {index}")]
    Seccomp {
        index: u8,
        #[source]
        source: crate::seccomp::SeccompError,
    },
}

/// Commands to a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuEvent {
    Pause,
    Resume,
    /// Read the complete vCPU state (only while paused); answered with a [`VcpuReply::Saved`].
    Save,
    /// Leave the thread for good.
    Exit,
}

/// What a vCPU thread answers to an event.
#[derive(Debug)]
pub enum VcpuReply {
    /// The state the thread is in after the event.
    State(VcpuState),
    /// The answer to [`VcpuEvent::Save`].
    Saved(Box<Result<VcpuArchState, VcpuStateError>>),
}

/// States of a vCPU thread, reported back after each event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuState {
    Running,
    Paused,
    /// The vCPU stopped running guest code for good (guest reset, error).
    Exited,
}

/// What the run loop does after an exit was handled.
#[derive(Debug, PartialEq, Eq)]
pub enum ExitAction {
    Continue,
    Stop(VmExit),
}

thread_local! {
    // The kvm_run mapping of the vCPU owned by this thread, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: c_int, _: *mut libc::siginfo_t, _: *mut c_void) {
    KVM_RUN.with(|cell| {
        let run = cell.get();
        if !run.is_null() {
            // SAFETY: `run` is this thread's kvm_run mapping, set by the vCPU thread before its
            // first KVM_RUN and cleared before the VcpuFd (and thus the mapping) is dropped.
            // A volatile byte store is async-signal-safe.
            unsafe { std::ptr::write_volatile(&raw mut (*run).immediate_exit, 1) };
        }
    });
}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> c_int {
    SIGRTMIN()
}

/// Installs the process-wide kick handler (once).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result =
            register_signal_handler(kick_signal(), handle_kick).map_err(VcpuError::SignalHandler);
    });
    result
}

/// Handles one `KVM_RUN` exit: port and MMIO accesses go to the buses (unclaimed reads see
/// all ones, unclaimed writes are dropped, as on a PC with nothing at that address).
pub fn handle_exit(exit: VcpuExit<'_>, index: u8, pio: &Bus, mmio: &Bus) -> ExitAction {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !pio.read(u64::from(port), data) {
                data.fill(0xff);
            }
            ExitAction::Continue
        }
        VcpuExit::IoOut(port, data) => {
            pio.write(u64::from(port), data);
            ExitAction::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            if !mmio.read(addr, data) {
                log::debug!("vCPU {index}: unclaimed MMIO read at {addr:#x}");
                data.fill(0xff);
            }
            ExitAction::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !mmio.write(addr, data) {
                log::debug!("vCPU {index}: unclaimed MMIO write at {addr:#x}");
            }
            ExitAction::Continue
        }
        VcpuExit::Intr | VcpuExit::IoapicEoi(_) => ExitAction::Continue,
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => ExitAction::Stop(VmExit::GuestReset),
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _) => {
            ExitAction::Stop(VmExit::GuestPowerOff)
        }
        VcpuExit::Shutdown => ExitAction::Stop(VmExit::VcpuError {
            index,
            message: "triple fault (KVM_EXIT_SHUTDOWN)".into(),
        }),
        VcpuExit::Hlt => ExitAction::Stop(VmExit::VcpuError {
            index,
            message: "halted with no way to wake up (KVM_EXIT_HLT)".into(),
        }),
        VcpuExit::FailEntry(reason, cpu) => ExitAction::Stop(VmExit::VcpuError {
            index,
            message: format!("KVM entry failed: hardware reason {reason:#x} on host CPU {cpu}"),
        }),
        VcpuExit::InternalError => ExitAction::Stop(VmExit::VcpuError {
            index,
            message: "KVM internal error".into(),
        }),
        other => ExitAction::Stop(VmExit::VcpuError {
            index,
            message: format!("unexpected KVM exit {other:?}"),
        }),
    }
}

/// A vCPU before its thread starts.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<ExitNotifier>,
    /// The MSRs to save (KVM's list), shared by all vCPUs.
    msr_list: Arc<Vec<u32>>,
    /// The CPUID table this vCPU was configured with (saved in snapshots).
    cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
}

impl Vcpu {
    pub fn new(
        vm: &Vm,
        index: u8,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        exit: Arc<ExitNotifier>,
        msr_list: Arc<Vec<u32>>,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Create { index, source })?;
        Ok(Self {
            index,
            fd,
            pio,
            mmio,
            exit,
            msr_list,
            cpuid: Vec::new(),
        })
    }

    /// Loads a saved state into this (new, not yet started) vCPU.
    pub fn restore_state(&mut self, state: &VcpuArchState) -> Result<(), VcpuError> {
        vcpu_state::restore(&self.fd, state)?;
        self.cpuid = state.cpuid.clone();
        Ok(())
    }

    pub fn index(&self) -> u8 {
        self.index
    }

    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Whether KVM applied `wanted` (leaves 1 and 7, the feature flags). Some hosts do not:
    /// PVM replaces the table with its own view of the host CPU.
    pub fn cpuid_applied(&self, wanted: &CpuId) -> Result<bool, VcpuError> {
        let index = self.index;
        let effective = self
            .fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| VcpuError::Configure {
                index,
                step: "read back CPUID",
                source,
            })?;
        let features = |c: &CpuId| {
            c.as_slice()
                .iter()
                .filter(|e| (e.function == 1 || e.function == 7) && e.index == 0)
                // KVM rewrites some bits at run time (APIC ID, OSXSAVE, APIC, OSPKE): skip them.
                .map(|e| match e.function {
                    1 => (1, 0, e.ecx & !(1 << 27), e.edx & !(1 << 9)),
                    _ => (7, e.ebx, e.ecx & !(1 << 4), e.edx),
                })
                .collect::<Vec<_>>()
        };
        Ok(features(&effective) == features(wanted))
    }

    /// Sets CPUID, MSRs, registers, FPU and LAPIC for entering `kernel`.
    pub fn configure(&mut self, cpuid: &CpuId, kernel: &KernelEntry) -> Result<(), VcpuError> {
        let index = self.index;
        let step = |step| {
            move |source| VcpuError::Configure {
                index,
                step,
                source,
            }
        };
        self.fd.set_cpuid2(cpuid).map_err(step("set CPUID"))?;
        self.cpuid = cpuid.as_slice().to_vec();

        let entries = regs::boot_msrs();
        let msrs = Msrs::from_entries(&entries).map_err(VcpuError::MsrList)?;
        let set = self.fd.set_msrs(&msrs).map_err(step("set MSRs"))?;
        if set != entries.len() {
            return Err(VcpuError::Msrs {
                index,
                set,
                wanted: entries.len(),
            });
        }

        self.fd
            .set_regs(&regs::boot_regs(kernel.protocol, kernel.entry.0))
            .map_err(step("set registers"))?;
        let sregs = self.fd.get_sregs().map_err(step("get special registers"))?;
        self.fd
            .set_sregs(&regs::boot_sregs(kernel.protocol, sregs))
            .map_err(step("set special registers"))?;
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(step("set FPU"))?;

        let mut lapic = self.fd.get_lapic().map_err(step("get LAPIC"))?;
        regs::setup_lapic_lint(&mut lapic.regs);
        self.fd.set_lapic(&lapic).map_err(step("set LAPIC"))?;
        Ok(())
    }

    /// Starts the vCPU thread in the `Paused` state.
    pub fn start(self) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler()?;
        let index = self.index;
        let (event_tx, event_rx) = channel();
        let (reply_tx, reply_rx) = channel();
        let (filtered_tx, filtered_rx) = channel();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                // The filter goes on before the thread can be told to run the guest.
                let filtered = crate::seccomp::apply(crate::seccomp::ThreadKind::Vcpu);
                let ok = filtered.is_ok();
                let _ = filtered_tx.send(filtered);
                if ok {
                    self.run(event_rx, reply_tx);
                }
            })
            .map_err(|source| VcpuError::Spawn { index, source })?;
        match filtered_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(source)) => {
                let _ = thread.join();
                return Err(VcpuError::Seccomp { index, source });
            }
            Err(_) => {
                let _ = thread.join();
                return Err(VcpuError::ThreadGone { index });
            }
        }
        Ok(VcpuHandle {
            index,
            events: event_tx,
            replies: reply_rx,
            thread: Some(thread),
        })
    }

    /// The thread body: a state machine driven by `events`, reporting to `states`.
    fn run(mut self, events: Receiver<VcpuEvent>, replies: Sender<VcpuReply>) {
        KVM_RUN.with(|cell| cell.set(self.fd.get_kvm_run() as *mut kvm_run));
        let mut state = VcpuState::Paused;
        loop {
            let next = match state {
                VcpuState::Running => self.run_once(&events),
                VcpuState::Paused | VcpuState::Exited => match events.recv() {
                    Ok(VcpuEvent::Save) => {
                        // Stopped at an instruction boundary: the state is complete.
                        let saved =
                            vcpu_state::save(&self.fd, self.index, &self.msr_list, &self.cpuid);
                        if replies.send(VcpuReply::Saved(Box::new(saved))).is_err() {
                            break;
                        }
                        continue;
                    }
                    Ok(event) => Some(transition(state, event)),
                    Err(_) => None,
                },
            };
            match next {
                Some(Step::Ack(new)) => {
                    state = new;
                    if replies.send(VcpuReply::State(new)).is_err() {
                        break;
                    }
                }
                Some(Step::Quiet(new)) => state = new,
                Some(Step::Terminate) => {
                    let _ = replies.send(VcpuReply::State(VcpuState::Exited));
                    break;
                }
                None => break,
            }
        }
        KVM_RUN.with(|cell| cell.set(std::ptr::null_mut()));
    }

    /// One KVM_RUN and its exit. Returns the next step, or None to leave the thread.
    fn run_once(&mut self, events: &Receiver<VcpuEvent>) -> Option<Step> {
        match self.fd.run() {
            Ok(exit) => {
                let internal = matches!(exit, VcpuExit::InternalError);
                match handle_exit(exit, self.index, &self.pio, &self.mmio) {
                    // A device may have ended the VM (the i8042 reset line): stop here
                    // rather than run the guest on until the VMM tears it down.
                    ExitAction::Continue if self.exit.is_requested() => {
                        Some(Step::Quiet(VcpuState::Exited))
                    }
                    ExitAction::Continue => Some(Step::Quiet(VcpuState::Running)),
                    ExitAction::Stop(mut reason) => {
                        if internal {
                            reason = self.describe_internal_error();
                        }
                        if let VmExit::VcpuError { message, .. } = &reason {
                            log::error!("vCPU {}: {message}", self.index);
                        }
                        self.exit.notify(reason);
                        Some(Step::Quiet(VcpuState::Exited))
                    }
                }
            }
            Err(e) if e.errno() == libc::EINTR => {
                // Kicked: clear the flag first, then look for the event that came with the kick
                // (it was queued before the signal was sent, so it is visible now).
                self.fd.set_kvm_immediate_exit(0);
                match events.try_recv() {
                    Ok(event) => Some(transition(VcpuState::Running, event)),
                    Err(TryRecvError::Empty) => Some(Step::Quiet(VcpuState::Running)),
                    Err(TryRecvError::Disconnected) => None,
                }
            }
            Err(e) if e.errno() == libc::EAGAIN => Some(Step::Quiet(VcpuState::Running)),
            Err(e) => {
                let message = format!("KVM_RUN failed: {e}");
                log::error!("vCPU {}: {message}", self.index);
                self.exit.notify(VmExit::VcpuError {
                    index: self.index,
                    message,
                });
                Some(Step::Quiet(VcpuState::Exited))
            }
        }
    }

    fn describe_internal_error(&mut self) -> VmExit {
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the active
        // member of the kvm_run union.
        let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
        let mut message = format!("KVM internal error (suberror {suberror}) at rip {rip:#x}");
        if super::kvm::is_pvm_host() {
            message.push_str(
                "; on a PVM host this usually means the guest kernel ran an instruction the \
                 host emulator lacks (see docs/pvm.md)",
            );
        }
        VmExit::VcpuError {
            index: self.index,
            message,
        }
    }
}

enum Step {
    /// Change state and report it to the handle.
    Ack(VcpuState),
    /// Change state silently (exits and kicks without events).
    Quiet(VcpuState),
    /// Leave the thread.
    Terminate,
}

/// The state machine's transitions on events.
fn transition(state: VcpuState, event: VcpuEvent) -> Step {
    match (state, event) {
        (_, VcpuEvent::Exit) => Step::Terminate,
        // Saving is answered in the paused loop; a running vCPU reports that it runs.
        (s, VcpuEvent::Save) => Step::Ack(s),
        (VcpuState::Exited, _) => Step::Ack(VcpuState::Exited),
        (_, VcpuEvent::Pause) => Step::Ack(VcpuState::Paused),
        (_, VcpuEvent::Resume) => Step::Ack(VcpuState::Running),
    }
}

/// The controlling side of a vCPU thread.
pub struct VcpuHandle {
    index: u8,
    events: Sender<VcpuEvent>,
    replies: Receiver<VcpuReply>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Queues `event` and kicks the thread out of KVM_RUN.
    pub fn send(&self, event: VcpuEvent) -> Result<(), VcpuError> {
        let index = self.index;
        self.events
            .send(event)
            .map_err(|_| VcpuError::ThreadGone { index })?;
        if let Some(thread) = &self.thread {
            thread
                .kill(kick_signal())
                .map_err(|source| VcpuError::Kick { index, source })?;
        }
        Ok(())
    }

    fn wait_reply(&self, event: VcpuEvent) -> Result<VcpuReply, VcpuError> {
        let index = self.index;
        match self.replies.recv_timeout(ACK_TIMEOUT) {
            Ok(reply) => Ok(reply),
            Err(RecvTimeoutError::Timeout) => Err(VcpuError::NoAck { index, event }),
            Err(RecvTimeoutError::Disconnected) => Err(VcpuError::ThreadGone { index }),
        }
    }

    /// Waits for the state the thread reports after an event.
    pub fn wait_state(&self, event: VcpuEvent) -> Result<VcpuState, VcpuError> {
        match self.wait_reply(event)? {
            VcpuReply::State(state) => Ok(state),
            VcpuReply::Saved(_) => Err(VcpuError::UnexpectedReply {
                index: self.index,
                event,
                got: "a saved state",
            }),
        }
    }

    /// Reads the complete state of this (paused) vCPU on its thread.
    pub fn save_state(&self) -> Result<VcpuArchState, VcpuError> {
        self.send(VcpuEvent::Save)?;
        match self.wait_reply(VcpuEvent::Save)? {
            VcpuReply::Saved(result) => Ok((*result)?),
            VcpuReply::State(_) => Err(VcpuError::NotPaused { index: self.index }),
        }
    }

    /// Asks the thread to exit and joins it.
    pub fn exit_and_join(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.events.send(VcpuEvent::Exit);
            // The kick fails only if the thread already ended.
            let _ = thread.kill(kick_signal());
            if thread.join().is_err() {
                log::error!("vCPU {} thread panicked", self.index);
            }
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.exit_and_join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::BusDevice;
    use std::sync::Mutex;

    struct Fixed(u8);
    impl BusDevice for Fixed {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(self.0);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn port_and_mmio_exits_go_through_the_buses() {
        let mut pio = Bus::new();
        pio.insert(Arc::new(Mutex::new(Fixed(0x11))), 0x3f8, 8)
            .unwrap();
        let mut mmio = Bus::new();
        mmio.insert(Arc::new(Mutex::new(Fixed(0x22))), 0xd000_0000, 0x1000)
            .unwrap();

        let mut data = [0u8; 1];
        assert_eq!(
            handle_exit(VcpuExit::IoIn(0x3f9, &mut data), 0, &pio, &mmio),
            ExitAction::Continue
        );
        assert_eq!(data, [0x11]);
        handle_exit(VcpuExit::IoIn(0x80, &mut data), 0, &pio, &mmio);
        assert_eq!(data, [0xff], "unclaimed port reads as all ones");
        let mut data4 = [0u8; 4];
        handle_exit(VcpuExit::MmioRead(0xd000_0004, &mut data4), 0, &pio, &mmio);
        assert_eq!(data4, [0x22; 4]);
        handle_exit(VcpuExit::MmioWrite(0xd000_0000, &[0x33]), 0, &pio, &mmio);
        handle_exit(VcpuExit::MmioRead(0xd000_0000, &mut data), 0, &pio, &mmio);
        assert_eq!(data, [0x33]);
        assert_eq!(
            handle_exit(VcpuExit::MmioWrite(0xe000_0000, &[1]), 0, &pio, &mmio),
            ExitAction::Continue
        );
    }

    #[test]
    fn stopping_exits() {
        let (pio, mmio) = (Bus::new(), Bus::new());
        assert!(matches!(
            handle_exit(VcpuExit::Shutdown, 1, &pio, &mmio),
            ExitAction::Stop(VmExit::VcpuError { index: 1, .. })
        ));
        assert_eq!(
            handle_exit(
                VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, &[]),
                0,
                &pio,
                &mmio
            ),
            ExitAction::Stop(VmExit::GuestReset)
        );
    }

    #[test]
    fn state_machine_transitions() {
        use VcpuEvent::*;
        use VcpuState::*;
        let to = |s, e| match transition(s, e) {
            Step::Ack(x) | Step::Quiet(x) => x,
            Step::Terminate => Exited,
        };
        assert_eq!(to(Paused, Resume), Running);
        assert_eq!(to(Running, Pause), Paused);
        assert_eq!(to(Running, Exit), Exited);
        assert_eq!(to(Exited, Resume), Exited);
        assert_eq!(to(Paused, Pause), Paused);
    }
}
