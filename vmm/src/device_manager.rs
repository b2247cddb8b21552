//! Puts devices on the buses, wires their interrupts and queue notifications into KVM, and
//! collects what the guest must be told about them (command-line device descriptions) and
//! what the event loop must watch.

use std::io::Write;
use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::layout;
use crate::devices::bus::{Bus, BusError};
use crate::devices::legacy::boot_timer::BootCompletePort;
use crate::devices::legacy::serial::ReadFd;
use crate::devices::legacy::{BootTimer, ConsoleInput, SerialDevice, I8042};
use crate::devices::virtio::block::{Block, BlockConfig, BlockError};
use crate::devices::virtio::mmio::{MmioError, MmioTransport, MMIO_WINDOW, QUEUE_NOTIFY_OFFSET};
use crate::devices::virtio::rng::{Rng, RngError};
use crate::devices::virtio::VirtioDevice;
use crate::exit::ExitNotifier;
use crate::vstate::vm::{Vm, VmError};

/// A subscriber of the VMM's event loop.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

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
    #[error("cannot create the virtio-MMIO transport")]
    Mmio(#[from] MmioError),
    #[error("too many virtio devices: IRQs {first}..={last} are all taken", first = layout::VIRTIO_IRQ_BASE, last = layout::IRQ_MAX)]
    OutOfIrqs,
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
}

/// What the running VMM keeps of the device manager.
pub struct Devices {
    pub pio: Bus,
    pub mmio: Bus,
    pub subscribers: Vec<Subscriber>,
    pub blocks: Vec<Arc<Mutex<Block>>>,
}

fn eventfd() -> Result<EventFd, DeviceError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)
}

impl DeviceManager {
    pub fn new() -> Self {
        Self::default()
    }

    /// The 8250 UART at 0x3f8 (IRQ 4) writing guest output to `output`; `input`, when given,
    /// is fed to the guest from the event loop.
    pub fn attach_serial(
        &mut self,
        vm: &Vm,
        output: Box<dyn Write + Send>,
        input: Option<Box<dyn ReadFd>>,
    ) -> Result<(), DeviceError> {
        let irq = eventfd()?;
        vm.register_irqfd(&irq, layout::SERIAL_IRQ)?;
        let rx_space = Arc::new(eventfd()?);
        let serial = Arc::new(Mutex::new(SerialDevice::new(irq, output, rx_space.clone())));
        self.pio
            .insert(serial.clone(), u64::from(layout::SERIAL_PORT), 8)?;
        if let Some(input) = input {
            let console = ConsoleInput::new(serial, input, rx_space);
            self.subscribers.push(Arc::new(Mutex::new(console)));
        }
        Ok(())
    }

    /// The i8042 reset line at 0x60-0x64.
    pub fn attach_i8042(&mut self, exit: Arc<ExitNotifier>) -> Result<(), DeviceError> {
        let dev = Arc::new(Mutex::new(I8042::new(exit)));
        self.pio.insert(dev, u64::from(layout::I8042_PORT), 5)?;
        Ok(())
    }

    /// The boot-complete port at 0x3f0.
    pub fn attach_boot_timer(&mut self, timer: Arc<BootTimer>) -> Result<(), DeviceError> {
        let dev = Arc::new(Mutex::new(BootCompletePort(timer)));
        self.pio
            .insert(dev, u64::from(layout::BOOT_COMPLETE_PORT), 1)?;
        Ok(())
    }

    /// A virtio-blk device over a raw file.
    pub fn attach_block(&mut self, vm: &Vm, config: BlockConfig) -> Result<(), DeviceError> {
        let block = Arc::new(Mutex::new(Block::new(config)?));
        self.attach_virtio(vm, block.clone())?;
        self.blocks.push(block);
        Ok(())
    }

    /// A virtio-rng device.
    pub fn attach_rng(&mut self, vm: &Vm) -> Result<(), DeviceError> {
        let rng = Arc::new(Mutex::new(Rng::new()?));
        self.attach_virtio(vm, rng)
    }

    /// Places a virtio device behind its own MMIO transport: next free window and IRQ, an
    /// irqfd for the IRQ, one ioeventfd per queue on QueueNotify, a command-line description.
    pub fn attach_virtio<D>(&mut self, vm: &Vm, device: Arc<Mutex<D>>) -> Result<(), DeviceError>
    where
        D: VirtioDevice + MutEventSubscriber + 'static,
    {
        let irq = layout::VIRTIO_IRQ_BASE + self.virtio_count as u32;
        if irq > layout::IRQ_MAX {
            return Err(DeviceError::OutOfIrqs);
        }
        let base = layout::VIRTIO_MMIO_BASE + self.virtio_count * layout::MMIO_DEVICE_SIZE;
        let transport = MmioTransport::new(vm.memory().clone(), device.clone())?;
        vm.register_irqfd(transport.interrupt().eventfd(), irq)?;
        {
            let dev = device
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (queue, evt) in dev.queue_events().iter().enumerate() {
                vm.register_mmio_ioevent(evt, base + QUEUE_NOTIFY_OFFSET, queue as u32)?;
            }
        }
        self.mmio
            .insert(Arc::new(Mutex::new(transport)), base, MMIO_WINDOW)?;
        self.subscribers.push(device);
        self.cmdline_args
            .push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
        self.virtio_count += 1;
        Ok(())
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
        }
    }
}
