//! Guest memory as one typed value: parsed and range-checked once, wherever it comes from (a
//! flag, a cell spec, an API request), with one default.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::vm::{MAX_MEMORY_MIB, MIN_MEMORY_MIB};

/// A cell's guest memory, a whole number of MiB between [`MIN_MEMORY_MIB`] and
/// [`MAX_MEMORY_MIB`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(into = "u64")]
pub struct MemorySize(u64);

/// Why a memory size was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemorySizeError {
    /// Not a number with an optional unit.
    #[error("{0:?}: give MiB as a number, or a size like 256M, 2G or 1T")]
    Syntax(String),
    /// Outside what a cell can have.
    #[error("{0:?}: give between {MIN_MEMORY_MIB} MiB and 1 TiB")]
    Range(String),
}

impl MemorySize {
    /// What a cell gets when nothing says otherwise: 256 MiB.
    pub const DEFAULT: MemorySize = MemorySize(256);

    /// A size in MiB, checked against the range.
    pub fn from_mib(mib: u64) -> Result<MemorySize, MemorySizeError> {
        if (MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&mib) {
            Ok(MemorySize(mib))
        } else {
            Err(MemorySizeError::Range(format!("{mib}M")))
        }
    }

    /// The size in MiB.
    pub fn mib(self) -> u64 {
        self.0
    }
}

impl Default for MemorySize {
    fn default() -> Self {
        MemorySize::DEFAULT
    }
}

impl FromStr for MemorySize {
    type Err = MemorySizeError;

    /// MiB as a bare number, or with `M`/`MiB`, `G`/`GiB` or `T`/`TiB`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let units: [(&str, &str, u64); 3] =
            [("TiB", "T", 1 << 20), ("GiB", "G", 1 << 10), ("MiB", "M", 1)];
        let (num, mult) = units
            .iter()
            .find_map(|(long, short, m)| {
                t.strip_suffix(long).or_else(|| t.strip_suffix(short)).map(|n| (n, *m))
            })
            .unwrap_or((t, 1));
        let mib = num
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(mult))
            .ok_or_else(|| MemorySizeError::Syntax(s.to_owned()))?;
        MemorySize::from_mib(mib).map_err(|_| MemorySizeError::Range(s.to_owned()))
    }
}

impl fmt::Display for MemorySize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}M", self.0)
    }
}

impl From<MemorySize> for u64 {
    fn from(m: MemorySize) -> u64 {
        m.0
    }
}

impl<'de> Deserialize<'de> for MemorySize {
    /// A string with a unit (`"512M"`) or a number of MiB.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Mib(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Mib(n) => MemorySize::from_mib(n),
            Raw::Text(s) => s.parse(),
        }
        .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn sizes_parse_once_with_one_default() {
        assert_eq!("512M".parse::<MemorySize>().unwrap().mib(), 512);
        assert_eq!("2G".parse::<MemorySize>().unwrap().mib(), 2048);
        assert_eq!("1TiB".parse::<MemorySize>().unwrap().mib(), 1 << 20);
        assert_eq!(" 300 ".parse::<MemorySize>().unwrap().mib(), 300);
        assert_eq!(MemorySize::default().mib(), 256);
        for bad in ["", "lots", "99999999999999999999G", "-1", "1.5G"] {
            assert!(matches!(bad.parse::<MemorySize>(), Err(MemorySizeError::Syntax(_))), "{bad}");
        }
        for out in ["2T", "16M", "0"] {
            assert!(matches!(out.parse::<MemorySize>(), Err(MemorySizeError::Range(_))), "{out}");
        }
    }

    #[test]
    fn specs_give_a_string_or_a_number() {
        #[derive(Deserialize)]
        struct S {
            memory: MemorySize,
        }
        let a: S = toml::from_str("memory = \"1G\"").unwrap();
        let b: S = toml::from_str("memory = 1024").unwrap();
        assert_eq!(a.memory, b.memory);
        assert!(toml::from_str::<S>("memory = \"8M\"").is_err());
    }
}
