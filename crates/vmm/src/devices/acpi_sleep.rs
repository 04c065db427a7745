//! The hardware-reduced ACPI sleep registers (FADT `SLEEP_CONTROL_REG` and `SLEEP_STATUS_REG`),
//! two byte-wide I/O ports. Their only use is a clean power-off: the guest's ACPI core writes
//! `SLP_TYPx` of `\_S5_` with `SLP_EN`, and the VM stops with exit status 0. Other sleep states
//! are not offered (the DSDT names only `\_S5_`), so any other write is ignored.

use super::BusDevice;
use crate::exit::{ExitRequester, VmExit};

pub use isocell_vmm_model::devices::acpi_sleep::{
    PORTS_LEN, S5_SLEEP_TYPE, SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT,
};

/// SLP_TYPx: bits 2-4 of the control register (ACPI 6.5, 4.8.3.7).
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0b111 << SLP_TYP_SHIFT;
/// SLP_EN: bit 5.
const SLP_EN: u8 = 1 << 5;

/// The sleep control and status registers.
pub struct AcpiSleep {
    exit: ExitRequester,
}

impl AcpiSleep {
    /// Registers that report a power-off through `exit`.
    pub fn new(exit: ExitRequester) -> Self {
        AcpiSleep { exit }
    }
}

/// Whether a byte written to the sleep control register asks for S5.
pub fn is_power_off(byte: u8) -> bool {
    byte & SLP_EN != 0 && (byte & SLP_TYP_MASK) >> SLP_TYP_SHIFT == S5_SLEEP_TYPE
}

impl BusDevice for AcpiSleep {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let control = base + offset == u64::from(SLEEP_CONTROL_PORT);
        if let (true, [byte]) = (control, data) {
            if is_power_off(*byte) {
                self.exit.request(VmExit::PowerOff);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_s5_with_slp_en_powers_off() {
        // What Linux writes for S5: SLP_TYP 5 in bits 2-4, SLP_EN.
        assert!(is_power_off(0x34));
        assert!(!is_power_off(5 << 2), "SLP_EN clear");
        assert!(!is_power_off(SLP_EN | (3 << 2)), "S3 is not offered");
        assert!((0..=255u8).filter(|b| is_power_off(*b)).all(|b| b & 0x3c == 0x34));
    }
}
