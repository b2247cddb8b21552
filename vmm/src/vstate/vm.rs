//! The KVM VM: memory slots, in-kernel interrupt controllers and PIT.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, VmFd};
use serde::{Deserialize, Serialize};
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
    #[error("cannot read the dirty page log of memory slot {slot}")]
    DirtyLog {
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
    #[error("cannot {step} of the VM")]
    State {
        step: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("saved interrupt controller {0} is not one of PIC master, PIC slave, IOAPIC")]
    BadIrqchip(u32),
    #[error("cannot register ioeventfd at {addr:#x}")]
    Ioeventfd {
        addr: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// The VM-wide state KVM holds: interrupt controllers, PIT, kvmclock.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    /// PIC master, PIC slave and IOAPIC, in that order.
    pub irqchips: Vec<kvm_irqchip>,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    /// Host wall-clock time (ns since the Unix epoch) when the clock was read, to move the
    /// guest clock forward by the time spent in the snapshot.
    pub saved_at_unix_ns: u64,
}

const IRQCHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
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

    /// Whether dirty pages are tracked: the memory was created with dirty bitmaps.
    pub fn tracks_dirty_pages(&self) -> bool {
        self.memory.iter().any(|r| r.bitmap().is_some())
    }

    fn register_memory(&self) -> Result<(), VmError> {
        let flags = if self.tracks_dirty_pages() {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        for (slot, region) in self.memory.iter().enumerate() {
            let slot = slot as u32;
            let mem_region = kvm_userspace_memory_region {
                slot,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags,
            };
            // SAFETY: the region is a live mapping of exactly `memory_size` bytes owned by
            // `self.memory`, which the VM keeps until it is dropped, so KVM never sees a
            // dangling host address.
            unsafe { self.fd.set_user_memory_region(mem_region) }
                .map_err(|source| VmError::MemorySlot { slot, source })?;
        }
        Ok(())
    }

    /// Reads and clears the pages written since the last call (or since the VM started): per
    /// memory slot, in region order, a bitmap with bit `p % 64` of word `p / 64` set when page
    /// `p` of the region was written by the guest (KVM dirty log) or by the VMM (the region's
    /// bitmap). Only for a tracking VM. Safe while the guest runs (a live snapshot's
    /// pre-copy): KVM clears and write-protects atomically and the VMM bitmap is swapped word
    /// by word, so a page written afterwards is in the next call's answer.
    pub fn take_dirty_pages(&self) -> Result<Vec<Vec<u64>>, VmError> {
        let mut out = Vec::new();
        for (slot, region) in self.memory.iter().enumerate() {
            let len = region.len() as usize;
            let mut bits =
                self.fd
                    .get_dirty_log(slot as u32, len)
                    .map_err(|source| VmError::DirtyLog {
                        slot: slot as u32,
                        source,
                    })?;
            if let Some(bitmap) = std::ops::Deref::deref(region).bitmap() {
                for (word, device) in bits.iter_mut().zip(bitmap.get_and_reset()) {
                    *word |= device;
                }
            }
            out.push(bits);
        }
        Ok(out)
    }

    /// Reads the VM-wide state. The vCPUs must be paused.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let step = |step| move |source| VmError::State { step, source };
        let mut irqchips = Vec::with_capacity(IRQCHIPS.len());
        for chip_id in IRQCHIPS {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut chip)
                .map_err(step("read an interrupt controller"))?;
            irqchips.push(chip);
        }
        Ok(VmState {
            irqchips,
            pit: self.fd.get_pit2().map_err(step("read the PIT"))?,
            clock: self.fd.get_clock().map_err(step("read kvmclock"))?,
            saved_at_unix_ns: unix_ns(),
        })
    }

    /// Restores the VM-wide state into this (new) VM. The guest clock moves forward by the
    /// host wall-clock time elapsed since the state was saved, so the restored guest's
    /// clocks are right (its timers that expired meanwhile fire at once).
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        let step = |step| move |source| VmError::State { step, source };
        for chip in &state.irqchips {
            if !IRQCHIPS.contains(&chip.chip_id) {
                return Err(VmError::BadIrqchip(chip.chip_id));
            }
        }
        self.fd.set_pit2(&state.pit).map_err(step("set the PIT"))?;
        let elapsed = unix_ns().saturating_sub(state.saved_at_unix_ns);
        let clock = kvm_clock_data {
            clock: state.clock.clock.saturating_add(elapsed),
            // Only the clock value is set; flags such as KVM_CLOCK_TSC_STABLE are outputs.
            flags: 0,
            ..Default::default()
        };
        self.fd.set_clock(&clock).map_err(step("set kvmclock"))?;
        for chip in &state.irqchips {
            self.fd
                .set_irqchip(chip)
                .map_err(step("set an interrupt controller"))?;
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
