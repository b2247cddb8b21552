//! The minimum of an i8042 keyboard controller that a guest uses to reset the machine:
//! Linux with `reboot=k` writes the "pulse reset line" command (0xfe) to port 0x64.
//! That ends the VM cleanly (exit code 0), which is how a Grove guest shuts down.

use std::sync::Arc;

use crate::devices::bus::BusDevice;
use crate::exit::{ExitNotifier, VmExit};

/// Offset of the command/status port (0x64) from the data port (0x60).
const COMMAND_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

/// i8042 controller at ports 0x60-0x64.
pub struct I8042 {
    exit: Arc<ExitNotifier>,
}

impl I8042 {
    pub fn new(exit: Arc<ExitNotifier>) -> Self {
        Self { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: input and output buffers empty, so `kb_wait()` in the guest returns at once.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            log::info!("guest requested a reset through the i8042 controller");
            self.exit.notify(VmExit::GuestReset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_ends_the_vm() {
        let exit = Arc::new(ExitNotifier::new().unwrap());
        let mut dev = I8042::new(exit.clone());
        let mut status = [0xffu8];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status, [0]);
        dev.write(0, &[CMD_RESET_CPU]);
        assert_eq!(exit.reason(), None, "0xfe on the data port is not a reset");
        dev.write(COMMAND_OFFSET, &[0xaa]);
        assert_eq!(exit.reason(), None);
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(exit.reason(), Some(VmExit::GuestReset));
    }
}
