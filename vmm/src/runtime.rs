//! A running VM: its vCPU threads, event loops and devices, with pause, resume, snapshot
//! and stop. The state shared with the control socket lives in [`VmmShared`]; requests run
//! on the `control` thread while the `event-loop` thread keeps serving the devices, so
//! anything that needs the devices still must pause them first (the pause gate).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::config::VmConfig;
use crate::control::protocol::{
    DiskStatus, ErrorCode, PassInfo, PrecopyInfo, Request, Response, SnapshotInfo, SnapshotKind,
    SnapshotMode, SnapshotRequest, StatusInfo, VmGenIdStatus, VmRunState, VsockConnectionInfo,
    VsockStatus,
};
use crate::control::ControlHandler;
use crate::device_manager::{
    branch_disks, flush_disks, prepare_disk_spares, save_devices, Devices, DevicesState,
    VirtioDeviceHandle,
};
use crate::devices::legacy::BootTimer;
use crate::event_loop::EventLoop;
use crate::exit::{ExitNotifier, VmExit};
use crate::snapshot::memory::ParentRef;
use crate::snapshot::{self, cpu::CpuInfo, SnapshotError, SnapshotState};
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::vcpu::{VcpuError, VcpuEvent, VcpuHandle, VcpuState};
use crate::vstate::vcpu_state::VcpuArchState;
use crate::vstate::vm::{Vm, VmError, VmState};

/// Errors controlling a running VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("vCPU {index} reported {got:?} instead of {wanted:?}")]
    UnexpectedState {
        index: u8,
        wanted: VcpuState,
        got: VcpuState,
    },
    #[error("the VM has exited")]
    Exited,
    #[error("the VM must be paused for this")]
    NotPaused,
    #[error(
        "diff and live snapshots need dirty page tracking (track_dirty_pages / --track-dirty-pages)"
    )]
    NotTracking,
    #[error("a diff snapshot needs a parent: this VM's previous snapshot")]
    NoParent,
    #[error("{parent} is not this VM's previous snapshot{hint}")]
    WrongParent { parent: String, hint: String },
    #[error("cannot flush the disks before the snapshot")]
    Flush(#[source] std::io::Error),
    #[error("cannot branch the disks for the snapshot")]
    Branch(#[source] crate::disk::DiskError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    VmGenId(#[from] crate::devices::vmgenid::VmGenIdError),
}

/// What the VMM and its control socket share.
pub struct VmmShared {
    /// Held for the whole of each lifecycle operation (pause, resume, snapshot, digest), so
    /// they never interleave: a snapshot decides whether to pause and saves under one lock.
    lifecycle: Mutex<()>,
    vcpus: Mutex<Vec<VcpuHandle>>,
    run_state: Mutex<VmRunState>,
    exit: Arc<ExitNotifier>,
    boot_timer: Arc<BootTimer>,
    devices: Devices,
    config: VmConfig,
    cpu: CpuInfo,
    started: Instant,
    /// The last snapshot this VM took (absolute directory, memory BLAKE3), while the dirty
    /// log describes exactly the pages written since; `None` when no snapshot was taken or
    /// the last attempt failed after the log was cleared.
    last_snapshot: Mutex<Option<(PathBuf, String)>>,
    // Dropped last: the VM owns the memory slots the vCPUs run on.
    vm: Vm,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl VmmShared {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        exit: Arc<ExitNotifier>,
        boot_timer: Arc<BootTimer>,
        devices: Devices,
        config: VmConfig,
        cpu: CpuInfo,
        started: Instant,
        vm: Vm,
    ) -> Self {
        Self {
            lifecycle: Mutex::new(()),
            vcpus: Mutex::new(Vec::new()),
            run_state: Mutex::new(VmRunState::Paused),
            exit,
            boot_timer,
            devices,
            config,
            cpu,
            started,
            last_snapshot: Mutex::new(None),
            vm,
        }
    }

    /// Hands the started (paused) vCPU threads over.
    pub(crate) fn set_vcpus(&self, vcpus: Vec<VcpuHandle>) {
        *lock(&self.vcpus) = vcpus;
    }

    /// Sends `event` to every vCPU, then waits until each reports `wanted` (or has exited).
    fn broadcast(
        vcpus: &[VcpuHandle],
        event: VcpuEvent,
        wanted: VcpuState,
    ) -> Result<(), VmmError> {
        for vcpu in vcpus {
            vcpu.send(event)?;
        }
        for vcpu in vcpus {
            let got = vcpu.wait_state(event)?;
            if got != wanted && got != VcpuState::Exited {
                return Err(VmmError::UnexpectedState {
                    index: vcpu.index(),
                    wanted,
                    got,
                });
            }
        }
        Ok(())
    }

    fn set_state(
        &self,
        event: VcpuEvent,
        wanted: VcpuState,
        state: VmRunState,
    ) -> Result<(), VmmError> {
        if self.exit.is_requested() {
            return Err(VmmError::Exited);
        }
        let vcpus = lock(&self.vcpus);
        Self::broadcast(&vcpus, event, wanted)?;
        *lock(&self.run_state) = state;
        Ok(())
    }

    /// vCPUs first (no new notifications), then device processing: the gate closes, then
    /// each virtio device's lock is taken once, so a request the event loop was serving at
    /// that moment has finished (devices check the gate under that lock) and no device
    /// touches guest memory until the resume.
    fn pause_locked(&self) -> Result<(), VmmError> {
        self.set_state(VcpuEvent::Pause, VcpuState::Paused, VmRunState::Paused)?;
        self.devices.gate.set_closed(true);
        for slot in &self.devices.virtio {
            drop(lock(&slot.device.as_virtio()));
        }
        Ok(())
    }

    /// Devices first, kicking every queue so requests deferred while paused are served, then
    /// the vCPUs. The first resume after a restore gives the guest a new VM generation ID
    /// before anything runs; if that fails, nothing resumes (a clone must not run with its
    /// source's ID).
    fn resume_locked(&self) -> Result<(), VmmError> {
        if let Some(genid) = &self.devices.vmgenid {
            if genid.apply_pending_change()? {
                log::info!("new VM generation ID {}", genid.id_hex());
            }
        }
        self.devices.gate.set_closed(false);
        for slot in &self.devices.virtio {
            let device = slot.device.as_virtio();
            let device = lock(&device);
            for evt in device.queue_events() {
                if let Err(e) = evt.write(1) {
                    log::warn!("cannot kick a virtio queue on resume: {e}");
                }
            }
        }
        self.set_state(VcpuEvent::Resume, VcpuState::Running, VmRunState::Running)
    }

    /// Stops every vCPU at an instruction boundary; returns when all have stopped.
    pub fn pause(&self) -> Result<(), VmmError> {
        let _op = lock(&self.lifecycle);
        self.pause_locked()
    }

    /// Lets every vCPU run again.
    pub fn resume(&self) -> Result<(), VmmError> {
        let _op = lock(&self.lifecycle);
        self.resume_locked()
    }

    pub fn run_state(&self) -> VmRunState {
        if self.exit.is_requested() {
            VmRunState::Exited
        } else {
            *lock(&self.run_state)
        }
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        self.vm.memory()
    }

    /// BLAKE3 of all guest memory; only while paused, so the answer describes one instant.
    pub fn memory_digest(&self) -> Result<String, VmmError> {
        let _op = lock(&self.lifecycle);
        if self.run_state() != VmRunState::Paused {
            return Err(VmmError::NotPaused);
        }
        Ok(snapshot::memory::digest(self.memory()).map_err(SnapshotError::from)?)
    }

    /// The parent a diff snapshot may use: `parent` must be this VM's previous snapshot,
    /// unchanged since.
    fn diff_parent(&self, parent: Option<&Path>) -> Result<ParentRef, VmmError> {
        if !self.vm.tracks_dirty_pages() {
            return Err(VmmError::NotTracking);
        }
        let parent = parent.ok_or(VmmError::NoParent)?;
        let wrong = |hint: &str| VmmError::WrongParent {
            parent: parent.display().to_string(),
            hint: hint.to_string(),
        };
        let last = lock(&self.last_snapshot).clone();
        let Some((last_dir, last_hash)) = last else {
            return Err(wrong(
                " (it has taken none since it started, or the last one failed)",
            ));
        };
        let canonical = std::fs::canonicalize(parent).map_err(|_| wrong(" (it does not exist)"))?;
        if canonical != last_dir {
            return Err(wrong(&format!(" (that is {})", last_dir.display())));
        }
        let state = snapshot::read_state(&canonical)?;
        if state.memory.blake3 != last_hash {
            return Err(wrong(" (it has changed since it was written)"));
        }
        Ok(ParentRef {
            dir: canonical,
            blake3: last_hash,
        })
    }

    /// Writes a snapshot to `req.dir`: full, or for `kind: diff` only the pages written since
    /// `req.parent`. `mode: paused` pauses the VM for the whole operation; `mode: live`
    /// copies memory while a running VM runs and pauses it only for the last dirty pages and
    /// the device, disk and vCPU state (see [`live_snapshot`](Self::live_snapshot)). The VM
    /// is resumed afterwards if it was running and `req.resume` is set.
    pub fn snapshot(&self, req: &SnapshotRequest) -> Result<SnapshotInfo, VmmError> {
        let t0 = Instant::now();
        let _op = lock(&self.lifecycle);
        let parent = match req.kind {
            SnapshotKind::Full => None,
            SnapshotKind::Diff => Some(self.diff_parent(req.parent.as_deref())?),
        };
        let was_running = self.run_state() == VmRunState::Running;
        if req.mode == SnapshotMode::Live && was_running {
            return self.live_snapshot(req, parent, t0);
        }
        if was_running {
            self.pause_locked()?;
        }
        let paused_at = Instant::now();
        let result = self.write_snapshot(&req.dir, parent);
        let mut pause = paused_at.elapsed();
        if was_running && req.resume {
            self.resume_locked()?;
            pause = paused_at.elapsed();
        }
        let written = result?;
        Ok(self.after_snapshot(req, written, pause, t0, None))
    }

    /// Prepares the next branch's overlays, now that the VM runs again, and makes the
    /// answer.
    fn after_snapshot(
        &self,
        req: &SnapshotRequest,
        written: Written,
        pause: Duration,
        t0: Instant,
        precopy: Option<PrecopyInfo>,
    ) -> SnapshotInfo {
        if !written.frozen_layers.is_empty() {
            prepare_disk_spares(&self.devices);
        }
        SnapshotInfo {
            dir: req.dir.clone(),
            kind: req.kind,
            pause_ms: ms(pause),
            frozen_layers: written.frozen_layers,
            disk_branch_ms: ms(written.disk_branch),
            total_ms: ms(t0.elapsed()),
            memory_bytes: written.memory_bytes,
            mode: if precopy.is_some() {
                SnapshotMode::Live
            } else {
                SnapshotMode::Paused
            },
            precopy,
        }
    }

    /// Saves everything into `dir` atomically. Save order: devices first, then vCPUs and
    /// the VM. Devices go first because saving a device can complete work in flight (the
    /// disks are flushed, a queue's used ring is final) and may raise an interrupt; the
    /// interrupt controllers and vCPUs saved afterwards then include it, so no interrupt is
    /// lost between the two.
    ///
    /// A tracking VM reads and clears its dirty log at every snapshot, so the next diff is
    /// relative to this one; if the snapshot then fails, no diff can follow it until a new
    /// snapshot succeeds.
    fn write_snapshot(&self, dir: &Path, parent: Option<ParentRef>) -> Result<Written, VmmError> {
        let tracking = self.vm.tracks_dirty_pages();
        if dir.exists() {
            // Refused before the dirty log is touched: the previous snapshot stays a parent.
            return Err(SnapshotError::Exists(dir.display().to_string()).into());
        }
        let written = self.write_snapshot_files(dir, parent, tracking)?;
        self.remember_snapshot(dir, &written);
        Ok(written)
    }

    /// Records `dir` as the parent the next diff snapshot may use.
    fn remember_snapshot(&self, dir: &Path, written: &Written) {
        if self.vm.tracks_dirty_pages() {
            let absolute = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
            *lock(&self.last_snapshot) = Some((absolute, written.memory_blake3.clone()));
        }
    }

    /// Flushes and branches the disks and saves the device, vCPU and VM state: the cut a
    /// snapshot records. The VM must be paused.
    fn save_cut(&self) -> Result<Cut, VmmError> {
        flush_disks(&self.devices).map_err(VmmError::Flush)?;
        // The disks as they are now become frozen layers the snapshot records.
        let branch_start = Instant::now();
        let frozen_layers = branch_disks(&self.devices).map_err(VmmError::Branch)?;
        let disk_branch = branch_start.elapsed();
        let devices = save_devices(&self.devices);
        let vcpus = {
            let handles = lock(&self.vcpus);
            handles
                .iter()
                .map(VcpuHandle::save_state)
                .collect::<Result<Vec<_>, _>>()?
        };
        let vm = self.vm.save_state()?;
        Ok(Cut {
            devices,
            vcpus,
            vm,
            frozen_layers,
            disk_branch,
        })
    }

    /// The state file's contents for a cut and its memory.
    fn snapshot_state(&self, memory: snapshot::memory::MemoryState, cut: Cut) -> SnapshotState {
        SnapshotState {
            written_by: format!("grove-vmm {}", env!("CARGO_PKG_VERSION")),
            config: self.config.clone(),
            cpu: self.cpu.clone(),
            memory,
            devices: cut.devices,
            vcpus: cut.vcpus,
            vm: cut.vm,
        }
    }

    fn write_snapshot_files(
        &self,
        dir: &Path,
        parent: Option<ParentRef>,
        tracking: bool,
    ) -> Result<Written, VmmError> {
        let cut = self.save_cut()?;
        let frozen_layers = cut.frozen_layers.clone();
        let disk_branch = cut.disk_branch;
        // Last, after the devices were saved (which may complete work into guest memory).
        let dirty = if tracking {
            *lock(&self.last_snapshot) = None;
            Some(self.vm.take_dirty_pages()?)
        } else {
            None
        };
        let memory = self.memory();
        let written = snapshot::write_atomically(dir, |tmp| -> Result<_, VmmError> {
            let path = tmp.join(snapshot::MEMORY_FILE);
            let memory_state = match (parent, &dirty) {
                (Some(parent), Some(dirty)) => {
                    snapshot::memory::write_diff(memory, &path, dirty, parent)
                        .map_err(SnapshotError::from)?
                }
                _ => snapshot::memory::write(memory, &path).map_err(SnapshotError::from)?,
            };
            let bytes = memory_bytes(&memory_state);
            let blake3 = memory_state.blake3.clone();
            let state = self.snapshot_state(memory_state, cut);
            snapshot::format::write_file(&tmp.join(snapshot::STATE_FILE), &state)
                .map_err(SnapshotError::from)?;
            Ok((bytes, blake3))
        })?;
        Ok(Written {
            memory_bytes: written.0,
            memory_blake3: written.1,
            frozen_layers,
            disk_branch,
        })
    }

    /// A live snapshot of a running VM (pre-copy):
    ///
    /// 1. While the guest runs: clear the dirty log and copy all of memory (for a diff, the
    ///    pages written since the parent); then copy the pages dirtied during the previous
    ///    pass, again and again, until a pass copies at most [`CONVERGED_PAGES`] or
    ///    [`MAX_PASSES`] passes were made.
    /// 2. Pause; save the cut exactly as a paused snapshot does (disks flushed and branched,
    ///    devices, vCPUs, VM); read the dirty log a last time, which now also holds whatever
    ///    saving the devices wrote, and copy those pages. Memory in the file is now memory at
    ///    the cut.
    /// 3. Resume; then sync and hash the memory file, write the state file, and publish the
    ///    directory. Any failure before the directory is published removes it whole, and
    ///    the VM keeps running (it is resumed if it was paused for the cut).
    fn live_snapshot(
        &self,
        req: &SnapshotRequest,
        parent: Option<ParentRef>,
        t0: Instant,
    ) -> Result<SnapshotInfo, VmmError> {
        if !self.vm.tracks_dirty_pages() {
            return Err(VmmError::NotTracking);
        }
        if req.dir.exists() {
            return Err(SnapshotError::Exists(req.dir.display().to_string()).into());
        }
        *lock(&self.last_snapshot) = None;
        let memory = self.memory();
        let diff = parent.is_some();
        let exiting = || self.exit.is_requested();
        let mut pause = Duration::ZERO;
        let (written, precopy) = snapshot::write_atomically(&req.dir, |tmp| {
            let path = tmp.join(snapshot::MEMORY_FILE);
            let mut file = snapshot::memory::LiveFile::create(memory, &path, diff)
                .map_err(SnapshotError::from)?;
            let mut copy_pass = |first: bool| -> Result<PassInfo, VmmError> {
                let start = Instant::now();
                let dirty = self.vm.take_dirty_pages()?;
                let pages = if first && !diff {
                    file.copy_all(memory, &exiting)
                } else {
                    file.copy_pages(memory, &dirty)
                }
                .map_err(SnapshotError::from)?;
                Ok(PassInfo {
                    pages,
                    ms: ms(start.elapsed()),
                })
            };
            let mut passes = vec![copy_pass(true)?];
            while passes.len() < MAX_PASSES {
                if exiting() {
                    return Err(VmmError::Exited);
                }
                let pass = copy_pass(false)?;
                let converged = pass.pages <= CONVERGED_PAGES;
                passes.push(pass);
                if converged {
                    break;
                }
            }
            let precopy_ms = ms(t0.elapsed());

            self.pause_locked()?;
            let paused_at = Instant::now();
            let cut = self.save_cut().and_then(|cut| {
                let dirty = self.vm.take_dirty_pages()?;
                let pages = file
                    .copy_pages(memory, &dirty)
                    .map_err(SnapshotError::from)?;
                Ok((cut, pages))
            });
            let resumed = if req.resume {
                self.resume_locked()
            } else {
                Ok(())
            };
            pause = paused_at.elapsed();
            let (cut, final_pages) = cut?;
            resumed?;

            let finish_start = Instant::now();
            let memory_state = file.finish(parent).map_err(SnapshotError::from)?;
            let written = Written {
                memory_bytes: memory_bytes(&memory_state),
                memory_blake3: memory_state.blake3.clone(),
                frozen_layers: cut.frozen_layers.clone(),
                disk_branch: cut.disk_branch,
            };
            let state = self.snapshot_state(memory_state, cut);
            snapshot::format::write_file(&tmp.join(snapshot::STATE_FILE), &state)
                .map_err(SnapshotError::from)?;
            let precopy = PrecopyInfo {
                passes,
                final_pages,
                precopy_ms,
                finish_ms: ms(finish_start.elapsed()),
            };
            Ok::<_, VmmError>((written, precopy))
        })?;
        self.remember_snapshot(&req.dir, &written);
        Ok(self.after_snapshot(req, written, pause, t0, Some(precopy)))
    }

    /// Prepares the disks' next branch overlays on a short-lived thread.
    pub(crate) fn prepare_disk_spares_in_background(self: &Arc<Self>) {
        if !self.devices.blocks.iter().any(|b| {
            let b = lock(b);
            !b.is_read_only() && b.image().format() == crate::disk::DiskFormat::Qcow2
        }) {
            return;
        }
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("disk-spares".into())
            .spawn(move || {
                // Creating overlays is what a snapshot's disk branch does.
                if let Err(e) = crate::seccomp::apply(crate::seccomp::ThreadKind::Control) {
                    log::warn!("cannot prepare the disks' next branch: {e}");
                    return;
                }
                // Under the lifecycle lock, so no snapshot branches meanwhile.
                let _op = lock(&me.lifecycle);
                prepare_disk_spares(&me.devices);
            });
        if let Err(e) = spawned {
            log::warn!("cannot prepare the disks' next branch: {e}");
        }
    }

    fn status(&self) -> StatusInfo {
        StatusInfo {
            state: self.run_state(),
            vcpus: self.config.vcpus,
            memory_mib: self.config.memory_mib,
            boot_time_ms: self.boot_timer.boot_time().map(ms),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            disks: self
                .devices
                .blocks
                .iter()
                .map(|b| {
                    let b = lock(b);
                    DiskStatus {
                        id: b.id().to_string(),
                        read_only: b.is_read_only(),
                        chain: b.image().chain().to_vec(),
                    }
                })
                .collect(),
            vsock: self
                .devices
                .virtio
                .iter()
                .find_map(|slot| match &slot.device {
                    VirtioDeviceHandle::Vsock(v) => {
                        let v = lock(v);
                        Some(VsockStatus {
                            guest_cid: v.guest_cid(),
                            uds_path: v.uds_path().to_path_buf(),
                        })
                    }
                    _ => None,
                }),
            vmgenid: self.devices.vmgenid.as_ref().map(|g| VmGenIdStatus {
                id: g.id_hex(),
                addr: g.addr(),
            }),
        }
    }

    /// The figures of the host-initiated vsock connection `host_port` (`docs/vsock.md`).
    fn vsock_connection(&self, host_port: u32) -> Response {
        let vsock = self
            .devices
            .virtio
            .iter()
            .find_map(|slot| match &slot.device {
                VirtioDeviceHandle::Vsock(v) => Some(v),
                _ => None,
            });
        let Some(vsock) = vsock else {
            return Response::error(ErrorCode::InvalidState, "the VM has no vsock device");
        };
        let Some(s) = lock(vsock).connection_stats(host_port) else {
            return Response::error(
                ErrorCode::NotFound,
                format!(
                    "no host vsock connection with port {host_port} is open or among the last {} closed",
                    crate::devices::virtio::vsock::CLOSED_KEPT
                ),
            );
        };
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        Response::VsockConnection(VsockConnectionInfo {
            host_port: s.host_port,
            guest_port: s.guest_port,
            open: s.open,
            guest_wait_us: us(s.guest_wait),
            lifetime_us: us(s.lifetime),
            packets_to_guest: s.packets_to_guest,
            packets_from_guest: s.packets_from_guest,
            bytes_to_guest: s.bytes_to_guest,
            bytes_from_guest: s.bytes_from_guest,
        })
    }

    /// Stops the vCPU threads (taking them out of the shared list first, so a control
    /// request waiting for the list never waits for a joining thread).
    fn join_vcpus(&self) {
        let mut vcpus = std::mem::take(&mut *lock(&self.vcpus));
        for vcpu in &mut vcpus {
            vcpu.exit_and_join();
        }
    }
}

/// A live snapshot's pre-copy stops after this many passes (the first included), even if
/// the guest dirties memory faster than it is copied: the pause then copies the rest.
const MAX_PASSES: usize = 8;
/// A pre-copy pass that copied at most this many pages (1 MiB) ends the pre-copy: the
/// next, made in the pause, copies about as few.
const CONVERGED_PAGES: u64 = 256;

/// Bytes of guest memory a memory file holds.
fn memory_bytes(state: &snapshot::memory::MemoryState) -> u64 {
    match &state.pages {
        Some(runs) => runs.iter().map(|(_, n)| n * 4096).sum(),
        None => state.file_size,
    }
}

/// The state of a paused VM a snapshot records besides its memory.
struct Cut {
    devices: DevicesState,
    vcpus: Vec<VcpuArchState>,
    vm: VmState,
    frozen_layers: Vec<PathBuf>,
    disk_branch: Duration,
}

/// What writing a snapshot produced.
struct Written {
    memory_bytes: u64,
    memory_blake3: String,
    frozen_layers: Vec<PathBuf>,
    disk_branch: Duration,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn error_response(e: &VmmError) -> Response {
    let code = match e {
        VmmError::Exited
        | VmmError::NotPaused
        | VmmError::NotTracking
        | VmmError::NoParent
        | VmmError::WrongParent { .. } => ErrorCode::InvalidState,
        VmmError::Snapshot(SnapshotError::Exists(_)) => ErrorCode::BadRequest,
        VmmError::Branch(crate::disk::DiskError::TooDeep { .. }) => ErrorCode::InvalidState,
        _ => ErrorCode::Failed,
    };
    // One line: the error and its causes.
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    Response::error(code, message)
}

impl ControlHandler for VmmShared {
    fn handle(&self, request: Request) -> Response {
        let result = match request {
            Request::Status => return Response::Status(self.status()),
            Request::Pause => self.pause().map(|()| Response::Ok),
            Request::Resume => self.resume().map(|()| Response::Ok),
            Request::Snapshot(req) => self.snapshot(&req).map(Response::Snapshot),
            Request::Shutdown => {
                // The main thread tears the VM down; this thread only asks.
                self.exit.notify(VmExit::Stopped);
                Ok(Response::Ok)
            }
            Request::MemoryDigest => self.memory_digest().map(|digest| Response::MemoryDigest {
                algorithm: "blake3".into(),
                digest,
            }),
            Request::VsockConnection(r) => return self.vsock_connection(r.host_port),
        };
        result.unwrap_or_else(|e| error_response(&e))
    }
}

/// A VM whose vCPU threads and event loops are running.
pub struct Vmm {
    shared: Arc<VmmShared>,
    event_loop: EventLoop,
    /// Serves the control socket, when there is one.
    control_loop: Option<EventLoop>,
}

impl Vmm {
    pub(crate) fn new(shared: Arc<VmmShared>, event_loop: EventLoop) -> Self {
        Self {
            shared,
            event_loop,
            control_loop: None,
        }
    }

    /// Hands over the thread serving the control socket (stopped at teardown).
    pub(crate) fn serve_control(&mut self, control_loop: EventLoop) {
        self.control_loop = Some(control_loop);
    }

    /// The state shared with the control socket.
    pub fn shared(&self) -> &Arc<VmmShared> {
        &self.shared
    }

    /// Stops every vCPU at an instruction boundary; returns when all have stopped.
    pub fn pause(&self) -> Result<(), VmmError> {
        self.shared.pause()
    }

    /// Lets every vCPU run again.
    pub fn resume(&self) -> Result<(), VmmError> {
        self.shared.resume()
    }

    /// Writes a full or diff snapshot (see [`VmmShared::snapshot`]).
    pub fn snapshot(&self, req: &SnapshotRequest) -> Result<SnapshotInfo, VmmError> {
        self.shared.snapshot(req)
    }

    /// Asks the VM to stop; [`wait`](Self::wait) then returns [`VmExit::Stopped`].
    pub fn stop(&self) {
        self.shared.exit.notify(VmExit::Stopped);
    }

    /// A handle other threads can use to stop the VM or wait for its exit.
    pub fn exit_notifier(&self) -> Arc<ExitNotifier> {
        self.shared.exit.clone()
    }

    /// Time from VMM start to the guest's boot-complete signal, once it came.
    pub fn boot_time(&self) -> Option<Duration> {
        self.shared.boot_timer.boot_time()
    }

    /// Guest memory, for inspection (tests, digests).
    pub fn memory(&self) -> &GuestMemoryMmap {
        self.shared.memory()
    }

    pub fn vcpu_count(&self) -> usize {
        usize::from(self.shared.config.vcpus)
    }

    /// Blocks until the VM exits (guest reset, error, or [`stop`](Self::stop)), then tears
    /// it down: vCPU threads joined, event loop stopped, disks flushed.
    pub fn wait(mut self) -> VmExit {
        let reason = self.shared.exit.wait();
        self.shutdown();
        reason
    }

    fn shutdown(&mut self) {
        self.shared.join_vcpus();
        // No request runs during the teardown (one in progress finishes first; a snapshot
        // sees the exit and stops).
        if let Some(control) = &mut self.control_loop {
            control.stop();
        }
        self.event_loop.stop();
        if let Err(e) = flush_disks(&self.shared.devices) {
            log::error!("cannot flush a disk at exit: {e}");
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.shutdown();
    }
}
