//! The 8250/16550 console on COM1 (vm-superio), its output going to a host writer.

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{BusDevice, VcpuAction};
use crate::output::OutputGate;
use crate::state::{DeviceState, SerialState, StateError};

/// Number of port addresses the UART decodes.
pub const SERIAL_PORT_LEN: u64 = 8;
/// Legacy IRQ line of COM1.
pub const SERIAL_IRQ: u32 = 4;

/// Raises the UART's interrupt through an eventfd (bound to the irqchip with irqfd).
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

super::counters::counters!(
    /// Console counters: monotonic, never reset.
    pub struct SerialCounters {
        /// Bytes the guest wrote to the console.
        tx_bytes,
        /// Bytes that could not be written to the host side (or were lost by the UART).
        tx_errors,
    }
);

struct Events(Arc<SerialCounters>);

impl SerialEvents for Events {
    fn buffer_read(&self) {}
    fn out_byte(&self) {
        self.0.tx_bytes.fetch_add(1, Ordering::Relaxed);
    }
    fn tx_lost_byte(&self) {
        self.0.tx_errors.fetch_add(1, Ordering::Relaxed);
    }
    fn in_buffer_empty(&self) {}
}

/// The host writer, shared by the output gate's console sink and [`ConsoleOut::sync`].
#[derive(Clone)]
struct Shared(Arc<Mutex<Box<dyn Write + Send>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).flush()
    }
}

/// The host side of the console, shared so that a restored UART writes to the same place.
/// Bytes go through the VM's output gate, which writes them at once or holds them until their
/// checkpoint is safe.
#[derive(Clone)]
pub struct ConsoleOut {
    host: Shared,
    gate: Arc<OutputGate>,
    sink: usize,
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.gate.emit(self.sink, buf)?;
        Ok(buf.len())
    }
    /// A no-op: the UART flushes after every byte, which would cost a system call per byte.
    /// The host side is flushed by [`ConsoleOut::sync`] instead.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ConsoleOut {
    /// Pushes everything the guest wrote so far to the host side (e.g. a partial line when
    /// the VM pauses: a snapshot must not leave console bytes in a buffer).
    pub fn sync(&self) {
        if let Err(e) = self.host.clone().flush() {
            tracing::warn!("console output failed: {e}");
        }
    }
}

/// The console UART as a bus device.
pub struct SerialConsole {
    uart: Serial<IrqTrigger, Events, ConsoleOut>,
    irq: EventFd,
    out: ConsoleOut,
    counters: Arc<SerialCounters>,
}

impl SerialConsole {
    /// A UART whose output goes to `out` through `gate` and whose interrupt fires `irq`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>, gate: &Arc<OutputGate>) -> Self {
        let counters = Arc::new(SerialCounters::default());
        let host = Shared(Arc::new(Mutex::new(out)));
        let sink = gate.add_sink("the console", Box::new(host.clone()), true);
        let out = ConsoleOut {
            host,
            gate: gate.clone(),
            sink,
        };
        let trigger = IrqTrigger(irq.try_clone().expect("eventfd can be duplicated"));
        let uart = Serial::with_events(trigger, Events(counters.clone()), out.clone());
        Self {
            uart,
            irq,
            out,
            counters,
        }
    }

    /// The host side of the console.
    pub fn output(&self) -> ConsoleOut {
        self.out.clone()
    }

    /// The console's counters.
    pub fn counters(&self) -> Arc<SerialCounters> {
        self.counters.clone()
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> VcpuAction {
        if let (Some(&value), Ok(off)) = (data.first(), u8::try_from(offset))
            && let Err(e) = self.uart.write(off, value)
        {
            // Say it once: a closed console would otherwise log once per guest byte.
            if self.counters.tx_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!("console output failed, further failures are only counted: {e}");
            }
        }
        VcpuAction::Continue
    }

    fn save(&self) -> Result<DeviceState, StateError> {
        let s = self.uart.state();
        Ok(DeviceState::Serial(SerialState {
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
        }))
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), StateError> {
        let DeviceState::Serial(s) = state else {
            return Err(StateError::Invalid(
                "the console's saved state is not a UART's",
            ));
        };
        let state = vm_superio::serial::SerialState {
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
        };
        let trigger = IrqTrigger(
            self.irq
                .try_clone()
                .map_err(|_| StateError::Invalid("eventfd"))?,
        );
        self.uart = Serial::from_state(
            &state,
            trigger,
            Events(self.counters.clone()),
            self.out.clone(),
        )
        .map_err(|_| StateError::Invalid("the UART's saved input buffer is too long"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_written_to_thr_reach_the_writer_and_are_counted() {
        let sink = Sink::default();
        let gate = Arc::new(OutputGate::default());
        let mut uart = SerialConsole::new(EventFd::new(0).unwrap(), Box::new(sink.clone()), &gate);
        for b in b"hi\n" {
            uart.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        assert_eq!(uart.counters().tx_bytes.load(Ordering::Relaxed), 3);
        // Line status: transmitter empty, so a polling driver never waits.
        let mut lsr = [0u8; 1];
        uart.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }
}
