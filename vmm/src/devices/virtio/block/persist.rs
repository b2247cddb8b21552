//! Saving and restoring a virtio-blk device.
//!
//! The disk's contents are not part of the state: they live in the disk's files, and a
//! snapshot is consistent with them as they were when it was taken (the VMM flushes disks
//! before saving). What is saved is how to find them again:
//!
//! - a writable qcow2 disk is branched at every snapshot (see [`crate::disk::branch`]): its
//!   active layer became a frozen layer the state records, and every restore gets its own
//!   new overlay on that frozen layer (at `--disk-override`'s path or, by default, a free
//!   name next to the frozen layer); an existing override must be an overlay on it;
//! - any other disk is reopened at the saved path or at an override (a clone of a raw
//!   read-write disk must run on its own copy), under the same lock rules as at boot.
//!
//! A restored image must have the saved size: the guest's block layer has cached the
//! capacity and its file system extends to the last sector.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Block, BlockConfig, BlockError};
use crate::devices::virtio::device_state::{check_acked_features, FeaturesError};
use crate::devices::virtio::VirtioDevice;
use crate::disk::{self, DiskError, DiskFormat, LayerRecord, OpenOptions};
use crate::snapshot::Persist;

/// The saved state of a block device. Its queue lives in the transport's state.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BlockState {
    /// The disk image the device used.
    pub path: PathBuf,
    pub read_only: bool,
    /// Serial number the guest reads with GET_ID.
    pub id: String,
    /// Disk size in 512-byte sectors, as the guest knows it.
    pub capacity: u64,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// The active layer's format.
    #[serde(default)]
    pub format: DiskFormat,
    /// The layers below the active one at the save, top first.
    #[serde(default)]
    pub backing: Vec<LayerRecord>,
    /// The disk was branched for this snapshot: the active layer was an empty overlay on
    /// `backing[0]`, which holds the disk as the snapshot saw it.
    #[serde(default)]
    pub branched: bool,
    /// Whether the configuration allowed following backing files.
    #[serde(default)]
    pub allow_backing: bool,
    /// The chain depth limit the disk was opened with.
    #[serde(default = "default_max_chain_depth")]
    pub max_chain_depth: usize,
}

fn default_max_chain_depth() -> usize {
    disk::DEFAULT_MAX_CHAIN_DEPTH
}

/// What restoring a block device needs besides its state.
#[derive(Debug, Clone, Default)]
pub struct BlockRestoreArgs {
    /// Open this image instead of the saved path (`--disk-override`); for a branched disk,
    /// where to create the clone's overlay.
    pub path_override: Option<PathBuf>,
}

/// Why a saved block device cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum BlockRestoreError {
    #[error("cannot reopen the disk image")]
    Open(#[source] BlockError),
    #[error("cannot create the clone's overlay")]
    Overlay(#[source] DiskError),
    #[error("the snapshot says the disk was branched but records no frozen layer")]
    NoFrozenLayer,
    #[error(
        "disk image {} has {actual} sectors, but the snapshot was taken with {saved}; \
         a restored guest needs a disk of exactly the saved size",
        .path.display()
    )]
    Capacity {
        path: PathBuf,
        saved: u64,
        actual: u64,
    },
    #[error("invalid acked features")]
    Features(#[source] FeaturesError),
}

impl Persist for Block {
    type State = BlockState;
    type RestoreArgs = BlockRestoreArgs;
    type Error = BlockRestoreError;

    fn save(&self) -> BlockState {
        let image = self.image();
        BlockState {
            path: self.path().to_path_buf(),
            read_only: self.is_read_only(),
            id: self.id().to_owned(),
            capacity: self.capacity(),
            acked_features: self.acked_features(),
            format: image.format(),
            backing: image.backing().to_vec(),
            branched: self
                .fresh_on()
                .is_some_and(|f| image.backing().first() == Some(f)),
            allow_backing: image.allow_backing(),
            max_chain_depth: image.max_depth(),
        }
    }

    fn restore(args: BlockRestoreArgs, state: &BlockState) -> Result<Self, BlockRestoreError> {
        let mut opts = OpenOptions::new(
            args.path_override
                .clone()
                .unwrap_or_else(|| state.path.clone()),
            state.format,
            state.read_only,
        );
        opts.allow_backing = state.allow_backing;
        opts.max_depth = state.max_chain_depth;
        let mut created = None;
        if state.branched {
            let frozen = state
                .backing
                .first()
                .ok_or(BlockRestoreError::NoFrozenLayer)?;
            let path = match args.path_override {
                Some(p) => p,
                None => clone_overlay_path(&frozen.path),
            };
            if !path.exists() {
                disk::create_overlay(&path, Some(frozen), state.capacity * super::SECTOR_SIZE)
                    .map_err(BlockRestoreError::Overlay)?;
                created = Some(path.clone());
            }
            opts.path = path;
            opts.format = DiskFormat::Qcow2;
            opts.frozen_backing = Some(frozen.clone());
        }
        // Block::new validates the id length and takes the image locks.
        let mut block = Block::new(BlockConfig {
            disk: opts,
            id: state.id.clone(),
        })
        .map_err(|e| {
            if let Some(path) = &created {
                let _ = std::fs::remove_file(path);
            }
            BlockRestoreError::Open(e)
        })?;
        if block.capacity() != state.capacity {
            return Err(BlockRestoreError::Capacity {
                path: block.path().to_path_buf(),
                saved: state.capacity,
                actual: block.capacity(),
            });
        }
        check_acked_features(block.avail_features(), state.acked_features)
            .map_err(BlockRestoreError::Features)?;
        block.set_acked_features(state.acked_features);
        Ok(block)
    }
}

/// A free name for a clone's overlay next to its frozen layer: `<stem>.clone-<pid>.qcow2`,
/// with `-1`, `-2`, ... added when taken.
fn clone_overlay_path(frozen: &std::path::Path) -> PathBuf {
    let dir = frozen.parent().unwrap_or_else(|| std::path::Path::new(""));
    let stem = frozen
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "disk".into());
    let pid = std::process::id();
    let mut candidate = dir.join(format!("{stem}.clone-{pid}.qcow2"));
    let mut n = 1;
    while candidate.symlink_metadata().is_ok() {
        candidate = dir.join(format!("{stem}.clone-{pid}-{n}.qcow2"));
        n += 1;
    }
    candidate
}
