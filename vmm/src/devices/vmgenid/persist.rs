//! Saving and restoring the VM generation ID.
//!
//! The state is the ID the guest holds and where. A restore takes it as the ID in guest
//! memory and marks a change pending: the first resume gives the guest a new one (see
//! [`VmGenId::apply_pending_change`]). A snapshot older than the VMGenID device has none;
//! [`VmGenId::restore_missing`] then reads what guest memory holds at the usual address and
//! marks a change pending too, so such a clone also runs with a fresh ID.

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::{VmGenId, VmGenIdError, VMGENID_LEN};
use crate::boot::layout;
use crate::snapshot::Persist;
use crate::vstate::memory::GuestMemoryMmap;

/// The saved generation ID.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmGenIdState {
    /// The ID in guest memory at the snapshot.
    pub id: [u8; VMGENID_LEN],
    /// Its guest-physical address (the guest's ACPI tables point there).
    pub addr: u64,
}

/// What restoring needs: the restored guest memory and the irqfd of the GED interrupt.
pub struct VmGenIdRestoreArgs {
    pub mem: GuestMemoryMmap,
    pub irq: EventFd,
}

impl Persist for VmGenId {
    type State = VmGenIdState;
    type RestoreArgs = VmGenIdRestoreArgs;
    type Error = VmGenIdError;

    fn save(&self) -> VmGenIdState {
        VmGenIdState {
            id: self.id(),
            addr: self.addr(),
        }
    }

    fn restore(args: VmGenIdRestoreArgs, state: &VmGenIdState) -> Result<Self, VmGenIdError> {
        VmGenId::with_id(args.mem, GuestAddress(state.addr), args.irq, state.id, true)
    }
}

impl VmGenId {
    /// For a snapshot saved without a generation ID: the device at the usual address with
    /// what guest memory holds there as its ID, and a change pending.
    pub fn restore_missing(args: VmGenIdRestoreArgs) -> Result<Self, VmGenIdError> {
        let addr = GuestAddress(layout::VMGENID_ADDR);
        let dev = VmGenId::with_id(args.mem, addr, args.irq, [0; VMGENID_LEN], true)?;
        let mut id = [0u8; VMGENID_LEN];
        // In range: `with_id` checked it.
        dev.mem
            .read_slice(&mut id, addr)
            .map_err(|_| VmGenIdError::BadAddress { addr: addr.0 })?;
        dev.generation().id = id;
        Ok(dev)
    }
}
