//! The 8250 serial console (vm-superio's UART at 0x3f8, IRQ 4) and its host side: guest
//! output goes to a writer (stdout or a file); host input (stdin) is fed into the UART's
//! receive FIFO from the event loop, holding back what does not fit until the guest has
//! drained the FIFO, so pasted or piped input is never dropped.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, PoisonError};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;

/// Raises the UART's interrupt through an irqfd.
pub struct IrqFdTrigger(pub EventFd);

impl Trigger for IrqFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Tells the input side when the guest emptied the receive FIFO.
pub struct RxSpaceEvents(Arc<EventFd>);

impl SerialEvents for RxSpaceEvents {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {
        log::debug!("serial: lost an output byte");
    }
    fn in_buffer_empty(&self) {
        if let Err(e) = self.0.write(1) {
            log::warn!("serial: cannot signal free input space: {e}");
        }
    }
}

/// Guest console output: written and flushed byte by byte so partial lines (prompts) show.
pub struct ConsoleOutput(pub Box<dyn Write + Send>);

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.0.write(buf)?;
        self.0.flush()?;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

type Uart = Serial<IrqFdTrigger, RxSpaceEvents, ConsoleOutput>;

/// The UART on the port I/O bus.
pub struct SerialDevice {
    uart: Uart,
}

impl SerialDevice {
    /// A UART raising `irq_evt` (registered by the caller as the irqfd of IRQ 4) and writing
    /// guest output to `out`. `rx_space` is signalled when the guest empties the input FIFO.
    pub fn new(irq_evt: EventFd, out: Box<dyn Write + Send>, rx_space: Arc<EventFd>) -> Self {
        Self {
            uart: Serial::with_events(
                IrqFdTrigger(irq_evt),
                RxSpaceEvents(rx_space),
                ConsoleOutput(out),
            ),
        }
    }

    /// A UART resuming from saved registers and receive FIFO; the other arguments are those
    /// of [`new`](Self::new). Fails if `state` holds more than the FIFO's 64 bytes or an
    /// interrupt it must re-raise cannot be injected.
    pub(super) fn from_uart_state(
        state: &SerialState,
        irq_evt: EventFd,
        out: Box<dyn Write + Send>,
        rx_space: Arc<EventFd>,
    ) -> Result<Self, vm_superio::serial::Error<io::Error>> {
        Ok(Self {
            uart: Serial::from_state(
                state,
                IrqFdTrigger(irq_evt),
                RxSpaceEvents(rx_space),
                ConsoleOutput(out),
            )?,
        })
    }

    /// Injects IRQ 4 again if the UART has an interrupt pending (IIR not "none"); see
    /// `MmioTransport::reassert_interrupt` for why a restore does this.
    pub fn reassert_interrupt(&self) -> io::Result<()> {
        const IIR_NONE: u8 = 0x01;
        if self.uart.state().interrupt_identification & IIR_NONE == 0 {
            self.uart.interrupt_evt().trigger()?;
        }
        Ok(())
    }

    /// The UART registers and receive FIFO, for snapshots.
    pub(super) fn uart_state(&self) -> SerialState {
        self.uart.state()
    }

    /// Moves as much of `pending` into the receive FIFO as fits.
    fn feed(&mut self, pending: &mut VecDeque<u8>) {
        let room = self.uart.fifo_capacity().min(pending.len());
        if room == 0 {
            return;
        }
        let chunk: Vec<u8> = pending.iter().take(room).copied().collect();
        match self.uart.enqueue_raw_bytes(&chunk) {
            Ok(n) => {
                pending.drain(..n);
            }
            Err(e) => log::warn!("serial: cannot queue input: {e:?}"),
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(off), 1) => data[0] = self.uart.read(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [value]) = (u8::try_from(offset), data) {
            if let Err(e) = self.uart.write(off, *value) {
                log::warn!("serial: write failed: {e:?}");
            }
        }
    }
}

/// Stops reading the host input while this much is waiting for the guest.
const PENDING_LIMIT: usize = 64 * 1024;

/// Event-loop side of the console input: reads `input` (usually stdin) and feeds the UART.
pub struct ConsoleInput {
    serial: Arc<Mutex<SerialDevice>>,
    input: Box<dyn ReadFd>,
    rx_space: Arc<EventFd>,
    pending: VecDeque<u8>,
    input_registered: bool,
    input_eof: bool,
}

/// A readable file descriptor (stdin, a pipe in tests).
pub trait ReadFd: Read + AsRawFd + Send {}
impl<T: Read + AsRawFd + Send> ReadFd for T {}

impl ConsoleInput {
    pub fn new(
        serial: Arc<Mutex<SerialDevice>>,
        input: Box<dyn ReadFd>,
        rx_space: Arc<EventFd>,
    ) -> Self {
        Self {
            serial,
            input,
            rx_space,
            pending: VecDeque::new(),
            input_registered: false,
            input_eof: false,
        }
    }

    fn input_fd(&self) -> RawFd {
        self.input.as_raw_fd()
    }

    fn feed(&mut self) {
        self.serial
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .feed(&mut self.pending);
    }

    /// Watches the input only while little is pending (back-pressure towards the host).
    fn update_input_interest(&mut self, ops: &mut EventOps) {
        let want = !self.input_eof && self.pending.len() < PENDING_LIMIT;
        let event = events_for_fd(self.input_fd());
        if want && !self.input_registered {
            match ops.add(event) {
                Ok(()) => self.input_registered = true,
                Err(e) => {
                    // A regular file or /dev/null cannot be polled: run without console input.
                    log::debug!("console input not pollable, ignoring it: {e:?}");
                    self.input_eof = true;
                }
            }
        } else if !want && self.input_registered {
            if let Err(e) = ops.remove(event) {
                log::warn!("cannot stop watching console input: {e:?}");
            }
            self.input_registered = false;
        }
    }

    fn read_input(&mut self) {
        let mut buf = [0u8; 4096];
        match self.input.read(&mut buf) {
            Ok(0) => self.input_eof = true,
            Ok(n) => self.pending.extend(&buf[..n]),
            Err(e)
                if e.kind() == io::ErrorKind::Interrupted
                    || e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                log::warn!("console input failed, ignoring it from now on: {e}");
                self.input_eof = true;
            }
        }
    }
}

fn events_for_fd(fd: RawFd) -> Events {
    Events::new_raw(fd, EventSet::IN)
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.rx_space.as_ref(), EventSet::IN)) {
            log::error!("cannot watch serial input space: {e:?}");
        }
        self.update_input_interest(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.rx_space.as_raw_fd() {
            let _ = self.rx_space.read();
        } else if events.fd() == self.input_fd() {
            if events.event_set().contains(EventSet::IN) {
                self.read_input();
            } else {
                // Hang-up or error without data: the input is gone.
                self.input_eof = true;
            }
        }
        self.feed();
        self.update_input_interest(ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_reaches_the_writer_and_input_the_fifo() {
        let sink = Sink::default();
        let rx = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq, Box::new(sink.clone()), rx);
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");

        let mut pending: VecDeque<u8> = (0..100u8).collect();
        dev.feed(&mut pending);
        // The FIFO holds 64 bytes; the rest waits.
        assert_eq!(pending.len(), 36);
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 1, 0, "data ready");
        let mut b = [0u8];
        dev.read(0, &mut b);
        assert_eq!(b[0], 0);
        // Bad access widths are ignored rather than trusted.
        let mut wide = [0u8; 2];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
    }
}
