//! The VM generation ID (Microsoft's "Virtual Machine Generation ID", as Linux's `vmgenid`
//! driver reads it): 16 random bytes at [`layout::VMGENID_ADDR`] that change whenever the VM
//! may have been duplicated, so the guest kernel reseeds its random number generator.
//!
//! A booted VM gets a fresh ID at once. A restored VM keeps the saved ID in memory while it is
//! paused (so a paused restore is byte-identical to its snapshot) and gets a new one on its
//! first resume, before any vCPU runs again: [`VmGenId::apply_pending_change`] writes the new
//! ID and raises the GED interrupt, whose `_EVT` method notifies the guest's VMGenID device
//! (`boot::acpi` declares both). docs/acpi.md describes the flow.

mod persist;

use std::fs::File;
use std::io::{self, Read};
use std::sync::{Mutex, PoisonError};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::layout;
use crate::vstate::memory::GuestMemoryMmap;

pub use persist::{VmGenIdRestoreArgs, VmGenIdState};

/// Size of the generation ID in bytes.
pub const VMGENID_LEN: usize = 16;
const ENTROPY_PATH: &str = "/dev/urandom";

/// Errors making, writing or announcing a generation ID.
#[derive(Debug, thiserror::Error)]
pub enum VmGenIdError {
    #[error("cannot read a new VM generation ID from {ENTROPY_PATH}")]
    Random(#[source] io::Error),
    #[error("cannot write the VM generation ID into guest memory at {addr:#x}")]
    Write {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("cannot raise the generation-change interrupt")]
    Interrupt(#[source] io::Error),
    #[error("VM generation ID address {addr:#x} is not 8-byte aligned inside guest memory")]
    BadAddress { addr: u64 },
}

struct Generation {
    id: [u8; VMGENID_LEN],
    /// Set by a restore: the guest must get a new ID before it runs again.
    change_pending: bool,
}

/// The generation ID of one VM: where the guest reads it, and the interrupt that tells the
/// guest it changed.
pub struct VmGenId {
    mem: GuestMemoryMmap,
    addr: GuestAddress,
    /// irqfd of [`layout::GED_IRQ`].
    irq: EventFd,
    generation: Mutex<Generation>,
}

fn random_id() -> Result<[u8; VMGENID_LEN], VmGenIdError> {
    let mut id = [0u8; VMGENID_LEN];
    File::open(ENTROPY_PATH)
        .and_then(|mut f| f.read_exact(&mut id))
        .map_err(VmGenIdError::Random)?;
    Ok(id)
}

impl VmGenId {
    /// A fresh random ID at [`layout::VMGENID_ADDR`], written into guest memory now (boot).
    /// `irq` must be the irqfd of [`layout::GED_IRQ`].
    pub fn new(mem: GuestMemoryMmap, irq: EventFd) -> Result<Self, VmGenIdError> {
        let dev = Self::with_id(
            mem,
            GuestAddress(layout::VMGENID_ADDR),
            irq,
            random_id()?,
            false,
        )?;
        dev.write(&dev.generation().id)?;
        Ok(dev)
    }

    fn with_id(
        mem: GuestMemoryMmap,
        addr: GuestAddress,
        irq: EventFd,
        id: [u8; VMGENID_LEN],
        change_pending: bool,
    ) -> Result<Self, VmGenIdError> {
        let fits = addr.0.is_multiple_of(8)
            && addr
                .0
                .checked_add(VMGENID_LEN as u64 - 1)
                .is_some_and(|last| {
                    mem.address_in_range(addr) && mem.address_in_range(GuestAddress(last))
                });
        if !fits {
            return Err(VmGenIdError::BadAddress { addr: addr.0 });
        }
        Ok(Self {
            mem,
            addr,
            irq,
            generation: Mutex::new(Generation { id, change_pending }),
        })
    }

    fn generation(&self) -> std::sync::MutexGuard<'_, Generation> {
        self.generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self, id: &[u8; VMGENID_LEN]) -> Result<(), VmGenIdError> {
        self.mem
            .write_slice(id, self.addr)
            .map_err(|source| VmGenIdError::Write {
                addr: self.addr.0,
                source,
            })
    }

    /// The ID the guest reads now.
    pub fn id(&self) -> [u8; VMGENID_LEN] {
        self.generation().id
    }

    /// The ID as lower-case hex, byte by byte in guest-memory order.
    pub fn id_hex(&self) -> String {
        self.id().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Guest-physical address of the ID.
    pub fn addr(&self) -> u64 {
        self.addr.0
    }

    /// Whether the guest is still to get a new ID (restored, not yet resumed).
    pub fn change_pending(&self) -> bool {
        self.generation().change_pending
    }

    /// If this VM was restored and has not run since: writes a new random ID into guest
    /// memory and raises the GED interrupt (the guest takes it as soon as a vCPU runs).
    /// Returns whether it changed the ID. Call before the vCPUs resume; on error the guest
    /// keeps the old ID and the change stays pending, so the caller must not let it run.
    pub fn apply_pending_change(&self) -> Result<bool, VmGenIdError> {
        let mut generation = self.generation();
        if !generation.change_pending {
            return Ok(false);
        }
        let id = random_id()?;
        self.write(&id)?;
        self.irq.write(1).map_err(VmGenIdError::Interrupt)?;
        generation.id = id;
        generation.change_pending = false;
        Ok(true)
    }
}

#[cfg(test)]
mod tests;
