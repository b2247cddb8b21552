//! Saving and restoring a virtio-blk device.
//!
//! The disk image itself is not part of the state: it lives on the host, and a snapshot is
//! only consistent with the image as it was when the snapshot was taken (the VMM flushes
//! disks before saving). A restore reopens the image, at the saved path or at an override
//! (a clone runs on its own copy or overlay of the disk), under the same advisory-lock rules
//! as at boot, and refuses an image whose size differs: the guest's block layer has cached
//! the capacity and its file system extends to the last sector.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Block, BlockConfig, BlockError};
use crate::devices::virtio::device_state::{check_acked_features, FeaturesError};
use crate::devices::virtio::VirtioDevice;
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
}

/// What restoring a block device needs besides its state.
#[derive(Debug, Clone, Default)]
pub struct BlockRestoreArgs {
    /// Open this image instead of the saved path (`--disk-override`).
    pub path_override: Option<PathBuf>,
}

/// Why a saved block device cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum BlockRestoreError {
    #[error("cannot reopen the disk image")]
    Open(#[source] BlockError),
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
        BlockState {
            path: self.path().to_path_buf(),
            read_only: self.is_read_only(),
            id: self.id().to_owned(),
            capacity: self.capacity(),
            acked_features: self.acked_features(),
        }
    }

    fn restore(args: BlockRestoreArgs, state: &BlockState) -> Result<Self, BlockRestoreError> {
        let path = args.path_override.unwrap_or_else(|| state.path.clone());
        // Block::new validates the id length and takes the image lock.
        let mut block = Block::new(BlockConfig {
            path,
            read_only: state.read_only,
            id: state.id.clone(),
        })
        .map_err(BlockRestoreError::Open)?;
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
