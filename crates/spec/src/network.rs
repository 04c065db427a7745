//! A cell's network: closed unless its spec names where it may go (`egress`) and which of its
//! ports the host forwards to it (`publish`).
//!
//! Egress rules, as in `--egress RULE` and `egress = [...]`:
//!
//! | rule | allows |
//! |---|---|
//! | `api.example.eu:443` | that name (the addresses the host resolves for it), port 443 |
//! | `*.example.eu:443` | every name under `example.eu` (not `example.eu` itself), port 443 |
//! | `10.20.0.0/16:5432`, `10.20.1.7:5432` | those IPv4 addresses, port 5432 |
//!
//! Published ports: `[HOST_IP:]HOST_PORT:GUEST_PORT` (the host IP defaults to 127.0.0.1, so
//! a port is opened to other machines only when the operator says so).

use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// Most egress rules and published ports a cell may have (each is a line of its surface).
pub const MAX_RULES: usize = 256;

/// What an egress rule names.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    /// One DNS name, lower case, without a trailing dot.
    Name(String),
    /// Every name under this suffix (`*.example.eu` holds `example.eu`).
    Suffix(String),
    /// An IPv4 network (a single address is a /32).
    Net {
        /// The network's address (host bits zero).
        addr: Ipv4Addr,
        /// The prefix length, 0-32.
        prefix: u8,
    },
}

/// One egress rule: a target and a port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct EgressRule {
    /// Where.
    pub target: Target,
    /// Which TCP port.
    pub port: u16,
}

impl Target {
    /// Whether the name `name` (lower case, no trailing dot) is this target's.
    pub fn holds_name(&self, name: &str) -> bool {
        match self {
            Target::Name(n) => n == name,
            Target::Suffix(s) => {
                name.len() > s.len() + 1
                    && name.ends_with(s.as_str())
                    && name.as_bytes()[name.len() - s.len() - 1] == b'.'
            }
            Target::Net { .. } => false,
        }
    }

    /// Whether the address `ip` is in this target's network.
    pub fn holds_addr(&self, ip: Ipv4Addr) -> bool {
        match *self {
            Target::Net { addr, prefix } => mask(prefix) & u32::from(ip) == u32::from(addr),
            _ => false,
        }
    }
}

fn mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix.min(32))).unwrap_or(0)
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Name(n) => write!(f, "{n}"),
            Target::Suffix(s) => write!(f, "*.{s}"),
            Target::Net { addr, prefix: 32 } => write!(f, "{addr}"),
            Target::Net { addr, prefix } => write!(f, "{addr}/{prefix}"),
        }
    }
}

impl fmt::Display for EgressRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.target, self.port)
    }
}

/// Why a network option was refused; the message says what a good one looks like.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NetworkError {
    /// A malformed egress rule.
    #[error(
        "egress rule {rule:?}: {why} (write HOST:PORT, *.DOMAIN:PORT or A.B.C.D[/LEN]:PORT, \
         such as api.example.eu:443)"
    )]
    Egress {
        /// The rule as given.
        rule: String,
        /// What is wrong with it.
        why: String,
    },
    /// A malformed published port.
    #[error(
        "published port {spec:?}: {why} (write [HOST_IP:]HOST_PORT:GUEST_PORT, such as 8080:80)"
    )]
    Publish {
        /// The option as given.
        spec: String,
        /// What is wrong with it.
        why: String,
    },
    /// Too many rules.
    #[error("{what}: at most {MAX_RULES} are allowed, {count} were given")]
    TooMany {
        /// `egress rules` or `published ports`.
        what: &'static str,
        /// How many were given.
        count: usize,
    },
    /// Two published ports on the same host address and port.
    #[error("host port {0} is published twice")]
    DuplicateHostPort(String),
}

fn port(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(0) => Err("port 0 is not a port".into()),
        Ok(p) if !text.starts_with('0') && !text.starts_with('+') => Ok(p),
        _ => Err(format!("{text:?} is not a port (1-65535)")),
    }
}

/// Whether `name` is a DNS name we accept: labels of letters, digits, `-` and `_`, 1-63 bytes
/// each, 253 bytes in all, not starting or ending a label with `-`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

impl EgressRule {
    /// Parses `HOST:PORT`, `*.DOMAIN:PORT` or `A.B.C.D[/LEN]:PORT`.
    pub fn parse(rule: &str) -> Result<EgressRule, NetworkError> {
        let err = |why: String| NetworkError::Egress { rule: rule.to_owned(), why };
        let (target, port_text) = rule.rsplit_once(':').ok_or_else(|| err("no port".into()))?;
        let port = port(port_text).map_err(err)?;
        if target.contains(':') || target.starts_with('[') {
            return Err(err("IPv6 is not carried; cells reach IPv4 addresses only".into()));
        }
        let target = if let Some((addr, len)) = target.split_once('/') {
            let addr: Ipv4Addr =
                addr.parse().map_err(|_| err(format!("{addr:?} is not an IPv4 address")))?;
            let prefix = match len.parse::<u8>() {
                Ok(p) if p <= 32 && !(len.starts_with('0') && len != "0") => p,
                _ => return Err(err(format!("/{len} is not a prefix length (0-32)"))),
            };
            if u32::from(addr) & !mask(prefix) != 0 {
                return Err(err(format!(
                    "{addr}/{prefix} has host bits set; the network is {}/{prefix}",
                    Ipv4Addr::from(u32::from(addr) & mask(prefix))
                )));
            }
            Target::Net { addr, prefix }
        } else if let Ok(addr) = target.parse::<Ipv4Addr>() {
            Target::Net { addr, prefix: 32 }
        } else {
            let lower = target.to_ascii_lowercase();
            let lower = lower.strip_suffix('.').unwrap_or(&lower);
            if let Some(suffix) = lower.strip_prefix("*.") {
                if !valid_name(suffix) || !suffix.contains('.') {
                    return Err(err(format!(
                        "*.{suffix} is too wide or not a domain; name a domain with at least \
                         two labels"
                    )));
                }
                Target::Suffix(suffix.to_owned())
            } else if valid_name(lower) {
                if lower.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
                    return Err(err(format!("{lower:?} is not an IPv4 address")));
                }
                Target::Name(lower.to_owned())
            } else {
                return Err(err(format!("{target:?} is not a host name")));
            }
        };
        Ok(EgressRule { target, port })
    }
}

/// A published port: connections to `host_ip:host_port` on the host reach `guest_port` on the
/// cell's loopback.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Publish {
    /// The host address to listen on.
    pub host_ip: Ipv4Addr,
    /// The host port.
    pub host_port: u16,
    /// The port in the cell.
    pub guest_port: u16,
}

impl Publish {
    /// Parses `[HOST_IP:]HOST_PORT:GUEST_PORT`.
    pub fn parse(spec: &str) -> Result<Publish, NetworkError> {
        let err = |why: String| NetworkError::Publish { spec: spec.to_owned(), why };
        let parts: Vec<&str> = spec.split(':').collect();
        let (ip, host, guest) = match parts.as_slice() {
            [host, guest] => (Ipv4Addr::LOCALHOST, *host, *guest),
            [ip, host, guest] => {
                let ip = ip.parse().map_err(|_| err(format!("{ip:?} is not an IPv4 address")))?;
                (ip, *host, *guest)
            }
            _ => return Err(err("expected two or three parts separated by ':'".into())),
        };
        Ok(Publish {
            host_ip: ip,
            host_port: port(host).map_err(err)?,
            guest_port: port(guest).map_err(err)?,
        })
    }
}

impl fmt::Display for Publish {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.host_ip, self.host_port, self.guest_port)
    }
}

/// A cell's network, parsed and checked. Serialized as the rules and ports as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "NetworkText", into = "NetworkText")]
pub struct Network {
    /// Where the cell may connect (sorted, no duplicates).
    pub egress: Vec<EgressRule>,
    /// The ports the host forwards into the cell.
    pub publish: Vec<Publish>,
}

/// [`Network`] as written in files and requests.
#[derive(Serialize, Deserialize)]
struct NetworkText {
    #[serde(default)]
    egress: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
}

impl TryFrom<NetworkText> for Network {
    type Error = NetworkError;
    fn try_from(t: NetworkText) -> Result<Network, NetworkError> {
        Network::parse(&t.egress, &t.publish)
    }
}

impl From<Network> for NetworkText {
    fn from(n: Network) -> NetworkText {
        NetworkText { egress: n.egress_strings(), publish: n.publish_strings() }
    }
}

impl Network {
    /// Parses the spec's (or the flags') rules and ports.
    pub fn parse(egress: &[String], publish: &[String]) -> Result<Network, NetworkError> {
        for (what, count) in [("egress rules", egress.len()), ("published ports", publish.len())] {
            if count > MAX_RULES {
                return Err(NetworkError::TooMany { what, count });
            }
        }
        let mut egress =
            egress.iter().map(|r| EgressRule::parse(r)).collect::<Result<Vec<_>, _>>()?;
        egress.sort();
        egress.dedup();
        let publish = publish.iter().map(|p| Publish::parse(p)).collect::<Result<Vec<_>, _>>()?;
        let mut seen = std::collections::BTreeSet::new();
        for p in &publish {
            if !seen.insert((p.host_ip, p.host_port)) {
                return Err(NetworkError::DuplicateHostPort(format!(
                    "{}:{}",
                    p.host_ip, p.host_port
                )));
            }
        }
        Ok(Network { egress, publish })
    }

    /// No egress and nothing published.
    pub fn is_none(&self) -> bool {
        self.egress.is_empty() && self.publish.is_empty()
    }

    /// The rules as written (canonical form), for records and policies.
    pub fn egress_strings(&self) -> Vec<String> {
        self.egress.iter().map(ToString::to_string).collect()
    }

    /// The published ports as written (canonical form).
    pub fn publish_strings(&self) -> Vec<String> {
        self.publish.iter().map(ToString::to_string).collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rules_parse_to_their_canonical_form() {
        for (given, canonical) in [
            ("API.Example.EU:443", "api.example.eu:443"),
            ("api.example.eu.:443", "api.example.eu:443"),
            ("*.example.eu:443", "*.example.eu:443"),
            ("10.20.0.0/16:5432", "10.20.0.0/16:5432"),
            ("10.20.1.7:5432", "10.20.1.7:5432"),
            ("10.20.1.7/32:5432", "10.20.1.7:5432"),
            ("0.0.0.0/0:443", "0.0.0.0/0:443"),
            ("localhost:8080", "localhost:8080"),
        ] {
            assert_eq!(EgressRule::parse(given).unwrap().to_string(), canonical, "{given}");
        }
    }

    #[test]
    fn bad_rules_say_what_is_wrong() {
        for (bad, why) in [
            ("api.example.eu", "no port"),
            ("api.example.eu:0", "port 0"),
            ("api.example.eu:65536", "not a port"),
            ("api.example.eu:080", "not a port"),
            ("api.example.eu:*", "not a port"),
            ("[::1]:443", "IPv6"),
            ("::1:443", "IPv6"),
            ("10.20.0.0/33:5432", "prefix length"),
            ("10.20.0.1/16:5432", "host bits"),
            ("300.1.2.3:80", "not an IPv4"),
            ("1.2.3:80", "not an IPv4"),
            ("*.eu:443", "too wide"),
            ("*:443", "not a host name"),
            ("a..b:443", "not a host name"),
            ("-a.b:443", "not a host name"),
            ("a b:443", "not a host name"),
            (":443", "not a host name"),
        ] {
            let e = EgressRule::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("such as"), "{bad}: {e}");
        }
    }

    #[test]
    fn names_and_suffixes_match_exactly() {
        let s = EgressRule::parse("*.example.eu:443").unwrap().target;
        assert!(s.holds_name("api.example.eu") && s.holds_name("a.b.example.eu"));
        assert!(!s.holds_name("example.eu") && !s.holds_name("badexample.eu"));
        assert!(!s.holds_name("example.eu.evil.com"));
        let n = EgressRule::parse("api.example.eu:443").unwrap().target;
        assert!(n.holds_name("api.example.eu") && !n.holds_name("x.api.example.eu"));
        let net = EgressRule::parse("10.20.0.0/16:1").unwrap().target;
        assert!(net.holds_addr("10.20.255.1".parse().unwrap()));
        assert!(!net.holds_addr("10.21.0.1".parse().unwrap()));
        let all = EgressRule::parse("0.0.0.0/0:1").unwrap().target;
        assert!(all.holds_addr("8.8.8.8".parse().unwrap()));
    }

    #[test]
    fn published_ports_default_to_loopback() {
        let p = Publish::parse("8080:80").unwrap();
        assert_eq!(p, Publish { host_ip: Ipv4Addr::LOCALHOST, host_port: 8080, guest_port: 80 });
        assert_eq!(Publish::parse("0.0.0.0:8080:80").unwrap().to_string(), "0.0.0.0:8080:80");
        for bad in ["80", "x:80", "8080:0", "1.2.3:8080:80", "a:b:c:d", "8080:80:"] {
            assert!(Publish::parse(bad).unwrap_err().to_string().contains("such as"), "{bad}");
        }
        let dup = Network::parse(&[], &["8080:80".into(), "127.0.0.1:8080:81".into()]);
        assert!(matches!(dup, Err(NetworkError::DuplicateHostPort(_))));
    }

    #[test]
    fn rule_lists_are_bounded_sorted_and_deduplicated() {
        let rules =
            vec!["b.example.eu:1".to_owned(), "a.example.eu:1".into(), "b.example.eu:1".into()];
        let n = Network::parse(&rules, &[]).unwrap();
        assert_eq!(n.egress_strings(), ["a.example.eu:1", "b.example.eu:1"]);
        let many = vec!["a.example.eu:1".to_owned(); MAX_RULES + 1];
        assert!(matches!(Network::parse(&many, &[]), Err(NetworkError::TooMany { .. })));
        assert!(Network::parse(&[], &[]).unwrap().is_none());
    }
}
