//! The cell's DNS, answered by the host: only names the allowlist holds get an answer (their
//! IPv4 addresses, as this host resolves them, remembered so a connection to one can be
//! allowed by name); every other name is NXDOMAIN. Nothing is forwarded to another server as
//! the guest wrote it: a query only ever becomes a host lookup of an allowed name.

use std::net::Ipv4Addr;

use simple_dns::rdata::{RData, A};
use simple_dns::{Name, Packet, PacketFlag, Question, ResourceRecord, CLASS, QTYPE, RCODE, TYPE};

use super::allow::Allowlist;

/// How long the cell may cache an answer, seconds.
const TTL: u32 = 60;

/// What one query was and how it was answered, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answered {
    /// The name asked for (lower case), if the query could be read.
    pub name: Option<String>,
    /// `A`, `AAAA`, ... as asked.
    pub qtype: String,
    /// `answered`, `no_data`, `nxdomain` (not allowed), `servfail` (the host's lookup failed),
    /// `formerr` (not a query we read).
    pub result: &'static str,
    /// The addresses given.
    pub addresses: Vec<Ipv4Addr>,
}

/// Answers one query. `resolve` looks a name up on the host; `list` is locked only to check
/// the name and to remember the answer, never across the lookup. `None`: not even an id to
/// answer to.
pub fn answer(
    query: &[u8],
    list: &std::sync::Mutex<Allowlist>,
    resolve: &dyn Fn(&str) -> std::io::Result<Vec<Ipv4Addr>>,
) -> Option<(Vec<u8>, Answered)> {
    let mut answered =
        Answered { name: None, qtype: String::new(), result: "formerr", addresses: Vec::new() };
    let packet = match Packet::parse(query) {
        Ok(p) if p.questions.len() == 1 && !p.has_flags(PacketFlag::RESPONSE) => p,
        _ => {
            let id = u16::from_be_bytes([*query.first()?, *query.get(1)?]);
            let mut reply = Packet::new_reply(id);
            *reply.rcode_mut() = RCODE::FormatError;
            return Some((reply.build_bytes_vec().ok()?, answered));
        }
    };
    let q = &packet.questions[0];
    let name = q.qname.to_string().trim_end_matches('.').to_ascii_lowercase();
    answered.name = Some(name.clone());
    answered.qtype = format!("{:?}", q.qtype);
    let mut reply = Packet::new_reply(packet.id());
    if packet.has_flags(PacketFlag::RECURSION_DESIRED) {
        reply.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    reply.set_flags(PacketFlag::RECURSION_AVAILABLE);
    reply.questions.push(Question::new(q.qname.clone(), q.qtype, q.qclass, false));
    // A name is looked up only if it is a DNS name we accept, and the allowlist holds it.
    let allowed = isocell_spec::network::valid_name(&name) && lock(list).name_allowed(&name);
    answered.result = if !allowed {
        *reply.rcode_mut() = RCODE::NameError;
        "nxdomain"
    } else if q.qtype != QTYPE::TYPE(TYPE::A) {
        "no_data" // the cell carries IPv4 only
    } else {
        match resolve(&name) {
            Err(_) => {
                *reply.rcode_mut() = RCODE::ServerFailure;
                "servfail"
            }
            Ok(addrs) => {
                let mut list = lock(list);
                for ip in addrs {
                    if list.remember(&name, ip) && !answered.addresses.contains(&ip) {
                        answered.addresses.push(ip);
                    }
                }
                drop(list);
                for ip in &answered.addresses {
                    let rdata = RData::A(A { address: u32::from(*ip) });
                    reply.answers.push(ResourceRecord::new(q.qname.clone(), CLASS::IN, TTL, rdata));
                }
                if answered.addresses.is_empty() {
                    "no_data"
                } else {
                    "answered"
                }
            }
        }
    };
    Some((reply.build_bytes_vec().ok()?, answered))
}

fn lock(list: &std::sync::Mutex<Allowlist>) -> std::sync::MutexGuard<'_, Allowlist> {
    list.lock().unwrap_or_else(|p| p.into_inner())
}

/// Looks `name` up on this host (its resolver: /etc/hosts, then its name servers); IPv4 only,
/// and never a loopback address: in the cell that would be the cell itself, and the host's own
/// loopback services are not the cell's to reach by name.
pub fn host_lookup(name: &str) -> std::io::Result<Vec<Ipv4Addr>> {
    use std::net::ToSocketAddrs;
    Ok((name, 0u16)
        .to_socket_addrs()?
        .filter_map(|a| match a.ip() {
            std::net::IpAddr::V4(ip) if !ip.is_loopback() => Some(ip),
            _ => None,
        })
        .collect())
}

/// A query for `name` of type `qtype` (for tests and the benchmark's checks).
pub fn query(id: u16, name: &str, qtype: TYPE) -> Option<Vec<u8>> {
    let mut p = Packet::new_query(id);
    p.set_flags(PacketFlag::RECURSION_DESIRED);
    p.questions.push(Question::new(Name::new(name).ok()?, qtype.into(), CLASS::IN.into(), false));
    p.build_bytes_vec().ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Mutex;

    use isocell_spec::EgressRule;

    use super::*;

    fn list() -> Mutex<Allowlist> {
        Mutex::new(Allowlist::new(vec![EgressRule::parse("payload.test:8080").unwrap()]))
    }

    fn fake(name: &str) -> std::io::Result<Vec<Ipv4Addr>> {
        assert_eq!(name, "payload.test", "only allowed names are looked up");
        Ok(vec![Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST])
    }

    #[test]
    fn allowed_names_are_answered_and_remembered() {
        let l = list();
        let (bytes, a) = answer(&query(7, "Payload.Test", TYPE::A).unwrap(), &l, &fake).unwrap();
        assert_eq!(a.result, "answered");
        assert_eq!(a.addresses, [Ipv4Addr::LOCALHOST]);
        let reply = Packet::parse(&bytes).unwrap();
        assert_eq!((reply.id(), reply.rcode(), reply.answers.len()), (7, RCODE::NoError, 1));
        assert!(l.lock().unwrap().decide("127.0.0.1:8080".parse().unwrap()).allowed());
    }

    #[test]
    fn other_names_get_nxdomain_and_other_types_no_data() {
        let l = list();
        let (bytes, a) = answer(&query(1, "evil.test", TYPE::A).unwrap(), &l, &fake).unwrap();
        assert_eq!(a.result, "nxdomain");
        assert_eq!(Packet::parse(&bytes).unwrap().rcode(), RCODE::NameError);
        let (bytes, a) = answer(&query(2, "payload.test", TYPE::AAAA).unwrap(), &l, &fake).unwrap();
        assert_eq!(a.result, "no_data");
        assert!(Packet::parse(&bytes).unwrap().answers.is_empty());
        let failing = |_: &str| Err(std::io::Error::other("down"));
        let (_, a) = answer(&query(3, "payload.test", TYPE::A).unwrap(), &l, &failing).unwrap();
        assert_eq!(a.result, "servfail");
    }

    #[test]
    fn the_host_never_answers_a_loopback_address() {
        assert!(host_lookup("localhost").map(|a| a.is_empty()).unwrap_or(true));
    }

    #[test]
    fn garbage_gets_formerr_or_nothing() {
        let l = list();
        assert!(answer(&[], &l, &fake).is_none());
        assert!(answer(&[1], &l, &fake).is_none());
        let (bytes, a) = answer(&[0x12, 0x34, 0xff, 0xff, 9], &l, &fake).unwrap();
        assert_eq!(a.result, "formerr");
        let reply = Packet::parse(&bytes).unwrap();
        assert_eq!((reply.id(), reply.rcode()), (0x1234, RCODE::FormatError));
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..3000usize {
            let mut buf = query(9, "payload.test", TYPE::A).unwrap();
            buf.truncate(len % (buf.len() + 1));
            for b in buf.iter_mut().skip(len % 5) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                if seed.is_multiple_of(3) {
                    *b = seed as u8;
                }
            }
            let _ = answer(&buf, &l, &|_| Ok(vec![]));
        }
    }
}
