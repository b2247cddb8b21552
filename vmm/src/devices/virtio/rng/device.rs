//! The virtio-rng device: features and event-loop wiring.

use std::fs::File;
use std::io;
use std::path::PathBuf;

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::debug;
use vmm_sys_util::eventfd::EventFd;

use super::handler::EntropySource;
use super::QUEUE_SIZE;
use crate::devices::virtio::device_state::{DeviceState, Wakeup};
use crate::devices::virtio::{
    ActivateContext, ActivateError, VirtioDevice, TYPE_RNG, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};

/// The host's non-blocking CSPRNG (the same pool as getrandom(2)). Read through a file
/// rather than the syscall to keep the device free of `unsafe`.
const ENTROPY_PATH: &str = "/dev/urandom";

/// Errors building an entropy device.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("cannot open the host entropy source {}", .path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the device eventfds")]
    EventFd(#[source] io::Error),
}

/// A virtio-rng device with one request queue, served on the event-loop thread.
pub struct Rng {
    state: DeviceState,
    entropy: EntropySource,
}

impl Rng {
    /// An entropy device fed from the host's `/dev/urandom`.
    pub fn new() -> Result<Self, RngError> {
        let source = File::open(ENTROPY_PATH).map_err(|source| RngError::Open {
            path: PathBuf::from(ENTROPY_PATH),
            source,
        })?;
        Ok(Self {
            state: DeviceState::new(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX, &[QUEUE_SIZE])
                .map_err(RngError::EventFd)?,
            entropy: EntropySource::new(source),
        })
    }

    /// The eventfd the event loop watches for activation and reset.
    pub fn activate_event(&self) -> &EventFd {
        self.state.activate_event()
    }

    fn process_queue(&mut self) {
        let entropy = &mut self.entropy;
        self.state
            .process_queue(0, |mem, chain| entropy.process_chain(mem, chain));
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    crate::devices::virtio::delegate_to_device_state!();

    /// virtio-rng has no configuration space.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!(
            "virtio-rng: ignored {}-byte config write at {offset:#x}",
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

impl MutEventSubscriber for Rng {
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
