//! Register-protocol tests for [`MmioTransport`], against a mock device.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::virtio::test_utils::guest_mem;
use crate::devices::virtio::{INT_CONFIG, INT_VRING, TYPE_BLOCK};

/// Offers VERSION_1 plus bits 0 and 33; records what the transport does to it.
struct MockDevice {
    evts: Vec<EventFd>,
    acked: u64,
    config: [u8; 8],
    activated: Option<(Vec<QueueView>, Arc<IrqTrigger>)>,
    queues: Vec<Queue>,
    resets: usize,
    fail_activate: bool,
}

/// What the device saw of each queue at activation: (ready, size, desc, avail, used).
type QueueView = (bool, u16, u64, u64, u64);

const MOCK_FEATURES: u64 = VIRTIO_F_VERSION_1 | 1 | (1 << 33);

impl MockDevice {
    fn new() -> Self {
        Self {
            evts: vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
            acked: 0,
            config: [1, 2, 3, 4, 5, 6, 7, 8],
            activated: None,
            queues: Vec::new(),
            resets: 0,
            fail_activate: false,
        }
    }
}

impl VirtioDevice for MockDevice {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn queue_events(&self) -> &[EventFd] {
        &self.evts
    }
    fn avail_features(&self) -> u64 {
        MOCK_FEATURES
    }
    fn acked_features(&self) -> u64 {
        self.acked
    }
    fn set_acked_features(&mut self, features: u64) {
        self.acked = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::super::device_state::read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Some(c) = self.config.get_mut(offset as usize + i) {
                *c = *b;
            }
        }
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.fail_activate {
            return Err(ActivateError::AlreadyActive);
        }
        let queues = ctx
            .queues
            .iter()
            .map(|q| {
                (
                    q.ready(),
                    q.size(),
                    q.desc_table(),
                    q.avail_ring(),
                    q.used_ring(),
                )
            })
            .collect();
        self.activated = Some((queues, ctx.interrupt));
        self.queues = ctx.queues;
        Ok(())
    }
    fn is_activated(&self) -> bool {
        self.activated.is_some()
    }
    fn set_pause_gate(&mut self, _gate: crate::devices::virtio::device_state::PauseGate) {}

    fn queues(&self) -> &[Queue] {
        &self.queues
    }
    fn reset(&mut self) {
        self.activated = None;
        self.queues.clear();
        self.resets += 1;
    }
}

fn setup() -> (MmioTransport, Arc<Mutex<MockDevice>>) {
    let dev = Arc::new(Mutex::new(MockDevice::new()));
    let t = MmioTransport::new(guest_mem(), dev.clone()).unwrap();
    (t, dev)
}

fn rd(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn wr(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// Drives the transport to FEATURES_OK with `features` accepted.
fn negotiate(t: &mut MmioTransport, features: u64) {
    wr(t, reg::STATUS, status::ACKNOWLEDGE);
    wr(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    wr(t, reg::DRIVER_FEATURES_SEL, 0);
    wr(t, reg::DRIVER_FEATURES, features as u32);
    wr(t, reg::DRIVER_FEATURES_SEL, 1);
    wr(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
    wr(
        t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
}

const UP_TO_FEATURES_OK: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;

/// Queue 0 at desc 0x1000, avail 0x2000, used 0x3000, size 8.
fn setup_queue(t: &mut MmioTransport) {
    wr(t, reg::QUEUE_SEL, 0);
    wr(t, reg::QUEUE_NUM, 8);
    wr(t, reg::QUEUE_DESC_LOW, 0x1000);
    wr(t, reg::QUEUE_DESC_HIGH, 0);
    wr(t, reg::QUEUE_DRIVER_LOW, 0x2000);
    wr(t, reg::QUEUE_DRIVER_HIGH, 0);
    wr(t, reg::QUEUE_DEVICE_LOW, 0x3000);
    wr(t, reg::QUEUE_DEVICE_HIGH, 0);
    wr(t, reg::QUEUE_READY, 1);
}

#[test]
fn identifies_as_modern_virtio_mmio() {
    let (mut t, _) = setup();
    assert_eq!(rd(&mut t, reg::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(rd(&mut t, reg::VERSION), 2);
    assert_eq!(rd(&mut t, reg::DEVICE_ID), TYPE_BLOCK);
    assert_eq!(rd(&mut t, reg::VENDOR_ID), VENDOR_ID);
    assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 16);
    wr(&mut t, reg::QUEUE_SEL, 1);
    assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 0, "no queue 1");
    assert_eq!(rd(&mut t, reg::SHM_LEN_LOW), u32::MAX);
    assert_eq!(rd(&mut t, reg::CONFIG_GENERATION), 0);
}

#[test]
fn rejects_devices_without_version_1() {
    struct Legacy(MockDevice);
    impl VirtioDevice for Legacy {
        fn device_type(&self) -> u32 {
            self.0.device_type()
        }
        fn queue_max_sizes(&self) -> &[u16] {
            self.0.queue_max_sizes()
        }
        fn queue_events(&self) -> &[EventFd] {
            self.0.queue_events()
        }
        fn avail_features(&self) -> u64 {
            1
        }
        fn acked_features(&self) -> u64 {
            0
        }
        fn set_acked_features(&mut self, _: u64) {}
        fn read_config(&self, _: u64, _: &mut [u8]) {}
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(&mut self, _: ActivateContext) -> Result<(), ActivateError> {
            Ok(())
        }
        fn is_activated(&self) -> bool {
            false
        }
        fn set_pause_gate(&mut self, _gate: crate::devices::virtio::device_state::PauseGate) {}

        fn queues(&self) -> &[Queue] {
            self.0.queues()
        }
        fn reset(&mut self) {}
    }
    let dev = Arc::new(Mutex::new(Legacy(MockDevice::new())));
    assert!(matches!(
        MmioTransport::new(guest_mem(), dev),
        Err(MmioError::NoVersion1(TYPE_BLOCK))
    ));
}

#[test]
fn negotiates_features_across_selector_pages() {
    let (mut t, dev) = setup();
    wr(&mut t, reg::DEVICE_FEATURES_SEL, 0);
    assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 1);
    wr(&mut t, reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 0b11);
    wr(&mut t, reg::DEVICE_FEATURES_SEL, 2);
    assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 0);

    // Before DRIVER is set, feature writes are ignored.
    wr(&mut t, reg::DRIVER_FEATURES, 1);
    assert_eq!(dev.lock().unwrap().acked, 0);

    // Unoffered bits (2 and 34) are dropped; each page replaces only its own half.
    negotiate(&mut t, 0b101 | (0b111 << 32));
    assert_eq!(dev.lock().unwrap().acked, MOCK_FEATURES);
    assert_eq!(rd(&mut t, reg::STATUS), UP_TO_FEATURES_OK);

    // After FEATURES_OK the features are frozen.
    wr(&mut t, reg::DRIVER_FEATURES_SEL, 0);
    wr(&mut t, reg::DRIVER_FEATURES, 0);
    assert_eq!(dev.lock().unwrap().acked, MOCK_FEATURES);
}

#[test]
fn features_ok_refused_without_version_1() {
    let (mut t, _) = setup();
    negotiate(&mut t, 1);
    assert_eq!(
        rd(&mut t, reg::STATUS),
        status::ACKNOWLEDGE | status::DRIVER,
        "FEATURES_OK must not read back"
    );
    // Queue registers stay closed, DRIVER_OK cannot follow.
    wr(&mut t, reg::QUEUE_READY, 1);
    assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
    wr(&mut t, reg::STATUS, UP_TO_FEATURES_OK | status::DRIVER_OK);
    assert_eq!(rd(&mut t, reg::STATUS) & status::DRIVER_OK, 0);
}

#[test]
fn status_bits_must_come_in_order() {
    let (mut t, _) = setup();
    wr(&mut t, reg::STATUS, status::DRIVER);
    assert_eq!(rd(&mut t, reg::STATUS), 0);
    wr(
        &mut t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::FEATURES_OK,
    );
    assert_eq!(rd(&mut t, reg::STATUS), 0);
    wr(&mut t, reg::STATUS, status::ACKNOWLEDGE);
    wr(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    // Clearing a bit without a reset is refused.
    wr(&mut t, reg::STATUS, status::ACKNOWLEDGE);
    assert_eq!(
        rd(&mut t, reg::STATUS),
        status::ACKNOWLEDGE | status::DRIVER
    );
    // The driver may always give up.
    wr(&mut t, reg::STATUS, status::FAILED);
    assert_eq!(
        rd(&mut t, reg::STATUS),
        status::ACKNOWLEDGE | status::DRIVER | status::FAILED
    );
}

#[test]
fn driver_ok_activates_with_the_configured_queue() {
    let (mut t, dev) = setup();
    negotiate(&mut t, MOCK_FEATURES);
    setup_queue(&mut t);
    assert_eq!(rd(&mut t, reg::QUEUE_READY), 1);
    assert!(dev.lock().unwrap().activated.is_none());
    wr(&mut t, reg::STATUS, UP_TO_FEATURES_OK | status::DRIVER_OK);
    assert_eq!(
        rd(&mut t, reg::STATUS),
        UP_TO_FEATURES_OK | status::DRIVER_OK
    );
    let d = dev.lock().unwrap();
    let (queues, irq) = d.activated.as_ref().expect("device activated");
    assert_eq!(queues, &vec![(true, 8, 0x1000, 0x2000, 0x3000)]);
    assert!(Arc::ptr_eq(irq, t.interrupt()));
}

#[test]
fn queue_registers_are_frozen_after_driver_ok() {
    let (mut t, _) = setup();
    negotiate(&mut t, MOCK_FEATURES);
    setup_queue(&mut t);
    wr(&mut t, reg::STATUS, UP_TO_FEATURES_OK | status::DRIVER_OK);
    wr(&mut t, reg::QUEUE_READY, 0);
    assert_eq!(rd(&mut t, reg::QUEUE_READY), 1);
    wr(&mut t, reg::QUEUE_DESC_LOW, 0x5000);
    assert_eq!(t.queues[0].desc, 0x1000);
    wr(&mut t, reg::QUEUE_NUM, 4);
    assert_eq!(t.queues[0].size, 8);
}

#[test]
fn queue_registers_closed_before_features_ok() {
    let (mut t, _) = setup();
    wr(&mut t, reg::STATUS, status::ACKNOWLEDGE);
    wr(&mut t, reg::QUEUE_READY, 1);
    wr(&mut t, reg::QUEUE_DESC_LOW, 0x1000);
    assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
    assert_eq!(t.queues[0].desc, 0);
}

#[test]
fn invalid_queue_fails_activation_with_needs_reset() {
    for bad in [
        (reg::QUEUE_DESC_HIGH, 0x1),   // beyond guest memory
        (reg::QUEUE_DESC_LOW, 0x1001), // misaligned
        (reg::QUEUE_NUM, 6),           // not a power of two
        (reg::QUEUE_NUM, 32),          // above QueueNumMax
        // Rings that start inside guest memory but end past it: 8 descriptors need 128
        // bytes, 8 used entries 70.
        (reg::QUEUE_DESC_LOW, 0xf_ff80 + 16),
        (reg::QUEUE_DRIVER_LOW, 0xf_fff0),
        (reg::QUEUE_DEVICE_LOW, 0xf_ffc0),
        (reg::QUEUE_DEVICE_HIGH, 0xffff_ffff), // wraps 2^64
    ] {
        let (mut t, dev) = setup();
        negotiate(&mut t, MOCK_FEATURES);
        setup_queue(&mut t);
        wr(&mut t, bad.0, bad.1);
        wr(&mut t, reg::STATUS, UP_TO_FEATURES_OK | status::DRIVER_OK);
        assert!(dev.lock().unwrap().activated.is_none(), "{bad:x?}");
        assert_ne!(rd(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_CONFIG);
        assert_eq!(t.interrupt().eventfd().read().unwrap(), 1);
    }
}

#[test]
fn device_refusal_sets_needs_reset_and_reset_recovers() {
    let (mut t, dev) = setup();
    dev.lock().unwrap().fail_activate = true;
    negotiate(&mut t, MOCK_FEATURES);
    setup_queue(&mut t);
    wr(&mut t, reg::STATUS, UP_TO_FEATURES_OK | status::DRIVER_OK);
    let st = rd(&mut t, reg::STATUS);
    assert_ne!(st & status::DEVICE_NEEDS_RESET, 0);
    // The driver cannot clear DEVICE_NEEDS_RESET itself.
    wr(&mut t, reg::STATUS, st & !status::DEVICE_NEEDS_RESET);
    assert_eq!(rd(&mut t, reg::STATUS), st);
    wr(&mut t, reg::STATUS, 0);
    assert_eq!(rd(&mut t, reg::STATUS), 0);
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);
}

#[test]
fn needs_reset_raised_by_the_device_shows_in_status_until_reset() {
    let (mut t, _dev) = setup();
    negotiate(&mut t, MOCK_FEATURES);
    setup_queue(&mut t);
    wr(&mut t, reg::STATUS, UP_TO_FEATURES_OK | status::DRIVER_OK);
    assert_eq!(rd(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    // What the event loop does when it stops trusting a ring.
    t.interrupt().set_needs_reset();
    let st = rd(&mut t, reg::STATUS);
    assert_eq!(
        st,
        UP_TO_FEATURES_OK | status::DRIVER_OK | status::DEVICE_NEEDS_RESET
    );
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_CONFIG);
    // The driver cannot clear it, nor does a later status write lose it.
    wr(&mut t, reg::STATUS, st & !status::DEVICE_NEEDS_RESET);
    assert_eq!(rd(&mut t, reg::STATUS), st);
    // A snapshot keeps it.
    assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
    wr(&mut t, reg::STATUS, 0);
    assert_eq!(rd(&mut t, reg::STATUS), 0);
    assert!(!t.interrupt().needs_reset());
}

#[test]
fn unready_queue_is_handed_over_unready() {
    let (mut t, dev) = setup();
    negotiate(&mut t, MOCK_FEATURES);
    wr(&mut t, reg::QUEUE_DESC_HIGH, 0xffff); // garbage, but the queue is not enabled
    wr(&mut t, reg::STATUS, UP_TO_FEATURES_OK | status::DRIVER_OK);
    let d = dev.lock().unwrap();
    let (queues, _) = d.activated.as_ref().expect("device activated");
    assert!(!queues[0].0);
}

#[test]
fn reset_clears_device_queues_and_interrupts() {
    let (mut t, dev) = setup();
    negotiate(&mut t, MOCK_FEATURES);
    setup_queue(&mut t);
    wr(&mut t, reg::STATUS, UP_TO_FEATURES_OK | status::DRIVER_OK);
    t.interrupt().trigger(INT_VRING).unwrap();
    wr(&mut t, reg::STATUS, 0);
    assert_eq!(rd(&mut t, reg::STATUS), 0);
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);
    assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
    assert_eq!(t.queues[0].desc, 0);
    assert_eq!(t.queues[0].size, 16);
    let d = dev.lock().unwrap();
    assert!(d.activated.is_none());
    assert_eq!(d.resets, 1);
    assert_eq!(d.acked, 0);
    drop(d);
    // A second initialisation works.
    negotiate(&mut t, MOCK_FEATURES);
    setup_queue(&mut t);
    wr(&mut t, reg::STATUS, UP_TO_FEATURES_OK | status::DRIVER_OK);
    assert!(dev.lock().unwrap().activated.is_some());
}

#[test]
fn interrupt_status_and_ack() {
    let (mut t, _) = setup();
    t.interrupt().trigger(INT_VRING | INT_CONFIG).unwrap();
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_VRING | INT_CONFIG);
    wr(&mut t, reg::INTERRUPT_ACK, INT_VRING);
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_CONFIG);
    wr(&mut t, reg::INTERRUPT_ACK, INT_CONFIG);
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);
}

#[test]
fn queue_notify_signals_the_queue_eventfd() {
    let (mut t, dev) = setup();
    wr(&mut t, reg::QUEUE_NOTIFY, 0);
    wr(&mut t, reg::QUEUE_NOTIFY, 7); // no such queue: ignored
    assert_eq!(dev.lock().unwrap().evts[0].read().unwrap(), 1);
}

#[test]
fn config_space_accepts_small_accesses() {
    let (mut t, dev) = setup();
    let mut b1 = [0u8; 1];
    t.read(reg::CONFIG + 2, &mut b1);
    assert_eq!(b1, [3]);
    let mut b2 = [0u8; 2];
    t.read(reg::CONFIG + 6, &mut b2);
    assert_eq!(b2, [7, 8]);
    let mut b8 = [0u8; 8];
    t.read(reg::CONFIG + 4, &mut b8);
    assert_eq!(b8, [5, 6, 7, 8, 0, 0, 0, 0]);
    let mut b3 = [0xffu8; 3];
    t.read(reg::CONFIG, &mut b3);
    assert_eq!(b3, [0; 3], "3-byte access is invalid");
    t.write(reg::CONFIG, &[9]);
    t.write(reg::CONFIG + 1, &[9, 9, 9]);
    assert_eq!(dev.lock().unwrap().config[..2], [9, 2]);
}

#[test]
fn bad_register_accesses_are_ignored() {
    let (mut t, _) = setup();
    let mut b2 = [0xffu8; 2];
    t.read(reg::MAGIC_VALUE, &mut b2);
    assert_eq!(b2, [0, 0]);
    let mut b4 = [0xffu8; 4];
    t.read(reg::MAGIC_VALUE + 1, &mut b4);
    assert_eq!(b4, [0; 4], "unaligned");
    t.write(reg::STATUS, &[status::ACKNOWLEDGE as u8]);
    assert_eq!(rd(&mut t, reg::STATUS), 0, "1-byte status write ignored");
    t.write(reg::STATUS, &u64::from(status::ACKNOWLEDGE).to_le_bytes());
    assert_eq!(rd(&mut t, reg::STATUS), 0, "8-byte status write ignored");
    wr(&mut t, reg::MAGIC_VALUE, 0);
    assert_eq!(rd(&mut t, reg::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(rd(&mut t, 0x0f0), 0, "reserved register");
}
