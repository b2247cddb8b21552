use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::persist_tests::round_trip;
use crate::snapshot::Persist;
use crate::vstate::memory::create_anonymous;

fn evt() -> EventFd {
    EventFd::new(libc::EFD_NONBLOCK).unwrap()
}

fn in_memory(mem: &GuestMemoryMmap) -> [u8; VMGENID_LEN] {
    mem.read_obj(GuestAddress(layout::VMGENID_ADDR)).unwrap()
}

fn raised(irq: &EventFd) -> bool {
    irq.read().is_ok()
}

#[test]
fn boot_writes_a_random_id_at_the_advertised_address() {
    let mem = create_anonymous(2 << 20).unwrap();
    let a = VmGenId::new(mem.clone(), evt()).unwrap();
    assert_eq!(a.addr(), layout::VMGENID_ADDR);
    assert_eq!(in_memory(&mem), a.id());
    assert_ne!(a.id(), [0; VMGENID_LEN]);
    assert_eq!(a.id_hex().len(), 2 * VMGENID_LEN);
    assert_eq!(&a.id_hex()[..2], &format!("{:02x}", a.id()[0]));
    assert!(!a.change_pending());
    let b = VmGenId::new(mem.clone(), evt()).unwrap();
    assert_ne!(a.id(), b.id(), "every boot gets its own ID");
}

#[test]
fn a_restore_changes_the_id_once_on_its_first_resume() {
    let mem = create_anonymous(2 << 20).unwrap();
    let source = VmGenId::new(mem.clone(), evt()).unwrap();
    let saved = source.save();
    let irq = evt();
    let irq_probe = irq.try_clone().unwrap();
    let clone = VmGenId::restore(
        VmGenIdRestoreArgs {
            mem: mem.clone(),
            irq,
        },
        &saved,
    )
    .unwrap();
    // Paused restore: memory and the reported ID are the snapshot's.
    assert_eq!(clone.id(), saved.id);
    assert_eq!(in_memory(&mem), saved.id);
    assert!(clone.change_pending());
    assert!(!raised(&irq_probe));

    assert!(clone.apply_pending_change().unwrap());
    assert_ne!(clone.id(), saved.id, "a new ID");
    assert_eq!(
        in_memory(&mem),
        clone.id(),
        "written where the guest reads it"
    );
    assert!(raised(&irq_probe), "the GED interrupt was raised");

    let id = clone.id();
    assert!(!clone.apply_pending_change().unwrap(), "once per restore");
    assert_eq!(clone.id(), id);
    assert!(!raised(&irq_probe));
}

#[test]
fn round_trips_and_each_restore_gets_its_own_id() {
    let mem = create_anonymous(2 << 20).unwrap();
    let source = VmGenId::new(mem.clone(), evt()).unwrap();
    let args = || VmGenIdRestoreArgs {
        mem: mem.clone(),
        irq: evt(),
    };
    let a = round_trip(&source, args());
    let b = round_trip(&source, args());
    a.apply_pending_change().unwrap();
    b.apply_pending_change().unwrap();
    assert_ne!(a.id(), b.id());
    assert_ne!(a.id(), source.id());
}

#[test]
fn a_snapshot_without_an_id_gets_one_on_resume() {
    let mem = create_anonymous(2 << 20).unwrap();
    let old = [7u8; VMGENID_LEN];
    mem.write_obj(old, GuestAddress(layout::VMGENID_ADDR))
        .unwrap();
    let dev = VmGenId::restore_missing(VmGenIdRestoreArgs {
        mem: mem.clone(),
        irq: evt(),
    })
    .unwrap();
    assert_eq!(dev.id(), old, "what guest memory holds");
    assert!(dev.apply_pending_change().unwrap());
    assert_ne!(in_memory(&mem), old);
}

#[test]
fn refuses_addresses_outside_guest_memory_or_unaligned() {
    let mem = create_anonymous(2 << 20).unwrap();
    for addr in [
        layout::VMGENID_ADDR + 4,
        (2 << 20) - 8,
        2 << 20,
        u64::MAX - 7,
    ] {
        let state = VmGenIdState {
            id: [1; VMGENID_LEN],
            addr,
        };
        let args = VmGenIdRestoreArgs {
            mem: mem.clone(),
            irq: evt(),
        };
        assert!(
            matches!(
                VmGenId::restore(args, &state),
                Err(VmGenIdError::BadAddress { addr: a }) if a == addr
            ),
            "{addr:#x}"
        );
    }
}
