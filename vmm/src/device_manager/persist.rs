//! Saving every device of a VM and rebuilding them from a snapshot.
//!
//! [`save_devices`] works from the [`Devices`] a running VMM keeps; [`DeviceManager::restore`]
//! returns a [`DeviceManager`] whose [`into_devices`](DeviceManager::into_devices) is used
//! exactly as at boot. Every virtio device comes back at the MMIO window and IRQ the guest's
//! drivers know it by, wired the same way as at boot (irqfd, one ioeventfd per queue), and a
//! device that was running resumes its queues where it stopped.
//!
//! The state comes from a file: placement is checked against the boot layout (the windows
//! and IRQs the boot path hands out, no two devices sharing either) before anything is
//! created, and each device checks its own state.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use super::{
    virtio_slot, DeviceError, DeviceManager, DeviceWiring, Devices, VirtioDeviceHandle,
    MAX_VIRTIO_DEVICES,
};
use crate::boot::layout;
use crate::builder::ConsoleIo;
use crate::devices::legacy::boot_timer::BootCompletePort;
use crate::devices::legacy::{
    BootCompletePortState, BootTimer, I8042State, SerialDevice, SerialDeviceState,
    SerialRestoreArgs, SerialRestoreError, I8042,
};
use crate::devices::virtio::block::{Block, BlockRestoreArgs, BlockRestoreError, BlockState};
use crate::devices::virtio::mmio::{
    MmioRestoreError, MmioTransport, MmioTransportRestoreArgs, MmioTransportState,
};
use crate::devices::virtio::net::{Net, NetRestoreError, NetState};
use crate::devices::virtio::rng::{Rng, RngRestoreError, RngState};
use crate::devices::virtio::vsock::{Vsock, VsockRestoreArgs, VsockRestoreError, VsockState};
use crate::devices::vmgenid::{VmGenId, VmGenIdError, VmGenIdRestoreArgs, VmGenIdState};
use crate::exit::ExitNotifier;
use crate::snapshot::Persist;

/// The saved devices of a VM. A legacy device is `None` only if the VM had none.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DevicesState {
    pub serial: Option<SerialDeviceState>,
    pub i8042: Option<I8042State>,
    pub boot_port: Option<BootCompletePortState>,
    /// The virtio devices in attachment order; the block devices among them in disk order.
    pub virtio: Vec<VirtioDeviceState>,
    /// The VM generation ID; absent in snapshots older than it (they restore with a new one).
    #[serde(default)]
    pub vmgenid: Option<VmGenIdState>,
}

/// One saved virtio device: what it is, its transport, and where the guest finds it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VirtioDeviceState {
    pub kind: VirtioKindState,
    pub transport: MmioTransportState,
    pub mmio_base: u64,
    pub irq: u32,
}

/// The device-type-specific part of a saved virtio device. Append-only: snapshots name
/// their variants.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum VirtioKindState {
    Block(BlockState),
    Rng(RngState),
    Vsock(VsockState),
    Net(NetState),
}

/// Why saved devices cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum DevicesRestoreError {
    #[error(
        "virtio device {index}: IRQ {irq} is outside {first}..={last}",
        first = layout::VIRTIO_IRQ_BASE,
        last = layout::IRQ_MAX
    )]
    Irq { index: usize, irq: u32 },
    #[error("virtio device {index}: MMIO base {base:#x} is not one of the virtio-MMIO windows")]
    MmioBase { index: usize, base: u64 },
    #[error("virtio device {index}: IRQ {irq} is already used by another device")]
    DuplicateIrq { index: usize, irq: u32 },
    #[error("virtio device {index}: MMIO base {base:#x} is already used by another device")]
    DuplicateMmioBase { index: usize, base: u64 },
    #[error("disk override for disk {index}, but the snapshot has {disks} disks")]
    OverrideIndex { index: usize, disks: usize },
    #[error("two disk overrides for disk {index}")]
    DuplicateOverride { index: usize },
    #[error("cannot restore the serial console")]
    Serial(#[source] SerialRestoreError),
    #[error("cannot restore disk {index}")]
    Block {
        index: usize,
        #[source]
        source: BlockRestoreError,
    },
    #[error("cannot restore the entropy device")]
    Rng(#[source] RngRestoreError),
    #[error("cannot restore the vsock device")]
    Vsock(#[source] VsockRestoreError),
    #[error("a vsock socket override was given, but the snapshot has no vsock device")]
    NoVsock,
    #[error("cannot restore network device {id}")]
    Net {
        id: String,
        #[source]
        source: NetRestoreError,
    },
    #[error("--net-override {0}: the snapshot has no network device with that id")]
    UnknownNet(String),
    #[error("cannot restore the virtio-MMIO transport at {base:#x}")]
    Transport {
        base: u64,
        #[source]
        source: MmioRestoreError,
    },
    #[error("cannot restore the VM generation ID")]
    VmGenId(#[source] VmGenIdError),
}

/// Saves every device. Call with the vCPUs paused; devices are locked one at a time (a
/// transport before its device, the order the vCPU path uses).
pub fn save_devices(devices: &Devices) -> DevicesState {
    let virtio = devices
        .virtio
        .iter()
        .map(|slot| {
            let kind = match &slot.device {
                VirtioDeviceHandle::Block(b) => VirtioKindState::Block(lock(b).save()),
                VirtioDeviceHandle::Rng(r) => VirtioKindState::Rng(lock(r).save()),
                VirtioDeviceHandle::Vsock(v) => VirtioKindState::Vsock(lock(v).save()),
                VirtioDeviceHandle::Net(n) => VirtioKindState::Net(lock(n).save()),
            };
            VirtioDeviceState {
                kind,
                transport: lock(&slot.transport).save(),
                mmio_base: slot.mmio_base,
                irq: slot.irq,
            }
        })
        .collect();
    DevicesState {
        serial: devices.serial.as_ref().map(|s| lock(s).save()),
        i8042: devices.i8042.as_ref().map(|d| lock(d).save()),
        boot_port: devices.boot_port.as_ref().map(|d| lock(d).save()),
        virtio,
        vmgenid: devices.vmgenid.as_ref().map(|g| g.save()),
    }
}

/// Makes every write the guest completed durable on every disk; tries all disks and returns
/// the first error. The VMM calls it before a snapshot and at exit.
pub fn flush_disks(devices: &Devices) -> io::Result<()> {
    let mut result = Ok(());
    for block in &devices.blocks {
        let block = lock(block);
        if let Err(e) = block.flush() {
            log::error!("cannot flush disk {}: {e}", block.path().display());
            if result.is_ok() {
                result = Err(e);
            }
        }
    }
    result
}

/// Branches every writable qcow2 disk (see [`crate::disk::branch`]): each active layer
/// becomes a frozen layer and the VM continues on a new empty overlay. Call with the VM
/// paused and the disks flushed. Stops at the first failure; disks branched before it stay
/// branched (their data is the same either way).
pub fn branch_disks(devices: &Devices) -> Result<Vec<PathBuf>, crate::disk::DiskError> {
    let mut frozen_layers = Vec::new();
    for block in &devices.blocks {
        let mut block = lock(block);
        let image = block.image();
        if image.read_only() || image.format() != crate::disk::DiskFormat::Qcow2 {
            continue;
        }
        frozen_layers.push(block.branch()?.path);
    }
    Ok(frozen_layers)
}

/// Prepares each writable qcow2 disk's next branch (an overlay created and synced now, so
/// the next snapshot's pause only renames it). Failures are logged: the next branch then
/// makes its overlay itself.
pub fn prepare_disk_spares(devices: &Devices) {
    for block in &devices.blocks {
        // The device is locked only to plan and to install: the guest's I/O on the disk
        // goes on while the file is created and synced.
        let Some(plan) = lock(block).image().spare_plan() else {
            continue;
        };
        match plan.create() {
            Ok(()) => lock(block).install_spare(plan),
            Err(e) => log::warn!(
                "cannot prepare the next branch of {}: {e}",
                lock(block).path().display()
            ),
        }
    }
}

/// Injects again every interrupt a device has pending (a virtio InterruptStatus the driver
/// has not acknowledged, a UART interrupt not yet identified). Call after a restore, once the
/// interrupt controllers' state is restored and before the vCPUs run: an interrupt raised
/// just before the snapshot may be missing from the saved controller state, and a driver
/// that never hears of a completion waits forever, while a spurious interrupt is harmless.
pub fn reassert_interrupts(devices: &Devices) -> io::Result<()> {
    if let Some(serial) = &devices.serial {
        lock(serial).reassert_interrupt()?;
    }
    for slot in &devices.virtio {
        lock(&slot.transport).reassert_interrupt()?;
    }
    Ok(())
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Checks placement and disk overrides before any device is created.
fn validate(
    state: &DevicesState,
    disk_overrides: &[(usize, PathBuf)],
    vsock_override: Option<&Path>,
) -> Result<(), DevicesRestoreError> {
    let windows: Vec<(u64, u32)> = (0..MAX_VIRTIO_DEVICES).filter_map(virtio_slot).collect();
    let mut irqs = HashSet::new();
    let mut bases = HashSet::new();
    for (index, dev) in state.virtio.iter().enumerate() {
        if !(layout::VIRTIO_IRQ_BASE..=layout::IRQ_MAX).contains(&dev.irq) {
            return Err(DevicesRestoreError::Irq {
                index,
                irq: dev.irq,
            });
        }
        if !windows.iter().any(|&(base, _)| base == dev.mmio_base) {
            return Err(DevicesRestoreError::MmioBase {
                index,
                base: dev.mmio_base,
            });
        }
        if !irqs.insert(dev.irq) {
            return Err(DevicesRestoreError::DuplicateIrq {
                index,
                irq: dev.irq,
            });
        }
        if !bases.insert(dev.mmio_base) {
            return Err(DevicesRestoreError::DuplicateMmioBase {
                index,
                base: dev.mmio_base,
            });
        }
    }
    let disks = state
        .virtio
        .iter()
        .filter(|d| matches!(d.kind, VirtioKindState::Block(_)))
        .count();
    let mut seen = HashSet::new();
    for &(index, _) in disk_overrides {
        if index >= disks {
            return Err(DevicesRestoreError::OverrideIndex { index, disks });
        }
        if !seen.insert(index) {
            return Err(DevicesRestoreError::DuplicateOverride { index });
        }
    }
    let has_vsock = state
        .virtio
        .iter()
        .any(|d| matches!(d.kind, VirtioKindState::Vsock(_)));
    if vsock_override.is_some() && !has_vsock {
        return Err(DevicesRestoreError::NoVsock);
    }
    Ok(())
}

impl DeviceManager {
    /// Rebuilds the devices saved in `state` on a new VM whose guest memory is already
    /// restored: each at its saved port, MMIO window and IRQ, wired like at boot. Running
    /// virtio devices are re-activated; the event loop registers their queues and serves
    /// pending requests as soon as it starts, so start it only once the vCPU and interrupt
    /// controller state is restored. `disk_overrides` maps a disk index (order of the block
    /// devices in `state`) to the image to open instead of the saved path; `vsock_override`
    /// is where the vsock device listens instead of its saved socket path.
    pub fn restore(
        vm: &dyn DeviceWiring,
        state: &DevicesState,
        console: ConsoleIo,
        exit: Arc<ExitNotifier>,
        boot_timer: Arc<BootTimer>,
        disk_overrides: &[(usize, PathBuf)],
        vsock_override: Option<&Path>,
    ) -> Result<DeviceManager, DeviceError> {
        validate(state, disk_overrides, vsock_override)?;
        let mut dm = DeviceManager::new();
        if let Some(serial) = &state.serial {
            let ConsoleIo { output, input } = console;
            dm.place_serial(vm, input, |irq_evt, rx_space| {
                let args = SerialRestoreArgs {
                    irq_evt,
                    out: output,
                    rx_space,
                };
                SerialDevice::restore(args, serial)
                    .map_err(|e| DevicesRestoreError::Serial(e).into())
            })?;
        }
        if let Some(i8042) = &state.i8042 {
            let Ok(dev) = I8042::restore(exit, i8042);
            dm.place_i8042(dev)?;
        }
        if let Some(port) = &state.boot_port {
            let Ok(dev) = BootCompletePort::restore(boot_timer, port);
            dm.place_boot_port(dev)?;
        }
        let mut disk_index = 0;
        for saved in &state.virtio {
            let device = match &saved.kind {
                VirtioKindState::Block(block) => {
                    let index = disk_index;
                    disk_index += 1;
                    let path_override = disk_overrides
                        .iter()
                        .find(|(i, _)| *i == index)
                        .map(|(_, path)| path.clone());
                    let block = Block::restore(BlockRestoreArgs { path_override }, block)
                        .map_err(|source| DevicesRestoreError::Block { index, source })?;
                    VirtioDeviceHandle::Block(Arc::new(Mutex::new(block)))
                }
                VirtioKindState::Rng(rng) => {
                    let rng = Rng::restore((), rng).map_err(DevicesRestoreError::Rng)?;
                    VirtioDeviceHandle::Rng(Arc::new(Mutex::new(rng)))
                }
                VirtioKindState::Vsock(vsock) => {
                    let args = VsockRestoreArgs {
                        uds_path_override: vsock_override.map(Path::to_path_buf),
                    };
                    let vsock = Vsock::restore(args, vsock).map_err(DevicesRestoreError::Vsock)?;
                    VirtioDeviceHandle::Vsock(Arc::new(Mutex::new(vsock)))
                }
                VirtioKindState::Net(net) => {
                    let net = Net::restore((), net).map_err(|source| DevicesRestoreError::Net {
                        id: net.id.clone(),
                        source,
                    })?;
                    VirtioDeviceHandle::Net(Arc::new(Mutex::new(net)))
                }
            };
            let args = MmioTransportRestoreArgs {
                mem: vm.memory().clone(),
                device: device.as_virtio(),
            };
            let transport = MmioTransport::restore(args, &saved.transport).map_err(|source| {
                DevicesRestoreError::Transport {
                    base: saved.mmio_base,
                    source,
                }
            })?;
            dm.place_virtio(vm, device, transport, saved.mmio_base, saved.irq)?;
        }
        // Restored with the saved ID (guest memory is untouched until the first resume,
        // which gives the guest a new one); a snapshot without one gets one then too.
        dm.place_vmgenid(vm, |mem, irq| {
            let args = VmGenIdRestoreArgs { mem, irq };
            match &state.vmgenid {
                Some(saved) => VmGenId::restore(args, saved),
                None => VmGenId::restore_missing(args),
            }
            .map_err(|e| DevicesRestoreError::VmGenId(e).into())
        })?;
        Ok(dm)
    }
}

/// Applies `--net-override ID=TAP`: the network device `ID` attaches to `TAP` instead of the
/// TAP it saved. Call on the state before [`DeviceManager::restore`]; the TAP name is checked
/// there, like a saved one.
pub fn apply_net_overrides(
    state: &mut DevicesState,
    overrides: &[(String, String)],
) -> Result<(), DevicesRestoreError> {
    for (id, tap) in overrides {
        let net = state
            .virtio
            .iter_mut()
            .find_map(|d| match &mut d.kind {
                VirtioKindState::Net(net) if net.id == *id => Some(net),
                _ => None,
            })
            .ok_or_else(|| DevicesRestoreError::UnknownNet(id.clone()))?;
        net.tap = tap.clone();
    }
    Ok(())
}

#[cfg(test)]
#[path = "persist_tests.rs"]
mod tests;
