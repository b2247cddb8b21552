//! Grove's boot-complete port (0x3f0): the guest init writes 123 there once user space is
//! up; the VMM records the time since it started. The boot benchmark reads this figure.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::boot::layout::BOOT_COMPLETE_VALUE;
use crate::devices::bus::BusDevice;

/// Shared record of when the guest signalled boot completion.
#[derive(Debug)]
pub struct BootTimer {
    start: Instant,
    completed: Mutex<Option<Duration>>,
}

impl BootTimer {
    pub fn new(start: Instant) -> Arc<Self> {
        Arc::new(Self {
            start,
            completed: Mutex::new(None),
        })
    }

    /// Time from VMM start to the guest's first write of the boot-complete value.
    pub fn boot_time(&self) -> Option<Duration> {
        *self
            .completed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self) {
        let mut slot = self
            .completed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            let elapsed = self.start.elapsed();
            *slot = Some(elapsed);
            // Stable format: the boot benchmark parses this line.
            log::info!(
                "guest boot complete: {:.3} ms after VMM start",
                elapsed.as_secs_f64() * 1000.0
            );
        }
    }
}

/// The port device writing into a [`BootTimer`].
pub struct BootCompletePort(pub Arc<BootTimer>);

impl BusDevice for BootCompletePort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.first() == Some(&BOOT_COMPLETE_VALUE) {
            self.0.record();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_the_magic_value_once() {
        let t = BootTimer::new(Instant::now());
        let mut port = BootCompletePort(t.clone());
        port.write(0, &[1]);
        assert!(t.boot_time().is_none());
        port.write(0, &[BOOT_COMPLETE_VALUE]);
        let first = t.boot_time().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        port.write(0, &[BOOT_COMPLETE_VALUE]);
        assert_eq!(t.boot_time(), Some(first));
    }
}
