//! Saving and restoring a virtio-rng device: only the negotiated features. The host entropy
//! source is reopened, and the queue lives in the transport's state.

use serde::{Deserialize, Serialize};

use super::{Rng, RngError};
use crate::devices::virtio::device_state::{check_acked_features, FeaturesError};
use crate::devices::virtio::VirtioDevice;
use crate::snapshot::Persist;

/// The saved state of an entropy device.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RngState {
    /// Features the driver accepted.
    pub acked_features: u64,
}

/// Why a saved entropy device cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum RngRestoreError {
    #[error("cannot create the entropy device")]
    Create(#[source] RngError),
    #[error("invalid acked features")]
    Features(#[source] FeaturesError),
}

impl Persist for Rng {
    type State = RngState;
    type RestoreArgs = ();
    type Error = RngRestoreError;

    fn save(&self) -> RngState {
        RngState {
            acked_features: self.acked_features(),
        }
    }

    fn restore(_args: (), state: &RngState) -> Result<Self, RngRestoreError> {
        let mut rng = Rng::new().map_err(RngRestoreError::Create)?;
        check_acked_features(rng.avail_features(), state.acked_features)
            .map_err(RngRestoreError::Features)?;
        rng.set_acked_features(state.acked_features);
        Ok(rng)
    }
}
