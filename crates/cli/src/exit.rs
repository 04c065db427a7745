//! Exit statuses of `isocell` itself, chosen to match what shells and container tools use.

/// `isocell` failed: bad options, missing kernel or image, no hardware virtualization, a cell
/// that did not boot or broke down. (Docker uses 125 the same way.)
pub const ISOCELL_FAILED: u8 = 125;
/// The command exists but could not be executed.
pub const CANNOT_EXECUTE: u8 = 126;
/// The command was not found in the cell.
pub const NOT_FOUND: u8 = 127;
/// The command ran past `--timeout` and was killed (as `timeout(1)` reports it).
pub const TIMED_OUT: u8 = 124;

/// Admission policy denied the cell; nothing was started (the `EX_NOPERM` of sysexits.h).
pub const DENIED: u8 = 77;

/// The exit status table shown in `--help`.
pub const TABLE: &str = "\
Exit status:
  N        the command's own exit status
  128+N    the command was killed by signal N
  77       the admission policy denied the cell; nothing was started
  124      the command ran past --timeout and was killed
  125      isocell failed (bad options, missing kernel or image, no hardware virtualization,
           the cell did not boot, or an --input/--output copy failed)
  126      the command could not be executed
  127      the command was not found in the cell
  130      interrupted (Ctrl-C); 143 terminated (SIGTERM); 129 hung up (SIGHUP)";

/// Prints an error and returns [`ISOCELL_FAILED`].
pub fn fail(message: &str) -> u8 {
    tell!("isocell: error: {message}");
    ISOCELL_FAILED
}
