//! Builds and starts a VM from a [`VmConfig`]. Reads as the recipe it is: every step that
//! can fail on bad input runs before the first vCPU does.

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use linux_loader::cmdline::Cmdline;

use crate::boot::{self, layout, BootError, KernelEntry};
use crate::config::{host_memory_mib, ConfigError, VmConfig};
use crate::device_manager::{DeviceError, DeviceManager, Devices};
use crate::devices::legacy::serial::ReadFd;
use crate::devices::legacy::BootTimer;
use crate::devices::virtio::block::BlockConfig;
use crate::event_loop::{EventLoop, EventLoopError};
use crate::exit::ExitNotifier;
use crate::runtime::{Vmm, VmmError};
use crate::vstate::cpuid::{self, CpuidError};
use crate::vstate::kvm::{is_pvm_host, KvmContext, KvmError};
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::vcpu::{Vcpu, VcpuError, VcpuHandle};
use crate::vstate::vm::{Vm, VmError};

/// Command-line options added on PVM hosts (see docs/pvm.md). `noxsave` and `clearcpuid=`
/// keep the guest kernel off instructions the host's emulator lacks (`xrstor`, `popcnt`,
/// `clac/stac`, `cmpxchg16b`) and off slow byte-wise string copies (ERMS/FSRM): PVM does not
/// apply the VMM's CPUID table, so masking CPUID alone is not enough there. The rest only
/// save boot time under emulation. (The 6.1 parser reads 127 characters of `clearcpuid=`.)
pub const PVM_CMDLINE_EXTRAS: &str =
    "noxsave clearcpuid=cx16,popcnt,smap,erms,fsrm rodata=off noreplace-smp percpu_alloc=page";

/// Where the guest console goes and comes from.
pub struct ConsoleIo {
    pub output: Box<dyn Write + Send>,
    pub input: Option<Box<dyn ReadFd>>,
}

/// Errors building a VM; all of them happen before any vCPU runs.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error(transparent)]
    Cpuid(#[from] CpuidError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot start the vCPUs")]
    Start(#[source] VmmError),
}

/// Builds the VM described by `config` and starts it. `start` is when the VMM started, for
/// the boot-time measurement.
pub fn build_and_start(
    config: &VmConfig,
    console: ConsoleIo,
    start: Instant,
) -> Result<Vmm, BuildError> {
    config.validate(host_memory_mib())?;
    let kvm = KvmContext::open()?;
    kvm.check_vcpu_count(usize::from(config.vcpus))?;
    let pvm = is_pvm_host();
    if pvm {
        log::info!(
            "PVM host detected (/sys/module/kvm_pvm): applying the PVM baseline (masking XSAVE, \
             POPCNT, SMAP, CX16, ERMS, FSRM) and adding \"{PVM_CMDLINE_EXTRAS}\" to the \
             command line"
        );
    }

    let memory = memory::create_anonymous(config.memory_mib << 20)?;
    let vm = Vm::new(&kvm, &memory)?;
    let kernel = boot::load_kernel(&memory, &config.kernel)?;
    log::debug!(
        "kernel entry {:#x} via {:?}",
        kernel.entry.0,
        kernel.protocol
    );
    let initrd = match &config.initrd {
        Some(path) => Some(boot::load_initrd(&memory, path, kernel.kernel_end)?),
        None => None,
    };

    let exit = Arc::new(ExitNotifier::new().map_err(BuildError::EventFd)?);
    let boot_timer = BootTimer::new(start);
    let devices = setup_devices(config, &vm, console, exit.clone(), boot_timer.clone())?;

    let cmdline = build_cmdline(config, &devices, pvm)?;
    log::debug!("kernel command line: {cmdline:?}");
    boot::configure_system(&memory, &kernel, &cmdline, initrd, config.vcpus)?;

    let devices = devices.into_devices();
    let vcpus = setup_vcpus(config, &kvm, &vm, &kernel, &devices, &exit, pvm)?;
    let event_loop = EventLoop::start(devices.subscribers)?;
    let handles = vcpus
        .into_iter()
        .map(Vcpu::start)
        .collect::<Result<Vec<VcpuHandle>, _>>()?;
    let vmm = Vmm::new(handles, event_loop, exit, boot_timer, devices.blocks, vm);
    vmm.resume().map_err(BuildError::Start)?;
    Ok(vmm)
}

fn setup_devices(
    config: &VmConfig,
    vm: &Vm,
    console: ConsoleIo,
    exit: Arc<ExitNotifier>,
    boot_timer: Arc<BootTimer>,
) -> Result<DeviceManager, BuildError> {
    let mut devices = DeviceManager::new();
    devices.attach_serial(vm, console.output, console.input)?;
    devices.attach_i8042(exit)?;
    devices.attach_boot_timer(boot_timer)?;
    for (i, disk) in config.all_disks().enumerate() {
        devices.attach_block(
            vm,
            BlockConfig {
                path: disk.path.clone(),
                read_only: disk.read_only,
                id: disk.id.clone().unwrap_or_else(|| format!("disk{i}")),
            },
        )?;
    }
    if config.rng {
        devices.attach_rng(vm)?;
    }
    Ok(devices)
}

/// Base command line (the config's or the default), PVM extras, the root device, and one
/// `virtio_mmio.device=` per device.
fn build_cmdline(
    config: &VmConfig,
    devices: &DeviceManager,
    pvm: bool,
) -> Result<Cmdline, BuildError> {
    let err = |e: linux_loader::cmdline::Error| BuildError::Cmdline(e.to_string());
    let mut cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(err)?;
    let base = config
        .cmdline
        .as_deref()
        .unwrap_or(crate::config::DEFAULT_CMDLINE);
    if !base.trim().is_empty() {
        cmdline.insert_str(base.trim()).map_err(err)?;
    }
    if pvm {
        cmdline.insert_str(PVM_CMDLINE_EXTRAS).map_err(err)?;
    }
    if let Some(root) = &config.rootfs {
        if !base.split_whitespace().any(|w| w.starts_with("root=")) {
            let mode = if root.read_only { "ro" } else { "rw" };
            cmdline
                .insert_str(format!("root=/dev/vda {mode}"))
                .map_err(err)?;
        }
    }
    for arg in devices.cmdline_args() {
        cmdline.insert_str(arg).map_err(err)?;
    }
    Ok(cmdline)
}

fn setup_vcpus(
    config: &VmConfig,
    kvm: &KvmContext,
    vm: &Vm,
    kernel: &KernelEntry,
    devices: &Devices,
    exit: &Arc<ExitNotifier>,
    pvm: bool,
) -> Result<Vec<Vcpu>, BuildError> {
    let supported = kvm.supported_cpuid()?;
    let pio = Arc::new(devices.pio.clone());
    let mmio = Arc::new(devices.mmio.clone());
    (0..config.vcpus)
        .map(|index| {
            let vcpu = Vcpu::new(vm, index, pio.clone(), mmio.clone(), exit.clone())?;
            let cpuid = cpuid::build(&supported, config.cpu_template, index, config.vcpus, pvm)?;
            vcpu.configure(&cpuid, kernel)?;
            if index == 0 && !vcpu.cpuid_applied(&cpuid)? {
                log::info!(
                    "this host's KVM does not apply the guest CPUID table (the guest sees the \
                     host's features); the CPU template is not in effect"
                );
            }
            Ok(vcpu)
        })
        .collect()
}
