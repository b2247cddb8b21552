//! Saving and restoring a whole device set, against a VM double that records the irqfds and
//! ioeventfds it is asked for (no `/dev/kvm` needed).

use std::sync::Mutex;
use std::time::Instant;

use event_manager::{EventManager, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::device_manager::Subscriber;
use crate::devices::persist_tests::Sink;
use crate::devices::virtio::block::BlockConfig;
use crate::devices::virtio::test_utils::{
    bring_up, desc, guest_mem, temp_path, Driver, TempFile, DATA_BASE,
};
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::{INT_VRING, TYPE_BLOCK};
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::vm::VmError;

/// A VM that only records what it is asked to wire.
struct MockVm {
    mem: GuestMemoryMmap,
    irqfds: Mutex<Vec<u32>>,
    ioevents: Mutex<Vec<(u64, u32)>>,
}

impl MockVm {
    fn new(mem: &GuestMemoryMmap) -> Self {
        Self {
            mem: mem.clone(),
            irqfds: Mutex::new(Vec::new()),
            ioevents: Mutex::new(Vec::new()),
        }
    }
}

impl DeviceWiring for MockVm {
    fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }
    fn register_irqfd(&self, _evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.irqfds.lock().unwrap().push(gsi);
        Ok(())
    }
    fn register_mmio_ioevent(&self, _: &EventFd, addr: u64, datamatch: u32) -> Result<(), VmError> {
        self.ioevents.lock().unwrap().push((addr, datamatch));
        Ok(())
    }
}

const DISK_SECTORS: usize = 16;

fn disk(tag: &str) -> TempFile {
    TempFile::with_contents(tag, &[0u8; DISK_SECTORS * 512])
}

fn console() -> ConsoleIo {
    ConsoleIo {
        output: Box::new(Sink::default()),
        input: None,
    }
}

/// Everything the builder attaches: serial, i8042, boot port, two disks, an rng and the VM
/// generation ID.
fn boot(vm: &MockVm, disks: &[&TempFile]) -> DeviceManager {
    let mut dm = DeviceManager::new();
    dm.attach_serial(vm, Box::new(Sink::default()), None)
        .unwrap();
    dm.attach_i8042(Arc::new(ExitNotifier::new().unwrap()))
        .unwrap();
    dm.attach_boot_timer(BootTimer::new(Instant::now()))
        .unwrap();
    for (i, d) in disks.iter().enumerate() {
        let cfg = BlockConfig::raw(d.0.clone(), false, format!("disk{i}"));
        dm.attach_block(vm, cfg).unwrap();
    }
    dm.attach_rng(vm).unwrap();
    dm.attach_vmgenid(vm).unwrap();
    dm
}

fn restore(
    vm: &MockVm,
    state: &DevicesState,
    overrides: &[(usize, PathBuf)],
) -> Result<DeviceManager, DeviceError> {
    let exit = Arc::new(ExitNotifier::new().unwrap());
    let timer = BootTimer::new(Instant::now());
    DeviceManager::restore(vm, state, console(), exit, timer, overrides, None)
}

/// A saved state of [`boot`]'s devices with the first disk and the rng running (the rng has
/// served one request), as JSON would bring it back. The devices are gone afterwards, so
/// their images are unlocked.
fn saved_state(mem: &GuestMemoryMmap, disks: &[&TempFile]) -> (DevicesState, Vec<String>) {
    let vm = MockVm::new(mem);
    let dm = boot(&vm, disks);
    let cmdline = dm.cmdline_args().to_vec();
    let devices = dm.into_devices();
    // A VM's devices serve requests once it runs: open the pause gate as its resume would.
    devices.gate.set_closed(false);
    let mut em = EventManager::<Subscriber>::new().unwrap();
    for s in &devices.subscribers {
        em.add_subscriber(s.clone());
    }
    let blk = Driver::at(mem, 0, 16);
    let mut rng = Driver::at(mem, 0x4000, 16);
    rng.add_chain(&[desc(DATA_BASE, 16, true)]);
    bring_up(
        &mut *devices.virtio[0].transport.lock().unwrap(),
        &blk,
        true,
    );
    let rng_slot = devices.virtio.last().unwrap();
    bring_up(&mut *rng_slot.transport.lock().unwrap(), &rng, true);
    em.run_with_timeout(100).unwrap();
    assert_eq!(rng.used_idx(), 1);

    flush_disks(&devices).unwrap();
    let state = save_devices(&devices);
    let json = serde_json::to_string(&state).unwrap();
    (serde_json::from_str(&json).unwrap(), cmdline)
}

#[test]
fn every_device_comes_back_at_its_address_and_irq() {
    let mem = guest_mem();
    let (d0, d1) = (disk("dm-0"), disk("dm-1"));
    let (state, cmdline) = saved_state(&mem, &[&d0, &d1]);
    assert!(state.serial.is_some() && state.i8042.is_some() && state.boot_port.is_some());
    let placement: Vec<_> = state.virtio.iter().map(|v| (v.mmio_base, v.irq)).collect();
    assert_eq!(
        placement,
        [(0xd000_0000, 5), (0xd000_1000, 6), (0xd000_2000, 7)]
    );
    assert!(state.virtio[0].transport.active_queues.is_some());
    assert!(state.virtio[1].transport.active_queues.is_none());

    let vm = MockVm::new(&mem);
    let dm = restore(&vm, &state, &[]).unwrap();
    assert_eq!(dm.cmdline_args(), cmdline);
    let devices = dm.into_devices();
    assert_eq!(save_devices(&devices), state);
    assert_eq!(*vm.irqfds.lock().unwrap(), [4, 5, 6, 7, layout::GED_IRQ]);
    let notify: Vec<_> = placement.iter().map(|&(b, _)| (b + 0x50, 0)).collect();
    assert_eq!(*vm.ioevents.lock().unwrap(), notify);
    assert_eq!(devices.blocks.len(), 2);
    assert_eq!(devices.subscribers.len(), 3);
    assert!(devices.blocks[0].lock().unwrap().is_activated());
    // The guest reaches every device through the buses.
    assert!(devices.mmio.resolve(0xd000_2000 + 0x70).is_some());
    assert!(devices.pio.resolve(0x3f8).is_some() && devices.pio.resolve(0x64).is_some());
    assert!(devices.pio.resolve(0x3f0).is_some());

    // The rng's completion interrupt was not acknowledged: it is injected again.
    let rng = &devices.virtio[2].transport;
    assert_eq!(rng.lock().unwrap().interrupt().status(), INT_VRING);
    let _ = rng.lock().unwrap().interrupt().eventfd().read();
    reassert_interrupts(&devices).unwrap();
    assert_eq!(rng.lock().unwrap().interrupt().eventfd().read().unwrap(), 1);
    let blk = devices.virtio[0].transport.lock().unwrap();
    assert!(
        blk.interrupt().eventfd().read().is_err(),
        "nothing pending, nothing injected"
    );
}

#[test]
fn disk_overrides_open_the_clone_s_own_disk() {
    let mem = guest_mem();
    let (d0, d1) = (disk("ov-0"), disk("ov-1"));
    let (state, _) = saved_state(&mem, &[&d0, &d1]);
    let copy = disk("ov-copy");
    let dm = restore(&MockVm::new(&mem), &state, &[(1, copy.0.clone())]).unwrap();
    let devices = dm.into_devices();
    assert_eq!(devices.blocks[0].lock().unwrap().path(), d0.0);
    assert_eq!(devices.blocks[1].lock().unwrap().path(), copy.0);
    drop(devices);

    let small = TempFile::with_contents("ov-small", &[0u8; 512]);
    let e = restore(&MockVm::new(&mem), &state, &[(0, small.0.clone())])
        .err()
        .expect("a disk of another size");
    assert!(
        matches!(
            e,
            DeviceError::Restore(DevicesRestoreError::Block {
                index: 0,
                source: crate::devices::virtio::block::BlockRestoreError::Capacity { .. }
            })
        ),
        "{e:?}"
    );
    for overrides in [
        vec![(2, copy.0.clone())],
        vec![(0, copy.0.clone()), (0, copy.0.clone())],
    ] {
        let e = restore(&MockVm::new(&mem), &state, &overrides)
            .err()
            .expect("bad override");
        assert!(
            matches!(
                e,
                DeviceError::Restore(
                    DevicesRestoreError::OverrideIndex { index: 2, disks: 2 }
                        | DevicesRestoreError::DuplicateOverride { index: 0 }
                )
            ),
            "{e:?}"
        );
    }
}

/// Restores `state` after `corrupt`; returns the error.
fn refused(
    mem: &GuestMemoryMmap,
    state: &DevicesState,
    corrupt: impl FnOnce(&mut DevicesState),
) -> DevicesRestoreError {
    let mut state = state.clone();
    corrupt(&mut state);
    let vm = MockVm::new(mem);
    match restore(&vm, &state, &[]) {
        Ok(_) => panic!("corrupted state accepted"),
        Err(DeviceError::Restore(e)) => {
            // Placement errors are found before anything is wired.
            use DevicesRestoreError as E;
            if matches!(
                e,
                E::Irq { .. }
                    | E::MmioBase { .. }
                    | E::DuplicateIrq { .. }
                    | E::DuplicateMmioBase { .. }
            ) {
                assert!(vm.irqfds.lock().unwrap().is_empty());
            }
            e
        }
        Err(e) => panic!("unexpected error {e:?}"),
    }
}

#[test]
fn corrupted_placement_and_kinds_are_refused() {
    use DevicesRestoreError as E;
    let mem = guest_mem();
    let (d0, d1) = (disk("bad-0"), disk("bad-1"));
    let (state, _) = saved_state(&mem, &[&d0, &d1]);

    for irq in [0, 4, 24, u32::MAX] {
        let e = refused(&mem, &state, |s| s.virtio[1].irq = irq);
        assert!(matches!(e, E::Irq { index: 1, .. }), "{irq}: {e}");
    }
    for base in [
        0,
        0xd000_0800,
        0xd000_0000 + 19 * 0x1000,
        0xcfff_f000,
        u64::MAX,
    ] {
        let e = refused(&mem, &state, |s| s.virtio[2].mmio_base = base);
        assert!(matches!(e, E::MmioBase { index: 2, .. }), "{base:#x}: {e}");
    }
    let e = refused(&mem, &state, |s| s.virtio[2].irq = 5);
    assert!(matches!(e, E::DuplicateIrq { index: 2, irq: 5 }), "{e}");
    let e = refused(&mem, &state, |s| s.virtio[1].mmio_base = 0xd000_0000);
    assert!(matches!(e, E::DuplicateMmioBase { index: 1, .. }), "{e}");

    // An rng saved where a block transport was.
    let e = refused(&mem, &state, |s| {
        s.virtio[0].kind =
            VirtioKindState::Rng(crate::devices::virtio::rng::RngState { acked_features: 0 })
    });
    assert!(
        matches!(
            e,
            E::Transport {
                base: 0xd000_0000,
                ..
            }
        ),
        "{e}"
    );
    // A corrupted queue deep inside one device fails the whole restore.
    let e = refused(&mem, &state, |s| {
        let q = &mut s.virtio[0].transport.active_queues.as_mut().unwrap()[0];
        q.size = 12;
    });
    assert!(matches!(e, E::Transport { .. }), "{e}");
    let e = refused(&mem, &state, |s| {
        if let VirtioKindState::Block(b) = &mut s.virtio[1].kind {
            b.acked_features = u64::MAX;
        }
    });
    assert!(matches!(e, E::Block { index: 1, .. }), "{e}");
    let e = refused(&mem, &state, |s| {
        s.serial.as_mut().unwrap().in_buffer = vec![0; 100];
    });
    assert!(matches!(e, E::Serial(_)), "{e}");
    assert_eq!(state.virtio[0].transport.device_type, TYPE_BLOCK);
}

#[test]
fn unknown_device_kinds_and_fields_do_not_decode() {
    let mem = guest_mem();
    let d0 = disk("kind-0");
    let (state, _) = saved_state(&mem, &[&d0]);
    let good = serde_json::to_value(&state).unwrap();

    let mut json = good.clone();
    let block = json["virtio"][0]["kind"]["Block"].take();
    json["virtio"][0]["kind"] = serde_json::json!({ "Gpu": block });
    let e = serde_json::from_value::<DevicesState>(json).unwrap_err();
    assert!(e.to_string().contains("unknown variant"), "{e}");

    let mut json = good.clone();
    json["virtio"][0]["kind"]["Block"]["cache"] = serde_json::json!("writeback");
    assert!(serde_json::from_value::<DevicesState>(json).is_err());
    let mut json = good;
    json["gpu"] = serde_json::json!(null);
    assert!(serde_json::from_value::<DevicesState>(json).is_err());
}

#[test]
fn a_vm_without_legacy_devices_or_virtio_saves_empty() {
    let vm = MockVm::new(&guest_mem());
    let devices = DeviceManager::new().into_devices();
    let state = save_devices(&devices);
    assert_eq!(
        state,
        DevicesState {
            serial: None,
            i8042: None,
            boot_port: None,
            virtio: Vec::new(),
            vmgenid: None,
        }
    );
    let devices = restore(&vm, &state, &[]).unwrap().into_devices();
    assert!(devices.serial.is_none() && devices.virtio.is_empty());
    flush_disks(&devices).unwrap();
}

#[test]
fn a_vsock_device_comes_back_listening_where_it_is_told() {
    use crate::config::VsockConfig;
    use crate::devices::virtio::vsock::VsockError;

    let mem = guest_mem();
    let dir = temp_path("dm-vsock");
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("v.sock");
    let vm = MockVm::new(&mem);
    let mut dm = DeviceManager::new();
    let config = VsockConfig {
        guest_cid: 42,
        uds_path: sock.clone(),
    };
    dm.attach_vsock(&vm, &config).unwrap();
    assert_eq!(dm.cmdline_args(), ["virtio_mmio.device=4K@0xd0000000:5"]);
    let devices = dm.into_devices();
    let state = save_devices(&devices);
    let VirtioKindState::Vsock(v) = &state.virtio[0].kind else {
        panic!("{:?}", state.virtio[0].kind);
    };
    assert_eq!((v.guest_cid, &v.uds_path), (42, &sock));
    assert_eq!(state.virtio[0].transport.device_type, 19);
    let json = serde_json::to_string(&state).unwrap();
    let state: DevicesState = serde_json::from_str(&json).unwrap();

    // The source still listens: a clone must be told where to listen instead.
    let e = restore(&MockVm::new(&mem), &state, &[])
        .err()
        .expect("in use");
    assert!(
        matches!(
            e,
            DeviceError::Restore(DevicesRestoreError::Vsock(
                crate::devices::virtio::vsock::VsockRestoreError::Create(VsockError::InUse(_))
            ))
        ),
        "{e:?}"
    );
    let clone_sock = dir.join("clone.sock");
    let exit = Arc::new(ExitNotifier::new().unwrap());
    let timer = BootTimer::new(Instant::now());
    let vm2 = MockVm::new(&mem);
    let dm = DeviceManager::restore(
        &vm2,
        &state,
        console(),
        exit,
        timer,
        &[],
        Some(clone_sock.as_path()),
    )
    .unwrap();
    let clone = dm.into_devices();
    let saved = save_devices(&clone);
    let VirtioKindState::Vsock(v) = &saved.virtio[0].kind else {
        panic!("{:?}", saved.virtio[0].kind);
    };
    assert_eq!(v.uds_path, clone_sock);
    assert!(std::os::unix::net::UnixStream::connect(&clone_sock).is_ok());
    drop((clone, devices));

    // An override for a snapshot without vsock is a mistake worth reporting.
    let exit = Arc::new(ExitNotifier::new().unwrap());
    let timer = BootTimer::new(Instant::now());
    let empty = save_devices(&DeviceManager::new().into_devices());
    let e = DeviceManager::restore(
        &MockVm::new(&mem),
        &empty,
        console(),
        exit,
        timer,
        &[],
        Some(clone_sock.as_path()),
    )
    .err()
    .expect("no vsock to override");
    assert!(
        matches!(e, DeviceError::Restore(DevicesRestoreError::NoVsock)),
        "{e:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_vmgenid_is_saved_and_a_restore_changes_it_on_resume() {
    let mem = guest_mem();
    let d0 = disk("genid-0");
    let (state, _) = saved_state(&mem, &[&d0]);
    let saved = state.vmgenid.clone().expect("the generation ID is saved");
    assert_eq!(saved.addr, layout::VMGENID_ADDR);
    let devices = restore(&MockVm::new(&mem), &state, &[])
        .unwrap()
        .into_devices();
    let genid = devices.vmgenid.as_ref().unwrap();
    assert_eq!(genid.id(), saved.id, "unchanged while paused");
    assert!(genid.change_pending());
    assert!(genid.apply_pending_change().unwrap());
    assert_ne!(genid.id(), saved.id);
}

#[test]
fn a_snapshot_from_before_the_vmgenid_restores_with_one() {
    let mem = guest_mem();
    let d0 = disk("genid-old");
    let (state, _) = saved_state(&mem, &[&d0]);
    // The state as a grove-vmm without the VMGenID device wrote it.
    let mut json = serde_json::to_value(&state).unwrap();
    json.as_object_mut().unwrap().remove("vmgenid");
    let old: DevicesState = serde_json::from_value(json).unwrap();
    assert!(old.vmgenid.is_none());
    let vm = MockVm::new(&mem);
    let devices = restore(&vm, &old, &[]).unwrap().into_devices();
    let genid = devices.vmgenid.as_ref().expect("a restore always has one");
    assert_eq!(genid.addr(), layout::VMGENID_ADDR);
    assert!(genid.change_pending(), "it gets a new ID before it runs");
    assert_eq!(vm.irqfds.lock().unwrap().last(), Some(&layout::GED_IRQ));
}
