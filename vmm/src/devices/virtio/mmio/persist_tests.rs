//! Restoring [`MmioTransport`] from corrupted states: every bad value is an error naming
//! what is wrong, never a panic and never a device running on an unchecked queue.

use std::sync::{Arc, Mutex};

use super::*;
use crate::devices::virtio::rng::{Rng, RngState};
use crate::devices::virtio::test_utils::{bring_up, guest_mem, Driver, MEM_SIZE};

/// The state of a running rng transport, and the acked features of its device.
fn running_state() -> (MmioTransportState, RngState) {
    let mem = guest_mem();
    let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
    let mut t = MmioTransport::new(mem.clone(), rng.clone()).unwrap();
    bring_up(&mut t, &Driver::new(&mem, 16), true);
    let device = rng.lock().unwrap().save();
    (t.save(), device)
}

/// Restores `state` onto a fresh device restored from `device`.
fn restore(
    state: &MmioTransportState,
    device: &RngState,
) -> Result<(MmioTransport, Arc<Mutex<Rng>>), MmioRestoreError> {
    let rng = Arc::new(Mutex::new(Rng::restore((), device).unwrap()));
    let args = MmioTransportRestoreArgs {
        mem: guest_mem(),
        device: rng.clone(),
    };
    MmioTransport::restore(args, state).map(|t| (t, rng))
}

/// Applies `corrupt` to a good running state and returns the restore error.
fn refused(corrupt: impl FnOnce(&mut MmioTransportState, &mut RngState)) -> MmioRestoreError {
    let (mut state, mut device) = running_state();
    corrupt(&mut state, &mut device);
    match restore(&state, &device) {
        Ok(_) => panic!("corrupted state was accepted: {state:?}"),
        Err(e) => e,
    }
}

fn queue(state: &mut MmioTransportState) -> &mut VirtqueueState {
    &mut state.active_queues.as_mut().expect("running")[0]
}

#[test]
fn a_good_state_restores_and_runs() {
    let (state, device) = running_state();
    let (t, rng) = restore(&state, &device).unwrap();
    assert!(rng.lock().unwrap().is_activated());
    assert_eq!(t.save(), state);
}

#[test]
fn queue_positions_are_taken_as_saved() {
    // Any ring position is one a driver can be at: indices wrap freely.
    let (mut state, device) = running_state();
    let q = queue(&mut state);
    (q.next_avail, q.next_used) = (u16::MAX, 7);
    let (t, rng) = restore(&state, &device).unwrap();
    let rng = rng.lock().unwrap();
    assert_eq!(
        (rng.queues()[0].next_avail(), rng.queues()[0].next_used()),
        (u16::MAX, 7)
    );
    drop(rng);
    assert_eq!(t.save(), state);
}

#[test]
fn queue_outside_guest_memory_is_refused() {
    let e = refused(|s, _| {
        let outside = MEM_SIZE as u64;
        queue(s).desc_table = outside;
        s.queues[0].desc = outside;
    });
    assert!(
        matches!(e, MmioRestoreError::QueueMemory { index: 0 }),
        "{e}"
    );
    let e = refused(|s, _| {
        queue(s).used_ring = u64::MAX - 3;
        s.queues[0].device = u64::MAX - 3;
    });
    assert!(
        matches!(e, MmioRestoreError::QueueMemory { index: 0 }),
        "{e}"
    );
}

#[test]
fn bad_queue_sizes_and_alignment_are_refused() {
    let e = refused(|s, _| {
        queue(s).size = 15;
        s.queues[0].size = 15;
    });
    assert!(
        matches!(e, MmioRestoreError::QueueState { index: 0, .. }),
        "{e}"
    );
    let e = refused(|s, _| {
        queue(s).size = 0;
        s.queues[0].size = 0;
    });
    assert!(matches!(e, MmioRestoreError::QueueState { .. }), "{e}");
    let e = refused(|s, _| {
        queue(s).desc_table = 0x1001;
        s.queues[0].desc = 0x1001;
    });
    assert!(matches!(e, MmioRestoreError::QueueState { .. }), "{e}");
    let e = refused(|s, _| queue(s).max_size = 128);
    assert!(
        matches!(e, MmioRestoreError::QueueMaxSize { saved: 128, .. }),
        "{e}"
    );
}

#[test]
fn queue_inconsistent_with_registers_or_features_is_refused() {
    let e = refused(|s, _| s.queues[0].desc = 0x2000);
    assert!(matches!(e, MmioRestoreError::QueueRegs { index: 0 }), "{e}");
    let e = refused(|s, _| s.queues[0].ready = false);
    assert!(matches!(e, MmioRestoreError::QueueRegs { .. }), "{e}");
    let e = refused(|s, _| queue(s).event_idx_enabled = false);
    assert!(
        matches!(e, MmioRestoreError::QueueEventIdx { index: 0 }),
        "{e}"
    );
    // A queue the device disabled (corrupt ring) is restored disabled, registers aside.
    let (mut state, device) = running_state();
    queue(&mut state).ready = false;
    restore(&state, &device).unwrap();
}

#[test]
fn wrong_device_or_queue_count_is_refused() {
    let e = refused(|s, _| s.device_type = crate::devices::virtio::TYPE_BLOCK);
    assert!(
        matches!(
            e,
            MmioRestoreError::DeviceType {
                saved: 2,
                actual: 4
            }
        ),
        "{e}"
    );
    let e = refused(|s, _| s.queues.push(s.queues[0].clone()));
    assert!(
        matches!(
            e,
            MmioRestoreError::QueueCount {
                saved: 2,
                actual: 1
            }
        ),
        "{e}"
    );
    let e = refused(|s, _| s.active_queues = Some(Vec::new()));
    assert!(
        matches!(
            e,
            MmioRestoreError::QueueCount {
                saved: 0,
                actual: 1
            }
        ),
        "{e}"
    );
}

#[test]
fn unreachable_status_and_activation_mismatch_are_refused() {
    for status in [
        status::DRIVER,
        status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        status::ACKNOWLEDGE | status::DEVICE_NEEDS_RESET,
        0x100 | status::ACKNOWLEDGE,
    ] {
        let e = refused(|s, _| {
            s.status = status;
            s.active_queues = None;
        });
        assert!(matches!(e, MmioRestoreError::Status(_)), "{status:#x}: {e}");
    }
    // Running without DRIVER_OK, or not running with it.
    let e = refused(|s, _| s.status &= !status::DRIVER_OK);
    assert!(matches!(e, MmioRestoreError::Activation { .. }), "{e}");
    let e = refused(|s, _| s.active_queues = None);
    assert!(matches!(e, MmioRestoreError::Activation { .. }), "{e}");
    // DEVICE_NEEDS_RESET on a running device needs the queue it stopped.
    let e = refused(|s, _| s.status |= status::DEVICE_NEEDS_RESET);
    assert!(matches!(e, MmioRestoreError::Activation { .. }), "{e}");
    // FEATURES_OK is only reachable with VIRTIO_F_VERSION_1 acked.
    let e = refused(|_, d| d.acked_features = 0);
    assert!(matches!(e, MmioRestoreError::NoVersion1(_)), "{e}");
}

#[test]
fn failed_activation_and_failed_driver_states_restore() {
    // DRIVER_OK with DEVICE_NEEDS_RESET: activation failed, the device does not run.
    let (mut state, device) = running_state();
    state.status |= status::DEVICE_NEEDS_RESET;
    state.active_queues = None;
    state.interrupt_status = INT_CONFIG;
    let (t, rng) = restore(&state, &device).unwrap();
    assert!(!rng.lock().unwrap().is_activated());
    assert_eq!(t.save(), state);
    // FAILED keeps a running device running.
    let (mut state, device) = running_state();
    state.status |= status::FAILED;
    let (_, rng) = restore(&state, &device).unwrap();
    assert!(rng.lock().unwrap().is_activated());
}

#[test]
fn a_device_stopped_by_a_corrupt_ring_restores_stopped() {
    // What the event loop leaves behind when it stops trusting a ring: the device keeps its
    // queues, that one disabled, and Status reads DEVICE_NEEDS_RESET.
    let mem = guest_mem();
    let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
    let mut t = MmioTransport::new(mem.clone(), rng.clone()).unwrap();
    bring_up(&mut t, &Driver::new(&mem, 16), true);
    t.interrupt().set_needs_reset();
    let device = rng.lock().unwrap().save();
    let mut state = t.save();
    assert_ne!(state.status & status::DEVICE_NEEDS_RESET, 0);
    queue(&mut state).ready = false;

    let (t, rng) = restore(&state, &device).unwrap();
    assert!(rng.lock().unwrap().is_activated());
    assert!(!rng.lock().unwrap().queues()[0].ready());
    assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(t.save(), state);
}

#[test]
fn bad_interrupt_status_is_refused() {
    let e = refused(|s, _| s.interrupt_status = 0x4);
    assert!(matches!(e, MmioRestoreError::InterruptStatus(4)), "{e}");
}

#[test]
fn an_active_device_is_refused() {
    let (state, device) = running_state();
    let (_t, rng) = restore(&state, &device).unwrap();
    let args = MmioTransportRestoreArgs {
        mem: guest_mem(),
        device: rng,
    };
    let e = MmioTransport::restore(args, &state).err().expect("refused");
    assert!(matches!(e, MmioRestoreError::DeviceActive), "{e}");
}

#[test]
fn unknown_fields_are_refused_by_the_decoder() {
    let (state, _) = running_state();
    let mut json = serde_json::to_value(&state).unwrap();
    json["surprise"] = serde_json::json!(1);
    assert!(serde_json::from_value::<MmioTransportState>(json).is_err());
    let mut json = serde_json::to_value(&state).unwrap();
    json["queues"][0]["surprise"] = serde_json::json!(1);
    assert!(serde_json::from_value::<MmioTransportState>(json).is_err());
}
