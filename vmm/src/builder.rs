//! Builds and starts a VM from a [`VmConfig`]. Reads as the recipe it is: every step that
//! can fail on bad input runs before the first vCPU does.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use linux_loader::cmdline::Cmdline;
use vm_memory::{Bytes, GuestAddress};

use crate::boot::{self, layout, BootError, KernelEntry};
use crate::config::{host_memory_mib, ConfigError, VmConfig};
use crate::control::server::{ControlError, ControlServer};
use crate::control::ControlHandler;
use crate::device_manager::{reassert_interrupts, DeviceError, DeviceManager, Devices, Subscriber};
use crate::devices::legacy::serial::ReadFd;
use crate::devices::legacy::BootTimer;
use crate::devices::virtio::block::BlockConfig;
use crate::event_loop::{EventLoop, EventLoopError};
use crate::exit::ExitNotifier;
use crate::runtime::{Vmm, VmmError, VmmShared};
use crate::seccomp::ThreadKind;
use crate::snapshot::cpu::{CpuCompatError, CpuInfo};
use crate::snapshot::{self, SnapshotError, SnapshotState};
use crate::vstate::cpuid::{self, CpuTemplate, CpuidError};
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
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    CpuCompat(#[from] CpuCompatError),
    #[error("snapshot {path} is invalid: {reason}")]
    BadSnapshot { path: String, reason: String },
    #[error("--disk-override {0}: the snapshot has no disk with that id")]
    UnknownDisk(String),
    #[error("network device {id}: invalid MAC address")]
    Mac {
        id: String,
        #[source]
        source: crate::devices::virtio::net::MacAddrError,
    },
    #[error("cannot pick a random MAC address")]
    RandomMac(#[source] std::io::Error),
}

/// How to run a VM besides its configuration.
#[derive(Debug, Default, Clone)]
pub struct StartOptions {
    /// Serve the control socket at this path.
    pub control: Option<PathBuf>,
}

/// What `grove-vmm restore` takes.
#[derive(Debug, Default, Clone)]
pub struct RestoreOptions {
    pub snapshot: PathBuf,
    pub control: Option<PathBuf>,
    /// (disk id, image) pairs: run on these images instead of the saved paths.
    pub disk_overrides: Vec<(String, PathBuf)>,
    /// Stay paused after the restore (resume through the control socket).
    pub paused: bool,
    /// Refuse the snapshot unless it was taken with this CPU template.
    pub cpu_template: Option<CpuTemplate>,
    /// Listen for vsock connections here instead of the saved socket path (a clone running
    /// beside its source cannot take the source's socket).
    pub vsock_override: Option<PathBuf>,
    /// (network device id, TAP) pairs: attach to these TAPs instead of the saved ones.
    pub net_overrides: Vec<(String, String)>,
}

/// Builds the VM described by `config` and starts it. `start` is when the VMM started, for
/// the boot-time measurement.
pub fn build_and_start(
    config: &VmConfig,
    console: ConsoleIo,
    start: Instant,
) -> Result<Vmm, BuildError> {
    build_and_start_with(config, console, start, &StartOptions::default())
}

/// [`build_and_start`] with options (the control socket).
pub fn build_and_start_with(
    config: &VmConfig,
    console: ConsoleIo,
    start: Instant,
    options: &StartOptions,
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

    let memory =
        memory::create_anonymous_tracked(config.memory_mib << 20, config.track_dirty_pages)?;
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
    let acpi_virtio = devices.acpi_virtio_devices();
    boot::configure_system(
        &memory,
        &kernel,
        &cmdline,
        initrd,
        config.vcpus,
        &acpi_virtio,
    )?;

    let devices = devices.into_devices();
    let supported = kvm.supported_cpuid()?;
    let vcpus = setup_vcpus(config, &kvm, &supported, &vm, &kernel, &devices, &exit, pvm)?;
    let cpu = CpuInfo {
        template: config.cpu_template,
        vendor: snapshot::cpu::vendor(supported.as_slice()),
        pvm,
    };
    let parts = Launch {
        vm,
        devices,
        vcpus,
        exit,
        boot_timer,
        config: config.clone(),
        cpu,
        start,
    };
    launch(parts, options.control.as_deref(), false)
}

/// Everything a built or restored VM needs to start running.
struct Launch {
    vm: Vm,
    devices: Devices,
    vcpus: Vec<Vcpu>,
    exit: Arc<ExitNotifier>,
    boot_timer: Arc<BootTimer>,
    config: VmConfig,
    cpu: CpuInfo,
    start: Instant,
}

/// Binds the control socket, starts the event loop and the vCPU threads (paused), then
/// resumes them unless asked to stay paused.
fn launch(parts: Launch, control: Option<&Path>, paused: bool) -> Result<Vmm, BuildError> {
    let Launch {
        vm,
        mut devices,
        vcpus,
        exit,
        boot_timer,
        config,
        cpu,
        start,
    } = parts;
    let subscribers = std::mem::take(&mut devices.subscribers);
    let shared = Arc::new(VmmShared::new(
        exit, boot_timer, devices, config, cpu, start, vm,
    ));
    let control_server = match control {
        Some(path) => {
            let handler: Arc<dyn ControlHandler> = shared.clone();
            let server: Subscriber = Arc::new(Mutex::new(ControlServer::bind(path, handler)?));
            Some(server)
        }
        None => None,
    };
    // The vCPU threads (parked until the first resume) are handed over before the control
    // socket is served: a request that arrives at once must see every vCPU (a snapshot
    // taken earlier would save none).
    let handles = vcpus
        .into_iter()
        .map(Vcpu::start)
        .collect::<Result<Vec<VcpuHandle>, _>>()?;
    shared.set_vcpus(handles);
    let event_loop = EventLoop::start("event-loop", subscribers, &[ThreadKind::EventLoop])?;
    let mut vmm = Vmm::new(shared, event_loop);
    if !paused {
        vmm.resume().map_err(BuildError::Start)?;
        // Stable format: the restore benchmark parses this line.
        log::info!(
            "vCPUs running: {:.3} ms after VMM start",
            start.elapsed().as_secs_f64() * 1000.0
        );
    }
    // Requests are served only now, so none races the first resume (clients that connected
    // earlier wait in the socket's backlog). Its own thread: a request may take long (a live
    // snapshot copies all of guest memory while the guest runs) and must not hold up device
    // I/O meanwhile.
    if let Some(server) = control_server {
        vmm.serve_control(EventLoop::start(
            "control",
            vec![server],
            &[ThreadKind::Control],
        )?);
    }
    // The first snapshot's disk branch then only renames (after the VM is running, so
    // start and restore latency do not pay for it).
    vmm.shared().prepare_disk_spares_in_background();
    Ok(vmm)
}

/// Restores the snapshot in `options.snapshot` and starts it. Every check (state file,
/// memory file, CPU compatibility, devices and disks) runs before the first vCPU exists.
pub fn restore(
    options: &RestoreOptions,
    console: ConsoleIo,
    start: Instant,
) -> Result<Vmm, BuildError> {
    let dir = &options.snapshot;
    let mut state = snapshot::read_state(dir)?;
    check_state(dir, &state)?;
    crate::device_manager::apply_net_overrides(&mut state.devices, &options.net_overrides)
        .map_err(DeviceError::from)?;
    // A diff snapshot's whole chain is resolved and every memory file verified here.
    let chain = snapshot::resolve_chain(dir, &state.memory)?;
    let disk_overrides = resolve_overrides(&state.config, &options.disk_overrides)?;

    let kvm = KvmContext::open()?;
    kvm.check_vcpu_count(state.vcpus.len())?;
    let supported = kvm.supported_cpuid()?;
    snapshot::cpu::check(
        &state.cpu,
        &state.vcpus[0].cpuid,
        &supported,
        options.cpu_template,
    )?;

    let memory = snapshot::map_chain(&chain, state.config.track_dirty_pages)?;
    let vm = Vm::new(&kvm, &memory)?;
    let exit = Arc::new(ExitNotifier::new().map_err(BuildError::EventFd)?);
    let boot_timer = BootTimer::new(start);
    let devices = DeviceManager::restore(
        &vm,
        &state.devices,
        console,
        exit.clone(),
        boot_timer.clone(),
        &disk_overrides,
        options.vsock_override.as_deref(),
    )?
    .into_devices();

    // Order: vCPUs exist before the VM-wide state (the in-kernel LAPICs belong to them),
    // then the VM state (PIT, kvmclock, PIC/IOAPIC), then each vCPU's own state.
    let msr_list = Arc::new(kvm.msr_index_list()?);
    let pio = Arc::new(devices.pio.clone());
    let mmio = Arc::new(devices.mmio.clone());
    let mut vcpus = (0..state.config.vcpus)
        .map(|index| {
            Vcpu::new(
                &vm,
                index,
                pio.clone(),
                mmio.clone(),
                exit.clone(),
                msr_list.clone(),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Restoring the kvmclock MSRs makes KVM rewrite its structures in guest memory; keep the
    // snapshot's bytes there and put them back afterwards, so the guest starts from exactly
    // the saved memory. Areas outside guest RAM are ignored (the state file is untrusted).
    let kvm_areas: Vec<(u64, Vec<u8>)> = state
        .vcpus
        .iter()
        .flat_map(crate::vstate::vcpu_state::kvm_written_areas)
        .filter_map(|(gpa, len)| {
            let mut buf = vec![0u8; usize::try_from(len).ok().filter(|l| *l <= 4096)?];
            memory
                .read_slice(&mut buf, GuestAddress(gpa))
                .ok()
                .map(|()| (gpa, buf))
        })
        .collect();
    vm.restore_state(&state.vm)?;
    for (vcpu, saved) in vcpus.iter_mut().zip(&state.vcpus) {
        vcpu.restore_state(saved)?;
    }
    for (gpa, bytes) in &kvm_areas {
        memory
            .write_slice(bytes, GuestAddress(*gpa))
            .map_err(|e| SnapshotError::from(snapshot::memory::MemoryFileError::Guest(e)))?;
    }
    // An interrupt raised just before the snapshot may be missing from the saved interrupt
    // controllers; raising it again is harmless, losing it would leave a driver waiting.
    reassert_interrupts(&devices).map_err(BuildError::EventFd)?;
    let parts = Launch {
        vm,
        devices,
        vcpus,
        exit,
        boot_timer,
        config: state.config,
        cpu: state.cpu,
        start,
    };
    launch(parts, options.control.as_deref(), options.paused)
}

/// The state file is untrusted: its shape must match before anything is built from it.
fn check_state(dir: &Path, state: &SnapshotState) -> Result<(), BuildError> {
    let bad = |reason: String| BuildError::BadSnapshot {
        path: dir.display().to_string(),
        reason,
    };
    state
        .config
        .validate(None)
        .map_err(|e| bad(format!("its configuration: {e}")))?;
    if state.vcpus.len() != usize::from(state.config.vcpus) {
        return Err(bad(format!(
            "{} vCPU states for {} vCPUs",
            state.vcpus.len(),
            state.config.vcpus
        )));
    }
    for (i, vcpu) in state.vcpus.iter().enumerate() {
        if usize::from(vcpu.index) != i {
            return Err(bad(format!("vCPU state {i} is for vCPU {}", vcpu.index)));
        }
    }
    let ram: u64 = state.memory.regions.iter().map(|r| r.size).sum();
    if ram != state.config.memory_mib << 20 {
        return Err(bad(format!(
            "{ram} bytes of memory for a {} MiB VM",
            state.config.memory_mib
        )));
    }
    Ok(())
}

/// Maps `--disk-override ID=PATH` to disk indexes (disk ids default to `diskN`).
fn resolve_overrides(
    config: &VmConfig,
    overrides: &[(String, PathBuf)],
) -> Result<Vec<(usize, PathBuf)>, BuildError> {
    overrides
        .iter()
        .map(|(id, path)| {
            config
                .all_disks()
                .enumerate()
                .position(|(i, d)| d.id.clone().unwrap_or_else(|| format!("disk{i}")) == *id)
                .map(|i| (i, path.clone()))
                .ok_or_else(|| BuildError::UnknownDisk(id.clone()))
        })
        .collect()
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
                disk: crate::disk::OpenOptions {
                    path: disk.path.clone(),
                    format: disk.format,
                    read_only: disk.read_only,
                    allow_backing: disk.allow_backing,
                    max_depth: disk.max_chain_depth,
                    frozen_backing: None,
                },
                id: disk.id.clone().unwrap_or_else(|| format!("disk{i}")),
            },
        )?;
    }
    if config.rng {
        devices.attach_rng(vm)?;
    }
    if let Some(vsock) = &config.vsock {
        devices.attach_vsock(vm, vsock)?;
    }
    attach_nets(config, vm, &mut devices)?;
    devices.attach_vmgenid(vm)?;
    Ok(devices)
}

/// One virtio-net device per `config.net` entry, after every other virtio device.
fn attach_nets(config: &VmConfig, vm: &Vm, devices: &mut DeviceManager) -> Result<(), BuildError> {
    use crate::devices::virtio::net::{MacAddr, NetDeviceConfig};
    for (i, net) in config.net.iter().enumerate() {
        let id = net.id_or_default(i);
        let mac = match &net.mac {
            Some(text) => text.parse().map_err(|source| BuildError::Mac {
                id: id.clone(),
                source,
            })?,
            None => MacAddr::random().map_err(BuildError::RandomMac)?,
        };
        devices.attach_net(
            vm,
            NetDeviceConfig {
                tap: net.tap.clone(),
                mac,
                id,
            },
        )?;
    }
    Ok(())
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

#[allow(clippy::too_many_arguments)]
fn setup_vcpus(
    config: &VmConfig,
    kvm: &KvmContext,
    supported: &kvm_bindings::CpuId,
    vm: &Vm,
    kernel: &KernelEntry,
    devices: &Devices,
    exit: &Arc<ExitNotifier>,
    pvm: bool,
) -> Result<Vec<Vcpu>, BuildError> {
    let msr_list = Arc::new(kvm.msr_index_list()?);
    let pio = Arc::new(devices.pio.clone());
    let mmio = Arc::new(devices.mmio.clone());
    (0..config.vcpus)
        .map(|index| {
            let mut vcpu = Vcpu::new(
                vm,
                index,
                pio.clone(),
                mmio.clone(),
                exit.clone(),
                msr_list.clone(),
            )?;
            let cpuid = cpuid::build(supported, config.cpu_template, index, config.vcpus, pvm)?;
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
