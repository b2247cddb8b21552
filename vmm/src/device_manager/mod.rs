//! Puts devices on the buses, wires their interrupts and queue notifications into KVM, and
//! collects what the guest must be told about them (command-line device descriptions) and
//! what the event loop must watch.
//!
//! `persist.rs` saves every device of a running VM ([`save_devices`]) and rebuilds them at
//! the same addresses and IRQs ([`DeviceManager::restore`]).

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};

use event_manager::MutEventSubscriber;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::layout;
use crate::devices::bus::{Bus, BusError};
use crate::devices::legacy::boot_timer::BootCompletePort;
use crate::devices::legacy::serial::ReadFd;
use crate::devices::legacy::{BootTimer, ConsoleInput, SerialDevice, I8042};
use crate::devices::virtio::block::{Block, BlockConfig, BlockError};
use crate::devices::virtio::device_state::PauseGate;
use crate::devices::virtio::mmio::{MmioError, MmioTransport, MMIO_WINDOW, QUEUE_NOTIFY_OFFSET};
use crate::devices::virtio::net::{Net, NetDeviceConfig, NetError};
use crate::devices::virtio::rng::{Rng, RngError};
use crate::devices::virtio::vsock::{Vsock, VsockError};
use crate::devices::virtio::VirtioDevice;
use crate::devices::vmgenid::{VmGenId, VmGenIdError};
use crate::exit::ExitNotifier;
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::vm::{Vm, VmError};

mod persist;

pub use persist::apply_net_overrides;
pub use persist::{
    branch_disks, flush_disks, prepare_disk_spares, reassert_interrupts, save_devices,
    DevicesRestoreError, DevicesState, VirtioDeviceState, VirtioKindState,
};

/// A subscriber of the VMM's event loop.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// How many virtio devices fit: one IRQ each from `VIRTIO_IRQ_BASE` to `IRQ_MAX`.
pub const MAX_VIRTIO_DEVICES: u64 = (layout::IRQ_MAX - layout::VIRTIO_IRQ_BASE + 1) as u64;

/// Errors attaching devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot place a device on the bus")]
    Bus(#[from] BusError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error(transparent)]
    Rng(#[from] RngError),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error("cannot create the virtio-MMIO transport")]
    Mmio(#[from] MmioError),
    #[error("too many virtio devices: IRQs {first}..={last} are all taken", first = layout::VIRTIO_IRQ_BASE, last = layout::IRQ_MAX)]
    OutOfIrqs,
    #[error("cannot restore the devices from the snapshot")]
    Restore(#[from] DevicesRestoreError),
    #[error("network device {id}")]
    Net {
        id: String,
        #[source]
        source: NetError,
    },
    #[error("cannot set up the VM generation ID")]
    VmGenId(#[from] VmGenIdError),
}

/// What placing devices needs from the VM: guest memory and KVM's irqfd and ioeventfd
/// registration. A trait so that the device tables (attach, save, restore) are testable
/// without `/dev/kvm`; [`Vm`] is the one real implementation.
pub trait DeviceWiring {
    fn memory(&self) -> &GuestMemoryMmap;
    /// Injects GSI `gsi` whenever `evt` is written.
    fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError>;
    /// Signals `evt` when the guest writes `datamatch` to the 32-bit MMIO register at `addr`.
    fn register_mmio_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), VmError>;
}

impl DeviceWiring for Vm {
    fn memory(&self) -> &GuestMemoryMmap {
        Vm::memory(self)
    }
    fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        Vm::register_irqfd(self, evt, gsi)
    }
    fn register_mmio_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), VmError> {
        Vm::register_mmio_ioevent(self, evt, addr, datamatch)
    }
}

/// A virtio device by type: what a snapshot needs to save it as the right kind.
#[derive(Clone)]
pub enum VirtioDeviceHandle {
    Block(Arc<Mutex<Block>>),
    Rng(Arc<Mutex<Rng>>),
    Vsock(Arc<Mutex<Vsock>>),
    Net(Arc<Mutex<Net>>),
}

/// One attached virtio device: the device, its transport and where the guest finds it.
#[derive(Clone)]
pub struct VirtioSlot {
    pub device: VirtioDeviceHandle,
    pub transport: Arc<Mutex<MmioTransport>>,
    pub mmio_base: u64,
    pub irq: u32,
}

/// The devices of one VM, before the vCPUs start.
#[derive(Default)]
pub struct DeviceManager {
    pio: Bus,
    mmio: Bus,
    subscribers: Vec<Subscriber>,
    cmdline_args: Vec<String>,
    blocks: Vec<Arc<Mutex<Block>>>,
    virtio_count: u64,
    serial: Option<Arc<Mutex<SerialDevice>>>,
    i8042: Option<Arc<Mutex<I8042>>>,
    boot_port: Option<Arc<Mutex<BootCompletePort>>>,
    virtio: Vec<VirtioSlot>,
    /// Closed while the VM is paused; every virtio device joins it.
    gate: PauseGate,
    vmgenid: Option<Arc<VmGenId>>,
}

/// What the running VMM keeps of the device manager. Every device is reachable here by
/// type, so that [`save_devices`] can save each one.
pub struct Devices {
    pub pio: Bus,
    pub mmio: Bus,
    pub subscribers: Vec<Subscriber>,
    /// The block devices in attachment order (disk index order), also in `virtio`.
    pub blocks: Vec<Arc<Mutex<Block>>>,
    pub serial: Option<Arc<Mutex<SerialDevice>>>,
    pub i8042: Option<Arc<Mutex<I8042>>>,
    pub boot_port: Option<Arc<Mutex<BootCompletePort>>>,
    /// The virtio devices in attachment order.
    pub virtio: Vec<VirtioSlot>,
    /// Closed while the VM is paused (see [`PauseGate`]).
    pub gate: PauseGate,
    /// The VM generation ID (ACPI; see `boot::acpi`).
    pub vmgenid: Option<Arc<VmGenId>>,
}

fn eventfd() -> Result<EventFd, DeviceError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)
}

/// The MMIO window and IRQ of the `index`-th virtio device, as handed out at boot.
fn virtio_slot(index: u64) -> Option<(u64, u32)> {
    if index >= MAX_VIRTIO_DEVICES {
        return None;
    }
    let base = layout::VIRTIO_MMIO_BASE + index * layout::MMIO_DEVICE_SIZE;
    Some((base, layout::VIRTIO_IRQ_BASE + index as u32))
}

impl DeviceManager {
    pub fn new() -> Self {
        Self::default()
    }

    /// The 8250 UART at 0x3f8 (IRQ 4) writing guest output to `output`; `input`, when given,
    /// is fed to the guest from the event loop.
    pub fn attach_serial(
        &mut self,
        vm: &dyn DeviceWiring,
        output: Box<dyn Write + Send>,
        input: Option<Box<dyn ReadFd>>,
    ) -> Result<(), DeviceError> {
        self.place_serial(vm, input, |irq, rx_space| {
            Ok(SerialDevice::new(irq, output, rx_space))
        })
    }

    /// Creates the UART with `make(irq_evt, rx_space)` (new or restored) and wires it up.
    fn place_serial<F>(
        &mut self,
        vm: &dyn DeviceWiring,
        input: Option<Box<dyn ReadFd>>,
        make: F,
    ) -> Result<(), DeviceError>
    where
        F: FnOnce(EventFd, Arc<EventFd>) -> Result<SerialDevice, DeviceError>,
    {
        let irq = eventfd()?;
        vm.register_irqfd(&irq, layout::SERIAL_IRQ)?;
        let rx_space = Arc::new(eventfd()?);
        let serial = Arc::new(Mutex::new(make(irq, rx_space.clone())?));
        self.pio
            .insert(serial.clone(), u64::from(layout::SERIAL_PORT), 8)?;
        if let Some(input) = input {
            let console = ConsoleInput::new(serial.clone(), input, rx_space);
            self.subscribers.push(Arc::new(Mutex::new(console)));
        }
        self.serial = Some(serial);
        Ok(())
    }

    /// The i8042 reset line at 0x60-0x64.
    pub fn attach_i8042(&mut self, exit: Arc<ExitNotifier>) -> Result<(), DeviceError> {
        self.place_i8042(I8042::new(exit))
    }

    fn place_i8042(&mut self, dev: I8042) -> Result<(), DeviceError> {
        let dev = Arc::new(Mutex::new(dev));
        self.pio
            .insert(dev.clone(), u64::from(layout::I8042_PORT), 5)?;
        self.i8042 = Some(dev);
        Ok(())
    }

    /// The boot-complete port at 0x3f0.
    pub fn attach_boot_timer(&mut self, timer: Arc<BootTimer>) -> Result<(), DeviceError> {
        self.place_boot_port(BootCompletePort(timer))
    }

    fn place_boot_port(&mut self, dev: BootCompletePort) -> Result<(), DeviceError> {
        let dev = Arc::new(Mutex::new(dev));
        self.pio
            .insert(dev.clone(), u64::from(layout::BOOT_COMPLETE_PORT), 1)?;
        self.boot_port = Some(dev);
        Ok(())
    }

    /// A virtio-blk device over a raw file.
    pub fn attach_block(
        &mut self,
        vm: &dyn DeviceWiring,
        config: BlockConfig,
    ) -> Result<(), DeviceError> {
        let block = Arc::new(Mutex::new(Block::new(config)?));
        self.attach_virtio(vm, VirtioDeviceHandle::Block(block))
    }

    /// A virtio-rng device.
    pub fn attach_rng(&mut self, vm: &dyn DeviceWiring) -> Result<(), DeviceError> {
        let rng = Arc::new(Mutex::new(Rng::new()?));
        self.attach_virtio(vm, VirtioDeviceHandle::Rng(rng))
    }

    /// A virtio-vsock device listening on `config.uds_path`.
    pub fn attach_vsock(
        &mut self,
        vm: &dyn DeviceWiring,
        config: &crate::config::VsockConfig,
    ) -> Result<(), DeviceError> {
        let vsock = Arc::new(Mutex::new(Vsock::new(config)?));
        self.attach_virtio(vm, VirtioDeviceHandle::Vsock(vsock))
    }

    /// A virtio-net device on a TAP in the VMM's network namespace.
    pub fn attach_net(
        &mut self,
        vm: &dyn DeviceWiring,
        config: NetDeviceConfig,
    ) -> Result<(), DeviceError> {
        let id = config.id.clone();
        let net = Net::new(config).map_err(|source| DeviceError::Net { id, source })?;
        self.attach_virtio(vm, VirtioDeviceHandle::Net(Arc::new(Mutex::new(net))))
    }

    /// Places a virtio device behind a new MMIO transport in the next free window and IRQ.
    pub fn attach_virtio(
        &mut self,
        vm: &dyn DeviceWiring,
        device: VirtioDeviceHandle,
    ) -> Result<(), DeviceError> {
        let (base, irq) = virtio_slot(self.virtio_count).ok_or(DeviceError::OutOfIrqs)?;
        let transport = MmioTransport::new(vm.memory().clone(), device.as_virtio())?;
        self.place_virtio(vm, device, transport, base, irq)
    }

    /// Wires a virtio device and its transport at `base` / `irq`: an irqfd for the IRQ, one
    /// ioeventfd per queue on QueueNotify, the bus window, the event-loop subscription and a
    /// command-line description. Shared by boot and restore, so both wire identically.
    fn place_virtio(
        &mut self,
        vm: &dyn DeviceWiring,
        device: VirtioDeviceHandle,
        transport: MmioTransport,
        base: u64,
        irq: u32,
    ) -> Result<(), DeviceError> {
        vm.register_irqfd(transport.interrupt().eventfd(), irq)?;
        {
            let virtio = device.as_virtio();
            let mut dev = virtio.lock().unwrap_or_else(PoisonError::into_inner);
            dev.set_pause_gate(self.gate.clone());
            for (queue, evt) in dev.queue_events().iter().enumerate() {
                vm.register_mmio_ioevent(evt, base + QUEUE_NOTIFY_OFFSET, queue as u32)?;
            }
        }
        let transport = Arc::new(Mutex::new(transport));
        self.mmio.insert(transport.clone(), base, MMIO_WINDOW)?;
        self.subscribers.push(device.as_subscriber());
        if let VirtioDeviceHandle::Block(block) = &device {
            self.blocks.push(block.clone());
        }
        self.cmdline_args
            .push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
        self.virtio_count += 1;
        self.virtio.push(VirtioSlot {
            device,
            transport,
            mmio_base: base,
            irq,
        });
        Ok(())
    }

    /// The virtio devices as the ACPI DSDT describes them, in attachment order.
    pub fn acpi_virtio_devices(&self) -> Vec<crate::boot::acpi::VirtioMmioDevice> {
        self.virtio
            .iter()
            .map(|slot| crate::boot::acpi::VirtioMmioDevice {
                base: slot.mmio_base,
                irq: slot.irq,
            })
            .collect()
    }

    /// Kernel command-line arguments describing the virtio devices, in attachment order.
    pub fn cmdline_args(&self) -> &[String] {
        &self.cmdline_args
    }

    pub fn into_devices(self) -> Devices {
        Devices {
            pio: self.pio,
            mmio: self.mmio,
            subscribers: self.subscribers,
            blocks: self.blocks,
            serial: self.serial,
            i8042: self.i8042,
            boot_port: self.boot_port,
            virtio: self.virtio,
            gate: self.gate,
            vmgenid: self.vmgenid,
        }
    }

    /// The VM generation ID at `layout::VMGENID_ADDR`, a fresh random one written now, with
    /// its change interrupt (the ACPI GED's) on GSI `layout::GED_IRQ`.
    pub fn attach_vmgenid(&mut self, vm: &dyn DeviceWiring) -> Result<(), DeviceError> {
        self.place_vmgenid(vm, |mem, irq| Ok(VmGenId::new(mem, irq)?))
    }

    /// Creates the generation ID with `make(memory, irq_evt)` (new or restored) and wires its
    /// interrupt. Shared by boot and restore.
    fn place_vmgenid<F>(&mut self, vm: &dyn DeviceWiring, make: F) -> Result<(), DeviceError>
    where
        F: FnOnce(GuestMemoryMmap, EventFd) -> Result<VmGenId, DeviceError>,
    {
        let irq = eventfd()?;
        vm.register_irqfd(&irq, layout::GED_IRQ)?;
        self.vmgenid = Some(Arc::new(make(vm.memory().clone(), irq)?));
        Ok(())
    }
}

impl VirtioDeviceHandle {
    /// The device as the transport sees it.
    pub fn as_virtio(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        match self {
            VirtioDeviceHandle::Block(b) => b.clone(),
            VirtioDeviceHandle::Rng(r) => r.clone(),
            VirtioDeviceHandle::Vsock(v) => v.clone(),
            VirtioDeviceHandle::Net(n) => n.clone(),
        }
    }

    /// The device as the event loop sees it.
    pub fn as_subscriber(&self) -> Subscriber {
        match self {
            VirtioDeviceHandle::Block(b) => b.clone(),
            VirtioDeviceHandle::Rng(r) => r.clone(),
            VirtioDeviceHandle::Vsock(v) => v.clone(),
            VirtioDeviceHandle::Net(n) => n.clone(),
        }
    }
}
