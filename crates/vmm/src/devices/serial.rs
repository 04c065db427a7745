//! The 8250 UART at COM1, on vm-superio, with its interrupt delivered through an irqfd.

use std::io::{self, Write};

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;

pub use isocell_vmm_model::devices::serial::{COM1_BASE, COM1_IRQ, COM1_LEN};

/// Raises the UART's interrupt line by writing an eventfd registered as a KVM irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The most a console log file may grow to. The guest decides how much it prints, and the jail
/// caps every file the VMM writes (RLIMIT_FSIZE, 256 MiB), where a write past the cap kills the
/// VMM with SIGXFSZ; the log stops well before that, with a line saying so.
pub const CONSOLE_FILE_LIMIT: u64 = 64 << 20;

/// A writer that passes on at most `limit` bytes, then one line saying the rest was dropped,
/// then nothing.
pub struct BoundedLog<W: Write> {
    inner: W,
    left: u64,
    limit: u64,
    cut: bool,
}

impl<W: Write> BoundedLog<W> {
    /// Passes at most `limit` bytes to `inner`.
    pub fn new(inner: W, limit: u64) -> Self {
        BoundedLog { inner, left: limit, limit, cut: false }
    }
}

impl<W: Write> Write for BoundedLog<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.left == 0 {
            if !self.cut {
                self.cut = true;
                let note = format!(
                    "\n[isocell-vmm: console log reached {} bytes; the rest is dropped]\n",
                    self.limit
                );
                self.inner.write_all(note.as_bytes())?;
                self.inner.flush()?;
            }
            // The bytes count as written: the guest must not see an error or stall for them.
            return Ok(buf.len());
        }
        let take = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.write(&buf[..take])?;
        self.left -= n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The console UART. Output goes to any writer; guest input is not wired yet.
pub struct SerialConsole {
    uart: Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl SerialConsole {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialConsole { uart: Serial::new(IrqTrigger(irq), out) }
    }
}

/// The UART's registers and unread input, for snapshots (vm-superio's `SerialState`, which
/// is not serde).
#[derive(serde::Serialize, serde::Deserialize)]
struct UartState {
    divisor: [u8; 2],
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

impl BusDevice for SerialConsole {
    fn save_state(&mut self) -> Option<serde_json::Value> {
        let s = self.uart.state();
        let state = UartState {
            divisor: [s.baud_divisor_low, s.baud_divisor_high],
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        };
        serde_json::to_value(state).ok()
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let s: UartState = serde_json::from_value(state.clone()).map_err(|e| e.to_string())?;
        let state = SerialState {
            baud_divisor_low: s.divisor[0],
            baud_divisor_high: s.divisor[1],
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        };
        let irq = self.uart.interrupt_evt().0.try_clone().map_err(|e| e.to_string())?;
        let spare = IrqTrigger(irq.try_clone().map_err(|e| e.to_string())?);
        let placeholder = Serial::new(spare, Box::new(io::sink()) as Box<dyn Write + Send>);
        let out = std::mem::replace(&mut self.uart, placeholder).into_writer();
        self.uart = Serial::from_state(&state, IrqTrigger(irq), NoEvents, out)
            .map_err(|e| format!("{e:?}"))?;
        Ok(())
    }

    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if let (Ok(off), [byte]) = (u8::try_from(offset), data) {
            *byte = self.uart.read(off);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let (Ok(off), [byte]) = (u8::try_from(offset), data) {
            // An error here is the console's writer failing (a closed pipe): the guest must
            // not be able to stop the VMM through it, so the byte is dropped.
            let _ = self.uart.write(off, *byte);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_console_log_stops_at_its_limit_and_says_so() {
        let mut log = BoundedLog::new(Vec::new(), 10);
        log.write_all(b"0123456").unwrap();
        log.write_all(b"789abc").unwrap();
        log.write_all(b"more and more").unwrap();
        log.write_all(b"and more").unwrap();
        let text = String::from_utf8(log.inner).unwrap();
        assert_eq!(
            text,
            "0123456789\n[isocell-vmm: console log reached 10 bytes; the rest is dropped]\n"
        );
    }
}
