//! A minimal i8042 keyboard controller: enough for the kernel's driver to find it, for a guest
//! reset (command 0xFE, or clearing the reset line through the output port) to stop the VM, and
//! for a guest kernel panic to be noticed.
//!
//! No keyboard is attached. When the kernel panics (with `panic=0`) its panic loop blinks the
//! keyboard LEDs through the controller: it writes "set LEDs" (0xED) and then the LED byte 0x05
//! without waiting for an acknowledgement. A driver talking to a keyboard always waits for the
//! ACK between the two, and with no keyboard present none ever comes, so that exact sequence is
//! the panic loop and nothing else.

use std::collections::VecDeque;

use super::BusDevice;
use crate::exit::{ExitRequester, VmExit};

pub use isocell_vmm_model::devices::i8042::{COMMAND_PORT, DATA_PORT};

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;
/// Set when the keyboard is *not* inhibited by the keylock.
const STATUS_UNLOCKED: u8 = 0x10;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KBD_BUFFER: u8 = 0xd2;
const CMD_WRITE_AUX_BUFFER: u8 = 0xd3;
const CMD_WRITE_TO_AUX: u8 = 0xd4;

const CTR_KBD_DISABLED: u8 = 0x10;
const CTR_AUX_DISABLED: u8 = 0x20;
const KBD_SET_LEDS: u8 = 0xed;
const PANIC_BLINK_LEDS: u8 = 0x05;
/// Bytes the controller buffers for the guest; a guest that never reads cannot grow it.
const OUTPUT_CAPACITY: usize = 16;

/// The controller.
pub struct I8042 {
    ctr: u8,
    output: VecDeque<u8>,
    last_output: u8,
    pending: Option<u8>,
    last_was_command: bool,
    last_kbd_byte: Option<u8>,
    exit: ExitRequester,
}

/// The controller's registers and buffered output, for snapshots.
#[derive(serde::Serialize, serde::Deserialize)]
struct ControllerState {
    ctr: u8,
    output: Vec<u8>,
    last_output: u8,
    pending: Option<u8>,
    last_was_command: bool,
    last_kbd_byte: Option<u8>,
}

impl I8042 {
    /// A controller that reports resets and panics through `exit`.
    pub fn new(exit: ExitRequester) -> Self {
        I8042 {
            ctr: CTR_AUX_DISABLED,
            output: VecDeque::new(),
            last_output: 0,
            pending: None,
            last_was_command: false,
            last_kbd_byte: None,
            exit,
        }
    }

    fn push(&mut self, byte: u8) {
        if self.output.len() < OUTPUT_CAPACITY {
            self.output.push_back(byte);
        }
    }

    fn status(&self) -> u8 {
        let mut s = STATUS_SYSTEM_FLAG | STATUS_UNLOCKED;
        if !self.output.is_empty() {
            s |= STATUS_OUTPUT_FULL;
        }
        if self.last_was_command {
            s |= STATUS_LAST_WAS_COMMAND;
        }
        s
    }

    fn command(&mut self, cmd: u8) {
        self.pending = None;
        match cmd {
            CMD_READ_CTR => self.push(self.ctr),
            CMD_WRITE_CTR
            | CMD_WRITE_OUTPUT_PORT
            | CMD_WRITE_KBD_BUFFER
            | CMD_WRITE_AUX_BUFFER
            | CMD_WRITE_TO_AUX => self.pending = Some(cmd),
            CMD_DISABLE_AUX => self.ctr |= CTR_AUX_DISABLED,
            CMD_ENABLE_AUX => self.ctr &= !CTR_AUX_DISABLED,
            // No auxiliary device: report a clock line stuck low.
            CMD_TEST_AUX => self.push(0x01),
            CMD_SELF_TEST => self.push(0x55),
            CMD_TEST_KBD => self.push(0x00),
            CMD_DISABLE_KBD => self.ctr |= CTR_KBD_DISABLED,
            CMD_ENABLE_KBD => self.ctr &= !CTR_KBD_DISABLED,
            // Output port: A20 on, reset line high (not in reset).
            CMD_READ_OUTPUT_PORT => self.push(0x03),
            // 0xF0-0xFF pulse output lines low for those bits clear; bit 0 is the CPU reset.
            0xf0..=0xff if cmd & 0x01 == 0 => self.exit.request(VmExit::Reboot),
            _ => {}
        }
    }

    fn data(&mut self, value: u8) {
        match self.pending.take() {
            Some(CMD_WRITE_CTR) => self.ctr = value,
            Some(CMD_WRITE_OUTPUT_PORT) if value & 0x01 == 0 => self.exit.request(VmExit::Reboot),
            Some(CMD_WRITE_KBD_BUFFER) | Some(CMD_WRITE_AUX_BUFFER) => self.push(value),
            Some(_) => {}
            None => {
                // A byte for the (absent) keyboard.
                if self.last_kbd_byte == Some(KBD_SET_LEDS) && value == PANIC_BLINK_LEDS {
                    self.exit.request(VmExit::GuestPanic);
                }
                self.last_kbd_byte = Some(value);
            }
        }
    }
}

impl BusDevice for I8042 {
    fn save_state(&mut self) -> Option<serde_json::Value> {
        let state = ControllerState {
            ctr: self.ctr,
            output: self.output.iter().copied().collect(),
            last_output: self.last_output,
            pending: self.pending,
            last_was_command: self.last_was_command,
            last_kbd_byte: self.last_kbd_byte,
        };
        serde_json::to_value(state).ok()
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let s: ControllerState =
            serde_json::from_value(state.clone()).map_err(|e| e.to_string())?;
        if s.output.len() > OUTPUT_CAPACITY {
            return Err(format!("{} buffered bytes", s.output.len()));
        }
        self.ctr = s.ctr;
        self.output = s.output.into();
        self.last_output = s.last_output;
        self.pending = s.pending;
        self.last_was_command = s.last_was_command;
        self.last_kbd_byte = s.last_kbd_byte;
        Ok(())
    }

    fn read(&mut self, base: u64, _offset: u64, data: &mut [u8]) {
        let [byte] = data else { return };
        *byte = match base {
            COMMAND_PORT => self.status(),
            _ => {
                if let Some(b) = self.output.pop_front() {
                    self.last_output = b;
                }
                self.last_output
            }
        };
    }

    fn write(&mut self, base: u64, _offset: u64, data: &[u8]) {
        let [byte] = data else { return };
        self.last_was_command = base == COMMAND_PORT;
        match base {
            COMMAND_PORT => self.command(*byte),
            _ => self.data(*byte),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{channel, Receiver};

    use super::*;

    fn controller() -> (I8042, Receiver<VmExit>) {
        let (tx, rx) = channel();
        (I8042::new(ExitRequester::new(tx)), rx)
    }

    fn out(c: &mut I8042, port: u64, v: u8) {
        c.write(port, 0, &[v]);
    }

    fn inb(c: &mut I8042, port: u64) -> u8 {
        let mut b = [0u8];
        c.read(port, 0, &mut b);
        b[0]
    }

    #[test]
    fn self_test_and_ctr() {
        let (mut c, _rx) = controller();
        out(&mut c, COMMAND_PORT, CMD_SELF_TEST);
        assert_eq!(inb(&mut c, COMMAND_PORT) & STATUS_OUTPUT_FULL, 1);
        assert_eq!(inb(&mut c, DATA_PORT), 0x55);
        assert_eq!(inb(&mut c, COMMAND_PORT) & STATUS_OUTPUT_FULL, 0);
        out(&mut c, COMMAND_PORT, CMD_WRITE_CTR);
        out(&mut c, DATA_PORT, 0x47);
        out(&mut c, COMMAND_PORT, CMD_READ_CTR);
        assert_eq!(inb(&mut c, DATA_PORT), 0x47);
    }

    #[test]
    fn reset_requests_reboot() {
        let (mut c, rx) = controller();
        out(&mut c, COMMAND_PORT, 0xfe);
        assert_eq!(rx.try_recv().ok(), Some(VmExit::Reboot));
        out(&mut c, COMMAND_PORT, CMD_WRITE_OUTPUT_PORT);
        out(&mut c, DATA_PORT, 0x02);
        assert_eq!(rx.try_recv().ok(), Some(VmExit::Reboot));
    }

    #[test]
    fn panic_blink_is_a_panic_but_keyboard_probing_is_not() {
        let (mut c, rx) = controller();
        // atkbd probing: GETID, then SETLEDS, each left unanswered.
        out(&mut c, DATA_PORT, 0xf2);
        out(&mut c, DATA_PORT, KBD_SET_LEDS);
        out(&mut c, DATA_PORT, 0x00);
        assert!(rx.try_recv().is_err());
        out(&mut c, DATA_PORT, KBD_SET_LEDS);
        out(&mut c, DATA_PORT, PANIC_BLINK_LEDS);
        assert_eq!(rx.try_recv().ok(), Some(VmExit::GuestPanic));
    }

    #[test]
    fn output_buffer_is_bounded() {
        let (mut c, _rx) = controller();
        for _ in 0..1000 {
            out(&mut c, COMMAND_PORT, CMD_SELF_TEST);
        }
        assert_eq!(c.output.len(), OUTPUT_CAPACITY);
    }
}
