//! A running VM: its vCPU threads, event loop and devices, with pause, resume and stop.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::devices::legacy::BootTimer;
use crate::devices::virtio::block::Block;
use crate::event_loop::EventLoop;
use crate::exit::{ExitNotifier, VmExit};
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::vcpu::{VcpuError, VcpuEvent, VcpuHandle, VcpuState};
use crate::vstate::vm::Vm;

/// Errors controlling a running VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("vCPU {index} reported {got:?} instead of {wanted:?}")]
    UnexpectedState {
        index: u8,
        wanted: VcpuState,
        got: VcpuState,
    },
}

/// A VM whose vCPU threads and event loop are running.
pub struct Vmm {
    vcpus: Vec<VcpuHandle>,
    event_loop: EventLoop,
    exit: Arc<ExitNotifier>,
    boot_timer: Arc<BootTimer>,
    blocks: Vec<Arc<Mutex<Block>>>,
    // Dropped last: the VM owns the memory slots the vCPUs run on.
    vm: Vm,
}

impl Vmm {
    pub(crate) fn new(
        vcpus: Vec<VcpuHandle>,
        event_loop: EventLoop,
        exit: Arc<ExitNotifier>,
        boot_timer: Arc<BootTimer>,
        blocks: Vec<Arc<Mutex<Block>>>,
        vm: Vm,
    ) -> Self {
        Self {
            vcpus,
            event_loop,
            exit,
            boot_timer,
            blocks,
            vm,
        }
    }

    /// Sends `event` to every vCPU, then waits until each reports `wanted` (or has exited).
    fn broadcast(&self, event: VcpuEvent, wanted: VcpuState) -> Result<(), VmmError> {
        for vcpu in &self.vcpus {
            vcpu.send(event)?;
        }
        for vcpu in &self.vcpus {
            let got = vcpu.wait_state(event)?;
            if got != wanted && got != VcpuState::Exited {
                return Err(VmmError::UnexpectedState {
                    index: vcpu.index(),
                    wanted,
                    got,
                });
            }
        }
        Ok(())
    }

    /// Stops every vCPU at an instruction boundary; returns when all have stopped.
    pub fn pause(&self) -> Result<(), VmmError> {
        self.broadcast(VcpuEvent::Pause, VcpuState::Paused)
    }

    /// Lets every vCPU run again.
    pub fn resume(&self) -> Result<(), VmmError> {
        self.broadcast(VcpuEvent::Resume, VcpuState::Running)
    }

    /// Asks the VM to stop; [`wait`](Self::wait) then returns [`VmExit::Stopped`].
    pub fn stop(&self) {
        self.exit.notify(VmExit::Stopped);
    }

    /// A handle other threads can use to stop the VM or wait for its exit.
    pub fn exit_notifier(&self) -> Arc<ExitNotifier> {
        self.exit.clone()
    }

    /// Time from VMM start to the guest's boot-complete signal, once it came.
    pub fn boot_time(&self) -> Option<Duration> {
        self.boot_timer.boot_time()
    }

    /// Guest memory, for inspection (tests, digests).
    pub fn memory(&self) -> &GuestMemoryMmap {
        self.vm.memory()
    }

    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// Blocks until the VM exits (guest reset, error, or [`stop`](Self::stop)), then tears
    /// it down: vCPU threads joined, event loop stopped, disks flushed.
    pub fn wait(mut self) -> VmExit {
        let reason = self.exit.wait();
        self.shutdown();
        reason
    }

    fn shutdown(&mut self) {
        for vcpu in &mut self.vcpus {
            vcpu.exit_and_join();
        }
        self.event_loop.stop();
        for block in &self.blocks {
            let block = block.lock().unwrap_or_else(PoisonError::into_inner);
            if let Err(e) = block.flush() {
                log::error!("cannot flush a disk at exit: {e}");
            }
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.shutdown();
    }
}
