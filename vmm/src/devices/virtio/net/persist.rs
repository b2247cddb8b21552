//! Saving and restoring a virtio-net device.
//!
//! Saved: the device's id, its TAP's name, the MAC and the negotiated features; the queues
//! live in the transport's state. On restore the TAP is opened again by name in the
//! restoring process's network namespace, so every clone of one snapshot attaches to its own
//! `tap0` when each runs in a namespace of its own (`docs/networking.md`), with the guest's
//! MAC and addresses unchanged. `--net-override ID=TAP` rewrites the saved name before the
//! restore ([`crate::device_manager::apply_net_overrides`]).
//!
//! A frame the device had read from the TAP but not yet delivered is not saved: like a
//! packet lost on the wire, the guest's protocols recover from it.

use serde::{Deserialize, Serialize};

use super::tap::check_ifname;
use super::{MacAddr, Net, NetDeviceConfig, NetError};
use crate::devices::virtio::device_state::{check_acked_features, FeaturesError};
use crate::devices::virtio::VirtioDevice;
use crate::snapshot::Persist;

/// The saved state of a network device.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetState {
    /// The device's id (`net0`, ... unless the configuration named it).
    pub id: String,
    /// The TAP's interface name.
    pub tap: String,
    pub mac: MacAddr,
    /// Features the driver accepted.
    pub acked_features: u64,
}

/// Why a saved network device cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum NetRestoreError {
    #[error("invalid TAP name {name:?} in the snapshot: {reason}")]
    TapName { name: String, reason: &'static str },
    #[error("cannot reopen the TAP")]
    Open(#[source] NetError),
    #[error("invalid acked features")]
    Features(#[source] FeaturesError),
}

impl Persist for Net {
    type State = NetState;
    type RestoreArgs = ();
    type Error = NetRestoreError;

    fn save(&self) -> NetState {
        NetState {
            id: self.id().to_string(),
            tap: self.tap_name().to_string(),
            mac: self.mac(),
            acked_features: self.acked_features(),
        }
    }

    fn restore(_args: (), state: &NetState) -> Result<Self, NetRestoreError> {
        check_ifname(&state.tap).map_err(|reason| NetRestoreError::TapName {
            name: state.tap.clone(),
            reason,
        })?;
        let mut net = Net::new(NetDeviceConfig {
            tap: state.tap.clone(),
            mac: state.mac,
            id: state.id.clone(),
        })
        .map_err(NetRestoreError::Open)?;
        check_acked_features(net.avail_features(), state.acked_features)
            .map_err(NetRestoreError::Features)?;
        net.set_acked_features(state.acked_features);
        Ok(net)
    }
}
