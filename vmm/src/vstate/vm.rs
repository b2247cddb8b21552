//! The KVM VM: memory slots, in-kernel interrupt controllers and PIT.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::kvm::KvmContext;
use super::memory::GuestMemoryMmap;
use crate::boot::layout;

/// Errors creating or configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot create the KVM VM")]
    Create(#[source] kvm_ioctls::Error),
    #[error("cannot set the TSS address")]
    Tss(#[source] kvm_ioctls::Error),
    #[error("cannot create the in-kernel interrupt controller")]
    Irqchip(#[source] kvm_ioctls::Error),
    #[error("cannot create the in-kernel PIT")]
    Pit(#[source] kvm_ioctls::Error),
    #[error("cannot register guest memory slot {slot} with KVM")]
    MemorySlot {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot register irqfd for GSI {gsi}")]
    Irqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot register ioeventfd at {addr:#x}")]
    Ioeventfd {
        addr: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// A KVM VM with its guest memory registered.
pub struct Vm {
    fd: VmFd,
    // Kept so the memory the slots point at lives as long as the VM.
    memory: GuestMemoryMmap,
}

impl Vm {
    /// Creates the VM, registers `memory`, and creates the IRQ chip and PIT.
    pub fn new(kvm: &KvmContext, memory: &GuestMemoryMmap) -> Result<Self, VmError> {
        let fd = kvm.kvm().create_vm().map_err(VmError::Create)?;
        let vm = Self {
            fd,
            memory: memory.clone(),
        };
        vm.register_memory()?;
        // The TSS address must be set before the irqchip is created (Intel requirement).
        vm.fd
            .set_tss_address(layout::KVM_TSS_ADDRESS as usize)
            .map_err(VmError::Tss)?;
        vm.fd.create_irq_chip().map_err(VmError::Irqchip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.fd.create_pit2(pit).map_err(VmError::Pit)?;
        Ok(vm)
    }

    fn register_memory(&self) -> Result<(), VmError> {
        for (slot, region) in self.memory.iter().enumerate() {
            let slot = slot as u32;
            let mem_region = kvm_userspace_memory_region {
                slot,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mapping of exactly `memory_size` bytes owned by
            // `self.memory`, which the VM keeps until it is dropped, so KVM never sees a
            // dangling host address.
            unsafe { self.fd.set_user_memory_region(mem_region) }
                .map_err(|source| VmError::MemorySlot { slot, source })?;
        }
        Ok(())
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Injects GSI `gsi` whenever `evt` is written.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| VmError::Irqfd { gsi, source })
    }

    /// Signals `evt` (without a userspace exit) when the guest writes `datamatch` to the
    /// 32-bit MMIO register at `addr`.
    pub fn register_mmio_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(|source| VmError::Ioeventfd { addr, source })
    }
}
