//! The egress decision, pure: a cell's allowlist, the names the host resolved for it, and
//! which addresses are special (private, loopback, link-local, cloud metadata).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};

use isocell_spec::network::{EgressRule, Target};

/// Most (address, name) pairs the host remembers having answered for one cell, and most names
/// for one address: past either, a name is not answered (the guest sees no address for it).
pub const MAX_REMEMBERED: usize = 4096;
/// See [`MAX_REMEMBERED`].
pub const MAX_NAMES_PER_ADDRESS: usize = 32;

/// Cloud metadata services: never reached unless an address rule names them.
const METADATA: [Ipv4Addr; 3] = [
    Ipv4Addr::new(169, 254, 169, 254),
    Ipv4Addr::new(169, 254, 170, 2),
    Ipv4Addr::new(100, 100, 100, 200),
];

/// Blocks of special addresses: (network, prefix, what an address in it is).
const BLOCKS: [(Ipv4Addr, u8, &str); 9] = [
    (Ipv4Addr::new(0, 0, 0, 0), 8, "not a unicast address"),
    (Ipv4Addr::new(10, 0, 0, 0), 8, "a private address"),
    (Ipv4Addr::new(100, 64, 0, 0), 10, "a private address"),
    (Ipv4Addr::new(127, 0, 0, 0), 8, "a loopback address"),
    (Ipv4Addr::new(169, 254, 0, 0), 16, "a link-local address"),
    (Ipv4Addr::new(172, 16, 0, 0), 12, "a private address"),
    (Ipv4Addr::new(192, 168, 0, 0), 16, "a private address"),
    (Ipv4Addr::new(224, 0, 0, 0), 4, "not a unicast address"),
    (Ipv4Addr::new(240, 0, 0, 0), 4, "not a unicast address"),
];

fn in_net(ip: Ipv4Addr, net: Ipv4Addr, prefix: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    u32::from(ip) & mask == u32::from(net)
}

/// The special block `ip` is in (a metadata address is its own /32 block).
fn block(ip: Ipv4Addr) -> Option<(Ipv4Addr, u8, &'static str)> {
    if METADATA.contains(&ip) {
        return Some((ip, 32, "a cloud metadata address"));
    }
    BLOCKS.into_iter().find(|&(net, prefix, _)| in_net(ip, net, prefix))
}

/// What kind of address a destination is, when it is not an ordinary public one.
pub fn special(ip: Ipv4Addr) -> Option<&'static str> {
    block(ip).map(|b| b.2)
}

/// How a connection was judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The rule that allows it; `None` when denied.
    pub rule: Option<String>,
    /// The name the address was resolved from, when a name rule allowed it.
    pub name: Option<String>,
    /// Names the TLS server name or HTTP Host must be one of (empty: no check, an address
    /// rule allowed it).
    pub names: BTreeSet<String>,
    /// Why it was denied.
    pub reason: Option<String>,
}

impl Decision {
    fn deny(reason: String) -> Decision {
        Decision { rule: None, name: None, names: BTreeSet::new(), reason: Some(reason) }
    }

    /// Whether it was allowed.
    pub fn allowed(&self) -> bool {
        self.rule.is_some()
    }
}

/// One cell's allowlist and what its DNS answers have told the cell.
#[derive(Debug, Default)]
pub struct Allowlist {
    rules: Vec<EgressRule>,
    resolved: BTreeMap<Ipv4Addr, BTreeSet<String>>,
    /// (address, name) pairs in `resolved`.
    pairs: usize,
}

impl Allowlist {
    /// The allowlist of `rules`.
    pub fn new(rules: Vec<EgressRule>) -> Allowlist {
        Allowlist { rules, resolved: BTreeMap::new(), pairs: 0 }
    }

    /// Whether DNS may answer `name` (lower case, no trailing dot): some name rule holds it.
    pub fn name_allowed(&self, name: &str) -> bool {
        self.rules.iter().any(|r| r.target.holds_name(name))
    }

    /// Records that the host answered `name` with `ip`. False when the table is full.
    pub fn remember(&mut self, name: &str, ip: Ipv4Addr) -> bool {
        let names = self.resolved.get(&ip);
        if names.is_some_and(|n| n.contains(name)) {
            return true;
        }
        if self.pairs >= MAX_REMEMBERED || names.is_some_and(|n| n.len() >= MAX_NAMES_PER_ADDRESS) {
            return false;
        }
        self.resolved.entry(ip).or_default().insert(name.to_owned());
        self.pairs += 1;
        true
    }

    /// Judges a connection to `dest`. An address rule allows what it holds, but a special
    /// address only when the rule lies inside that address's block (`10.20.0.0/16` may reach
    /// 10.20.1.2; `0.0.0.0/0` may not reach 10.20.1.2, the host's loopback or a metadata
    /// service), and an address that is not unicast never. A name rule allows an address the
    /// host resolved for a name it holds; a private address only for an exact name (never a
    /// `*.` rule); link-local and metadata addresses never.
    pub fn decide(&self, dest: SocketAddrV4) -> Decision {
        let ip = *dest.ip();
        let on_port = || self.rules.iter().filter(move |r| r.port == dest.port());
        let block = block(ip);
        let covers = |r: &EgressRule| match (&r.target, block) {
            (_, Some((_, _, "not a unicast address"))) => false,
            (Target::Net { addr, prefix }, Some((net, len, _))) => {
                *prefix >= len && in_net(*addr, net, len)
            }
            (t, None) => t.holds_addr(ip),
            _ => false,
        };
        if let Some(r) = on_port().find(|r| r.target.holds_addr(ip) && covers(r)) {
            return Decision {
                rule: Some(r.to_string()),
                name: None,
                names: BTreeSet::new(),
                reason: None,
            };
        }
        let kind = special(ip);
        let names = self.resolved.get(&ip);
        let mut allowed = BTreeSet::new();
        let mut first = None;
        let mut refused_special = None;
        for name in names.into_iter().flatten() {
            for r in on_port().filter(|r| r.target.holds_name(name)) {
                let ok = match (kind, &r.target) {
                    (None, _) => true,
                    // The host's lookup never answers a loopback address (`dns::host_lookup`);
                    // only a test's resolver can put one here.
                    (Some("a private address" | "a loopback address"), Target::Name(_)) => true,
                    (Some(k), _) => {
                        refused_special = Some(format!(
                            "{ip} ({name}) is {k}; only an address rule can allow it"
                        ));
                        false
                    }
                };
                if ok {
                    allowed.insert(name.clone());
                    first.get_or_insert((r.to_string(), name.clone()));
                }
            }
        }
        if let Some((rule, name)) = first {
            return Decision { rule: Some(rule), name: Some(name), names: allowed, reason: None };
        }
        if let Some(reason) = refused_special {
            return Decision::deny(reason);
        }
        if let (Some(k), Some(r)) = (kind, on_port().find(|r| r.target.holds_addr(ip))) {
            return Decision::deny(format!(
                "{ip} is {k}; the rule {r} is wider than its block, so it does not reach it"
            ));
        }
        let what = match names {
            Some(n) => format!("{dest} ({})", n.iter().cloned().collect::<Vec<_>>().join(", ")),
            None => dest.to_string(),
        };
        Decision::deny(format!("no egress rule allows {what}"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn list(rules: &[&str]) -> Allowlist {
        Allowlist::new(rules.iter().map(|r| EgressRule::parse(r).unwrap()).collect())
    }

    fn at(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn address_rules_allow_what_they_hold_on_their_port() {
        let l = list(&["10.20.0.0/16:5432", "169.254.169.254:80"]);
        assert_eq!(l.decide(at("10.20.3.4:5432")).rule.as_deref(), Some("10.20.0.0/16:5432"));
        assert!(!l.decide(at("10.20.3.4:5433")).allowed());
        assert!(!l.decide(at("10.21.3.4:5432")).allowed());
        assert!(l.decide(at("169.254.169.254:80")).allowed(), "named by an address rule");
        let wide = list(&["0.0.0.0/0:80", "10.0.0.0/8:80"]);
        assert!(wide.decide(at("93.184.216.34:80")).allowed());
        assert!(wide.decide(at("10.1.1.1:80")).allowed(), "inside its block");
        for inside in ["169.254.169.254:80", "127.0.0.1:80", "192.168.1.1:80", "0.0.0.1:80"] {
            let d = wide.decide(at(inside));
            assert!(!d.allowed() && d.reason.unwrap().contains("wider"), "{inside}");
        }
        assert!(!list(&["0.0.0.0/8:80"]).decide(at("0.0.0.1:80")).allowed(), "never");
        assert!(l.decide(at("10.20.3.4:5432")).names.is_empty(), "no name check");
    }

    #[test]
    fn name_rules_allow_only_what_the_host_resolved_for_them() {
        let mut l = list(&["api.example.eu:443", "*.cdn.example.eu:443"]);
        assert!(l.name_allowed("api.example.eu") && l.name_allowed("x.cdn.example.eu"));
        assert!(!l.name_allowed("example.eu") && !l.name_allowed("evil.com"));
        assert!(!l.decide(at("93.184.216.34:443")).allowed(), "never resolved");
        l.remember("api.example.eu", "93.184.216.34".parse().unwrap());
        let d = l.decide(at("93.184.216.34:443"));
        assert_eq!(d.name.as_deref(), Some("api.example.eu"));
        assert_eq!(d.names.iter().collect::<Vec<_>>(), ["api.example.eu"]);
        assert!(!l.decide(at("93.184.216.34:80")).allowed(), "other port");
        let why = l.decide(at("93.184.216.34:80")).reason.unwrap();
        assert!(why.contains("api.example.eu"), "{why}");
    }

    #[test]
    fn special_addresses_need_an_exact_name_or_an_address_rule() {
        let mut l = list(&["db.internal.example:5432", "*.internal.example:5432"]);
        l.remember("db.internal.example", "10.1.2.3".parse().unwrap());
        l.remember("x.internal.example", "10.9.9.9".parse().unwrap());
        l.remember("db.internal.example", "169.254.169.254".parse().unwrap());
        l.remember("x.internal.example", "127.0.0.1".parse().unwrap());
        assert!(l.decide(at("10.1.2.3:5432")).allowed(), "exact name, private address");
        assert!(!l.decide(at("10.9.9.9:5432")).allowed(), "wildcard, private address");
        assert!(!l.decide(at("127.0.0.1:5432")).allowed(), "wildcard, loopback");
        let why = l.decide(at("169.254.169.254:5432")).reason.unwrap();
        assert!(why.contains("metadata"), "{why}");
    }

    #[test]
    fn addresses_are_classified() {
        for (ip, kind) in [
            ("127.0.0.1", Some("a loopback address")),
            ("10.0.0.1", Some("a private address")),
            ("172.16.0.1", Some("a private address")),
            ("192.168.1.1", Some("a private address")),
            ("100.64.0.1", Some("a private address")),
            ("169.254.1.1", Some("a link-local address")),
            ("169.254.169.254", Some("a cloud metadata address")),
            ("100.100.100.200", Some("a cloud metadata address")),
            ("0.0.0.0", Some("not a unicast address")),
            ("224.0.0.1", Some("not a unicast address")),
            ("255.255.255.255", Some("not a unicast address")),
            ("93.184.216.34", None),
        ] {
            assert_eq!(special(ip.parse().unwrap()), kind, "{ip}");
        }
    }

    #[test]
    fn the_name_table_is_bounded() {
        let mut l = list(&["a.example.eu:1"]);
        for i in 0..MAX_REMEMBERED as u32 {
            assert!(l.remember("a.example.eu", Ipv4Addr::from(0x0100_0000 + i)));
        }
        assert!(!l.remember("a.example.eu", "9.9.9.9".parse().unwrap()));
        assert!(l.remember("a.example.eu", Ipv4Addr::from(0x0100_0000)), "already known");
        let mut l = list(&["*.example.eu:1"]);
        let ip = "9.9.9.9".parse().unwrap();
        for i in 0..MAX_NAMES_PER_ADDRESS {
            assert!(l.remember(&format!("n{i}.example.eu"), ip));
        }
        assert!(!l.remember("one-more.example.eu", ip), "names per address are bounded");
    }
}
