//! Saving and restoring the legacy devices.
//!
//! Only the UART holds guest-visible state (its registers and receive FIFO). The i8042 and
//! the boot-complete port hold none: their states are empty structs, implemented explicitly
//! anyway so that a field added to either device later cannot be forgotten silently.
//!
//! What the serial console's host side holds is not saved: host input already read but not
//! yet in the FIFO belongs to the old console, and a restored VM has a console of its own.

use std::convert::Infallible;
use std::io::{self, Write};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;
use vmm_sys_util::eventfd::EventFd;

use super::boot_timer::BootCompletePort;
use super::{BootTimer, SerialDevice, I8042};
use crate::exit::ExitNotifier;
use crate::snapshot::Persist;

/// Receive FIFO size of vm-superio's UART.
const FIFO_SIZE: usize = 64;
/// Line status bits vm-superio's UART uses: data ready, THR empty, transmitter idle. The
/// last two are always set (output never waits).
const LSR_DATA_READY: u8 = 0x01;
const LSR_ALWAYS: u8 = 0x60;
/// Interrupt identification values the UART can hold: none pending, THR empty, data
/// available, or both.
const IIR_VALUES: [u8; 4] = [0x01, 0x02, 0x04, 0x06];
/// Interrupt enable bits of a 16550A; the UART drops the others on write.
const IER_VALID: u8 = 0x0f;

/// The saved UART: vm-superio's `SerialState`, which has no serde support of its own.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SerialDeviceState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Received bytes the guest has not read yet (at most 64).
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialDeviceState {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialDeviceState> for SerialState {
    fn from(s: &SerialDeviceState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// What restoring the UART needs: the same as [`SerialDevice::new`].
pub struct SerialRestoreArgs {
    /// Registered by the caller as the irqfd of IRQ 4.
    pub irq_evt: EventFd,
    /// Where guest output goes.
    pub out: Box<dyn Write + Send>,
    /// Signalled when the guest empties the receive FIFO.
    pub rx_space: Arc<EventFd>,
}

/// Why a saved UART cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum SerialRestoreError {
    #[error("saved receive FIFO holds {0} bytes; the UART's FIFO holds {FIFO_SIZE}")]
    Fifo(usize),
    #[error("saved UART register {register} = {value:#04x} is not a value the UART can hold")]
    Register { register: &'static str, value: u8 },
    #[error("cannot restore the UART")]
    Uart(#[source] vm_superio::serial::Error<io::Error>),
}

/// Checks the registers vm-superio derives its behaviour from; the others (divisor, line
/// and modem control, scratch) are plain guest-written bytes where any value is valid.
fn validate(state: &SerialDeviceState) -> Result<(), SerialRestoreError> {
    let bad = |register, value| Err(SerialRestoreError::Register { register, value });
    if state.in_buffer.len() > FIFO_SIZE {
        return Err(SerialRestoreError::Fifo(state.in_buffer.len()));
    }
    if state.interrupt_enable & !IER_VALID != 0 {
        return bad("IER", state.interrupt_enable);
    }
    if !IIR_VALUES.contains(&state.interrupt_identification) {
        return bad("IIR", state.interrupt_identification);
    }
    // Data ready is set exactly while the FIFO holds bytes.
    let lsr = LSR_ALWAYS
        | if state.in_buffer.is_empty() {
            0
        } else {
            LSR_DATA_READY
        };
    if state.line_status != lsr {
        return bad("LSR", state.line_status);
    }
    Ok(())
}

impl Persist for SerialDevice {
    type State = SerialDeviceState;
    type RestoreArgs = SerialRestoreArgs;
    type Error = SerialRestoreError;

    fn save(&self) -> SerialDeviceState {
        self.uart_state().into()
    }

    /// Re-raises the interrupt if the saved state has one pending and enabled (vm-superio's
    /// `from_state` does), so a guest waiting for it is not left hanging.
    fn restore(
        args: SerialRestoreArgs,
        state: &SerialDeviceState,
    ) -> Result<Self, SerialRestoreError> {
        validate(state)?;
        SerialDevice::from_uart_state(&state.into(), args.irq_evt, args.out, args.rx_space)
            .map_err(SerialRestoreError::Uart)
    }
}

/// The i8042 holds no state: it only forwards the reset command.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct I8042State {}

impl Persist for I8042 {
    type State = I8042State;
    /// Where the reset command is reported.
    type RestoreArgs = Arc<ExitNotifier>;
    type Error = Infallible;

    fn save(&self) -> I8042State {
        I8042State {}
    }

    fn restore(exit: Arc<ExitNotifier>, _state: &I8042State) -> Result<Self, Infallible> {
        Ok(I8042::new(exit))
    }
}

/// The boot-complete port holds no state of the guest. The boot time it records belongs to
/// the VMM process that booted the guest: a restored VM did not boot, so its timer starts
/// empty and stays so (the guest signals boot completion only once).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct BootCompletePortState {}

impl Persist for BootCompletePort {
    type State = BootCompletePortState;
    /// The restored VMM's timer.
    type RestoreArgs = Arc<BootTimer>;
    type Error = Infallible;

    fn save(&self) -> BootCompletePortState {
        BootCompletePortState {}
    }

    fn restore(timer: Arc<BootTimer>, _state: &BootCompletePortState) -> Result<Self, Infallible> {
        Ok(BootCompletePort(timer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restore(state: &SerialDeviceState) -> Result<SerialDevice, SerialRestoreError> {
        let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let args = SerialRestoreArgs {
            irq_evt: evt(),
            out: Box::new(io::sink()),
            rx_space: Arc::new(evt()),
        };
        SerialDevice::restore(args, state)
    }

    fn good() -> SerialDeviceState {
        SerialState::default().into()
    }

    #[test]
    fn default_and_full_fifo_states_restore() {
        restore(&good()).unwrap();
        let mut s = good();
        s.in_buffer = vec![b'x'; FIFO_SIZE];
        s.line_status |= LSR_DATA_READY;
        s.interrupt_identification = 0x04;
        s.interrupt_enable = 0x0f;
        assert_eq!(restore(&s).unwrap().save(), s);
    }

    #[test]
    fn corrupted_uart_states_are_refused() {
        let refused = |corrupt: fn(&mut SerialDeviceState)| {
            let mut s = good();
            corrupt(&mut s);
            restore(&s).err().expect("corrupted state accepted")
        };
        let e = refused(|s| {
            s.in_buffer = vec![0; FIFO_SIZE + 1];
            s.line_status |= LSR_DATA_READY;
        });
        assert!(matches!(e, SerialRestoreError::Fifo(65)), "{e}");
        for iir in [0x00, 0x03, 0x08, 0xc1] {
            let mut s = good();
            s.interrupt_identification = iir;
            let e = restore(&s).err().expect("bad IIR accepted");
            assert!(
                matches!(
                    e,
                    SerialRestoreError::Register {
                        register: "IIR",
                        ..
                    }
                ),
                "{e}"
            );
        }
        let e = refused(|s| s.interrupt_enable = 0x10);
        assert!(
            matches!(
                e,
                SerialRestoreError::Register {
                    register: "IER",
                    ..
                }
            ),
            "{e}"
        );
        // Data ready without data, data without data ready, an unused status bit.
        let e = refused(|s| s.line_status |= LSR_DATA_READY);
        assert!(
            matches!(
                e,
                SerialRestoreError::Register {
                    register: "LSR",
                    ..
                }
            ),
            "{e}"
        );
        let e = refused(|s| s.in_buffer = vec![1]);
        assert!(
            matches!(
                e,
                SerialRestoreError::Register {
                    register: "LSR",
                    ..
                }
            ),
            "{e}"
        );
        let e = refused(|s| s.line_status |= 0x02);
        assert!(
            matches!(
                e,
                SerialRestoreError::Register {
                    register: "LSR",
                    ..
                }
            ),
            "{e}"
        );
    }
}
