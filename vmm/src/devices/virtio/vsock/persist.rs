//! Saving and restoring a vsock device: its CID, socket path and negotiated features (its
//! queues live in the transport's state). Connections are not saved: they belong to the VM
//! the snapshot was taken from, whose host clients are still connected to it. A restored
//! device listens again (at its saved path or at an override, since a clone running beside
//! its source cannot take the source's socket) and tells the driver, once the VM runs, that
//! the transport was reset: the guest's open connections close, its listeners stay.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Vsock, VsockError};
use crate::config::VsockConfig;
use crate::devices::virtio::device_state::{check_acked_features, FeaturesError};
use crate::devices::virtio::VirtioDevice;
use crate::snapshot::Persist;

/// The saved state of a vsock device.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VsockState {
    pub guest_cid: u32,
    /// The socket host clients connected to.
    pub uds_path: PathBuf,
    /// Features the driver accepted.
    pub acked_features: u64,
}

/// What restoring a vsock device needs besides its state.
#[derive(Debug, Clone, Default)]
pub struct VsockRestoreArgs {
    /// Listen here instead of the saved path (`--vsock-override`).
    pub uds_path_override: Option<PathBuf>,
}

/// Why a saved vsock device cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum VsockRestoreError {
    #[error("cannot create the vsock device")]
    Create(#[source] VsockError),
    #[error("invalid acked features")]
    Features(#[source] FeaturesError),
}

impl Persist for Vsock {
    type State = VsockState;
    type RestoreArgs = VsockRestoreArgs;
    type Error = VsockRestoreError;

    fn save(&self) -> VsockState {
        VsockState {
            guest_cid: self.guest_cid(),
            uds_path: self.uds_path().to_path_buf(),
            acked_features: self.acked_features(),
        }
    }

    fn restore(args: VsockRestoreArgs, state: &VsockState) -> Result<Self, VsockRestoreError> {
        let config = VsockConfig {
            guest_cid: state.guest_cid,
            uds_path: args
                .uds_path_override
                .unwrap_or_else(|| state.uds_path.clone()),
        };
        // Checked before the socket is taken. `new` validates the CID and path.
        let mut vsock = {
            let offered = super::device::AVAIL_FEATURES;
            check_acked_features(offered, state.acked_features)
                .map_err(VsockRestoreError::Features)?;
            Vsock::new(&config).map_err(VsockRestoreError::Create)?
        };
        vsock.set_acked_features(state.acked_features);
        vsock.set_reset_event_pending();
        Ok(vsock)
    }
}
