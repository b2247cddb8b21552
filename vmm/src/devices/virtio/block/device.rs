//! The virtio-blk device: disk image, features, configuration space and event-loop wiring.

use std::io;
use std::path::{Path, PathBuf};

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::debug;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
};
use vmm_sys_util::eventfd::EventFd;

use super::handler::{Disk, ID_LEN};
use super::{QUEUE_SIZE, SECTOR_SIZE, SEG_MAX};
use crate::devices::virtio::device_state::{read_config_bytes, DeviceState, Wakeup};
use crate::devices::virtio::{
    ActivateContext, ActivateError, VirtioDevice, TYPE_BLOCK, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::disk::{DiskError, DiskFormat, DiskImage, LayerRecord, OpenOptions};

/// Bytes of `struct virtio_blk_config` the device fills: capacity (u64 at 0), size_max (u32
/// at 8, unused) and seg_max (u32 at 12). Later fields read as zero.
const CONFIG_LEN: usize = 16;

/// How to build a block device.
#[derive(Debug, Clone)]
pub struct BlockConfig {
    /// The image and what may be opened with it.
    pub disk: OpenOptions,
    /// Serial number the guest reads with GET_ID (at most 20 bytes).
    pub id: String,
}

impl BlockConfig {
    /// A raw image with the defaults.
    pub fn raw(path: impl Into<PathBuf>, read_only: bool, id: impl Into<String>) -> Self {
        Self {
            disk: OpenOptions::new(path, DiskFormat::Raw, read_only),
            id: id.into(),
        }
    }
}

/// Errors building a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("block device id {id:?} is {} bytes long; virtio-blk allows at most 20", .id.len())]
    IdTooLong { id: String },
    #[error("cannot create the device eventfds")]
    EventFd(#[source] io::Error),
}

/// A virtio-blk device with one request queue, served on the event-loop thread.
pub struct Block {
    state: DeviceState,
    disk: Disk,
    /// The configured id as given, for snapshots (the disk keeps it NUL-padded).
    id: String,
    config: [u8; CONFIG_LEN],
}

impl Block {
    /// Opens the disk image (see [`crate::disk::open`]).
    pub fn new(cfg: BlockConfig) -> Result<Self, BlockError> {
        if cfg.id.len() > ID_LEN {
            return Err(BlockError::IdTooLong { id: cfg.id });
        }
        let image = crate::disk::open(&cfg.disk)?;
        Self::with_image(image, cfg.id)
    }

    /// A device on an image already open.
    pub fn with_image(image: DiskImage, id: String) -> Result<Self, BlockError> {
        if id.len() > ID_LEN {
            return Err(BlockError::IdTooLong { id });
        }
        let read_only = image.read_only();
        let capacity = image.size() / SECTOR_SIZE;
        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX);
        if read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&capacity.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());

        Ok(Self {
            state: DeviceState::new(features, &[QUEUE_SIZE]).map_err(BlockError::EventFd)?,
            disk: Disk::new(image, id.as_bytes()),
            id,
            config,
        })
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity()
    }

    /// The active layer's file.
    pub fn path(&self) -> &Path {
        self.disk.image().path()
    }

    /// The open image.
    pub fn image(&self) -> &DiskImage {
        self.disk.image()
    }

    /// The frozen layer the active one is an empty overlay on, right after a branch.
    pub fn fresh_on(&self) -> Option<&LayerRecord> {
        self.disk.fresh_on()
    }

    /// Branches the disk at a snapshot (see [`DiskImage::branch`]); call with the VM paused.
    pub fn branch(&mut self) -> Result<LayerRecord, DiskError> {
        self.disk.branch()
    }

    /// Takes a spare overlay created for the next branch (see
    /// [`crate::disk::DiskImage::spare_plan`]).
    pub fn install_spare(&mut self, plan: crate::disk::branch::SparePlan) {
        self.disk.install_spare(plan)
    }

    pub fn is_read_only(&self) -> bool {
        self.disk.read_only()
    }

    /// The serial number the guest reads with GET_ID.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Makes every write the guest completed durable; the VMM calls it before snapshots.
    pub fn flush(&self) -> io::Result<()> {
        self.disk.flush()
    }

    /// The eventfd the event loop watches for activation and reset.
    pub fn activate_event(&self) -> &EventFd {
        self.state.activate_event()
    }

    fn process_queue(&mut self) {
        let disk = &mut self.disk;
        self.state
            .process_queue(0, |mem, chain| disk.process_chain(mem, chain));
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    crate::devices::virtio::delegate_to_device_state!();

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // No writable field is offered (VIRTIO_BLK_F_CONFIG_WCE is not negotiated).
        debug!(
            "virtio-blk: ignored {}-byte config write at {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.state.activate(ctx)
    }

    fn set_pause_gate(&mut self, gate: crate::devices::virtio::device_state::PauseGate) {
        self.state.set_pause_gate(gate);
    }

    fn reset(&mut self) {
        self.state.reset();
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        self.state.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self.state.handle_event(&events, ops) {
            Wakeup::Nothing => {}
            Wakeup::AllQueues | Wakeup::Queue(_) => self.process_queue(),
        }
    }
}
