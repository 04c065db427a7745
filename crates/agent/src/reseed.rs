//! What a cell restored from a snapshot must do before it runs anything: every copy of a
//! snapshot starts with the same kernel RNG state and a wall clock stopped at the moment the
//! snapshot was taken.
//!
//! The host's fresh entropy is mixed into the kernel's input pool and credited
//! (`RNDADDENTROPY`), then the kernel's CRNG is reseeded from it (`RNDRESEEDCRNG`): every
//! `getrandom`, `/dev/urandom` and in-kernel user afterwards draws from the new key, so two
//! copies differ from their first read. The kernel's boot id is made on its first read, which
//! nothing does before a snapshot, so each copy makes its own.

use std::fs::OpenOptions;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set when the cell is prepared for a snapshot, so every copy restored from it starts with it
/// set; cleared by a successful [`reseed`]. While it is set the agent runs nothing and touches
/// no file for the host: the host's order of requests is not all that stands between a clone
/// and work done on another clone's RNG state.
static PENDING: Gate = Gate(AtomicBool::new(false));

/// Whether a reseed is owed.
struct Gate(AtomicBool);

impl Gate {
    fn set(&self, owed: bool) {
        self.0.store(owed, Ordering::SeqCst);
    }

    fn check(&self) -> Result<(), String> {
        if self.0.load(Ordering::SeqCst) {
            Err("this cell was restored from a snapshot and has not been reseeded yet: it runs \
                 nothing until the host has given it fresh entropy"
                .into())
        } else {
            Ok(())
        }
    }
}

/// Marks this cell as one a snapshot is taken of (see [`PENDING`]).
pub fn mark_for_snapshot() {
    PENDING.set(true);
}

/// `Err` (why) while a restored cell has not been reseeded.
pub fn require_reseeded() -> Result<(), String> {
    PENDING.check()
}

/// The least entropy the host must send: one CRNG key.
pub const MIN_ENTROPY: usize = 32;
/// The most the kernel takes in one `RNDADDENTROPY`.
const MAX_ENTROPY: usize = 4096;

// include/uapi/linux/random.h.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Mixes `entropy` into the kernel's pool, reseeds its RNG and sets the wall clock.
pub fn reseed(entropy: &[u8], unix_time_ns: u64) -> Result<(), String> {
    if entropy.len() < MIN_ENTROPY || entropy.len() > MAX_ENTROPY {
        return Err(format!(
            "reseed needs {MIN_ENTROPY} to {MAX_ENTROPY} bytes of entropy, got {}",
            entropy.len()
        ));
    }
    let random = OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("cannot open /dev/urandom: {e}"))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + entropy.len());
    let bits = (entropy.len() * 8) as i32;
    info.extend_from_slice(&bits.to_ne_bytes());
    info.extend_from_slice(&(entropy.len() as i32).to_ne_bytes());
    info.extend_from_slice(entropy);
    // Keep the buffer aligned for the kernel's int reads: copy into u32 words.
    let mut words = vec![0u32; info.len().div_ceil(4)];
    for (w, chunk) in words.iter_mut().zip(info.chunks(4)) {
        let mut b = [0u8; 4];
        b[..chunk.len()].copy_from_slice(chunk);
        *w = u32::from_ne_bytes(b);
    }
    // SAFETY: `words` holds a whole rand_pool_info (count, size, then `size` bytes), which
    // the kernel only reads; the descriptor is ours.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, words.as_ptr()) } != 0 {
        return Err(format!("RNDADDENTROPY: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(format!("RNDRESEEDCRNG: {}", std::io::Error::last_os_error()));
    }
    let ts = libc::timespec {
        tv_sec: (unix_time_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_time_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: clock_settime reads the timespec we pass.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(format!("cannot set the clock: {}", std::io::Error::last_os_error()));
    }
    PENDING.set(false);
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_cell_prepared_for_a_snapshot_runs_nothing_until_reseeded() {
        let gate = Gate(AtomicBool::new(false));
        assert!(gate.check().is_ok(), "a booted cell runs");
        gate.set(true);
        assert!(gate.check().unwrap_err().contains("not been reseeded"));
    }

    #[test]
    fn too_little_entropy_is_refused_before_anything_changes() {
        assert!(reseed(&[0u8; MIN_ENTROPY - 1], 0).unwrap_err().contains("entropy"));
    }
}
