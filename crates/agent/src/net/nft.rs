//! The egress redirect, programmed into nf_tables over netlink (a cell has no `nft` binary).
//! One batch does what these commands do:
//!
//! ```text
//! nft add table ip isocell
//! nft add chain ip isocell out '{ type nat hook output priority -100; }'
//! nft add rule ip isocell out ip daddr != 127.0.0.0/8 meta l4proto tcp redirect to :PORT
//! ```
//!
//! The encoding follows `<linux/netlink.h>`, `<linux/netfilter/nfnetlink.h>` and
//! `<linux/netfilter/nf_tables.h>`: netlink headers and attribute headers in host order,
//! nf_tables integer values big-endian, every attribute padded to 4 bytes.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    bind, recv, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr,
    SockFlag, SockProtocol, SockType,
};
use nix::sys::time::TimeVal;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 0x2;
const NLA_F_NESTED: u16 = 0x8000;
const NLMSG_HDRLEN: usize = 16;

const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFPROTO_UNSPEC: u8 = 0;
const NFPROTO_IPV4: u8 = 2;
const NF_INET_LOCAL_OUT: u32 = 3;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;

/// Register 1 (of the four 128-bit registers every kernel has).
const REG_1: u32 = 1;

const TABLE: &str = "isocell";
const CHAIN: &str = "out";

/// One netlink attribute: header, payload, padding to 4 bytes.
fn attr(ty: u16, payload: &[u8]) -> Vec<u8> {
    // Every attribute here is a few dozen bytes, far below u16::MAX.
    let len = (4 + payload.len()) as u16;
    let mut out = Vec::with_capacity(usize::from(len) + 3);
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len().next_multiple_of(4), 0);
    out
}

/// A NUL-terminated string attribute.
fn string(ty: u16, s: &str) -> Vec<u8> {
    attr(ty, &[s.as_bytes(), &[0]].concat())
}

/// A big-endian u32 attribute.
fn be32(ty: u16, v: u32) -> Vec<u8> {
    attr(ty, &v.to_be_bytes())
}

/// An attribute holding other attributes.
fn nested(ty: u16, attrs: &[Vec<u8>]) -> Vec<u8> {
    attr(ty | NLA_F_NESTED, &attrs.concat())
}

/// An `nft_data` value (NFTA_DATA_VALUE inside attribute `ty`).
fn data(ty: u16, value: &[u8]) -> Vec<u8> {
    nested(ty, &[attr(NFTA_DATA_VALUE, value)])
}

/// One expression of a rule: a list element with its name and its own attributes.
fn expr(name: &str, attrs: &[Vec<u8>]) -> Vec<u8> {
    nested(NFTA_LIST_ELEM, &[string(NFTA_EXPR_NAME, name), nested(NFTA_EXPR_DATA, attrs)])
}

/// One nfnetlink message: netlink header, `nfgenmsg`, attributes.
fn message(ty: u16, flags: u16, seq: u32, family: u8, res_id: u16, attrs: &[Vec<u8>]) -> Vec<u8> {
    let body = attrs.concat();
    let len = (NLMSG_HDRLEN + 4 + body.len()) as u32;
    let mut out = Vec::with_capacity(len as usize);
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills in ours
    out.push(family);
    out.push(0); // NFNETLINK_V0
    out.extend_from_slice(&res_id.to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// An nf_tables command in the batch, acknowledged.
fn command(msg: u16, extra_flags: u16, seq: u32, attrs: &[Vec<u8>]) -> Vec<u8> {
    let ty = (NFNL_SUBSYS_NFTABLES << 8) | msg;
    message(ty, NLM_F_REQUEST | NLM_F_ACK | extra_flags, seq, NFPROTO_IPV4, 0, attrs)
}

/// The rule's expressions: `meta l4proto tcp`, `ip daddr != 127.0.0.0/8`, `redirect to :port`.
fn rule_expressions(port: u16) -> Vec<Vec<u8>> {
    const NFT_META_L4PROTO: u32 = 16;
    const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
    const NFT_CMP_EQ: u32 = 0;
    const NFT_CMP_NEQ: u32 = 1;
    vec![
        // meta l4proto -> reg 1 (one byte)
        expr("meta", &[be32(2 /* KEY */, NFT_META_L4PROTO), be32(1 /* DREG */, REG_1)]),
        // reg 1 == IPPROTO_TCP
        expr("cmp", &[be32(1 /* SREG */, REG_1), be32(2 /* OP */, NFT_CMP_EQ), data(3, &[6])]),
        // ip daddr (offset 16, 4 bytes) -> reg 1
        expr(
            "payload",
            &[
                be32(1 /* DREG */, REG_1),
                be32(2 /* BASE */, NFT_PAYLOAD_NETWORK_HEADER),
                be32(3 /* OFFSET */, 16),
                be32(4 /* LEN */, 4),
            ],
        ),
        // reg 1 = (reg 1 & 255.0.0.0) ^ 0
        expr(
            "bitwise",
            &[
                be32(1 /* SREG */, REG_1),
                be32(2 /* DREG */, REG_1),
                be32(3 /* LEN */, 4),
                data(4 /* MASK */, &[0xff, 0, 0, 0]),
                data(5 /* XOR */, &[0, 0, 0, 0]),
            ],
        ),
        // reg 1 != 127.0.0.0
        expr("cmp", &[be32(1, REG_1), be32(2, NFT_CMP_NEQ), data(3, &[127, 0, 0, 0])]),
        // reg 1 = the port, in network order as NAT wants it
        expr("immediate", &[be32(1 /* DREG */, REG_1), data(2 /* DATA */, &port.to_be_bytes())]),
        // redirect to 127.0.0.1:reg 1 (the loopback, since the hook is output)
        expr("redir", &[be32(1 /* REG_PROTO_MIN */, REG_1)]),
    ]
}

/// The whole batch, with the sequence numbers of the acknowledged commands and what each is.
fn batch(port: u16) -> (Vec<u8>, [(u32, &'static str); 3]) {
    let batch_marker =
        |ty, seq| message(ty, NLM_F_REQUEST, seq, NFPROTO_UNSPEC, NFNL_SUBSYS_NFTABLES, &[]);
    let hook = nested(
        NFTA_CHAIN_HOOK,
        &[be32(NFTA_HOOK_HOOKNUM, NF_INET_LOCAL_OUT), be32(NFTA_HOOK_PRIORITY, (-100i32) as u32)],
    );
    let bytes = [
        batch_marker(NFNL_MSG_BATCH_BEGIN, 1),
        command(NFT_MSG_NEWTABLE, NLM_F_CREATE, 2, &[string(NFTA_TABLE_NAME, TABLE)]),
        command(
            NFT_MSG_NEWCHAIN,
            NLM_F_CREATE,
            3,
            &[
                string(NFTA_CHAIN_TABLE, TABLE),
                string(NFTA_CHAIN_NAME, CHAIN),
                hook,
                string(NFTA_CHAIN_TYPE, "nat"),
            ],
        ),
        command(
            NFT_MSG_NEWRULE,
            NLM_F_CREATE | NLM_F_APPEND,
            4,
            &[
                string(NFTA_RULE_TABLE, TABLE),
                string(NFTA_RULE_CHAIN, CHAIN),
                nested(NFTA_RULE_EXPRESSIONS, &rule_expressions(port)),
            ],
        ),
        batch_marker(NFNL_MSG_BATCH_END, 5),
    ]
    .concat();
    (bytes, [(2, "table"), (3, "chain"), (4, "rule")])
}

/// The `(sequence, error)` of every NLMSG_ERROR message (an ACK when the error is 0) in a
/// datagram from the kernel; anything malformed ends the walk.
fn errors(mut buf: &[u8]) -> Vec<(u32, i32)> {
    let u32_at = |b: &[u8], at: usize| {
        b.get(at..at + 4).and_then(|s| s.try_into().ok()).map(u32::from_ne_bytes)
    };
    let mut out = Vec::new();
    while let Some(len) = u32_at(buf, 0) {
        let len = len as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            break;
        }
        let ty = buf.get(4..6).and_then(|s| s.try_into().ok()).map(u16::from_ne_bytes);
        if ty == Some(NLMSG_ERROR) {
            if let (Some(seq), Some(err)) = (u32_at(buf, 8), u32_at(buf, NLMSG_HDRLEN)) {
                out.push((seq, err as i32));
            }
        }
        buf = buf.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    out
}

/// Installs the redirect of outgoing TCP connections to `127.0.0.1:port`.
pub fn install_redirect(port: u16) -> Result<(), String> {
    let fail = |what: &str, e: nix::Error| format!("nftables: {what}: {e}");
    let sock: OwnedFd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )
    .map_err(|e| fail("netlink socket", e))?;
    let kernel = NetlinkAddr::new(0, 0);
    bind(sock.as_raw_fd(), &kernel).map_err(|e| fail("bind", e))?;
    // The kernel answers at once; a bounded wait keeps a surprise from hanging the boot.
    setsockopt(&sock, sockopt::ReceiveTimeout, &TimeVal::new(2, 0))
        .map_err(|e| fail("receive timeout", e))?;
    let (bytes, acked) = batch(port);
    sendto(sock.as_raw_fd(), &bytes, &kernel, MsgFlags::empty()).map_err(|e| fail("send", e))?;
    let mut pending = acked.to_vec();
    let mut buf = vec![0u8; 16 * 1024];
    while !pending.is_empty() {
        let n = recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty())
            .map_err(|e| fail("waiting for the kernel's answer", e))?;
        for (seq, err) in errors(buf.get(..n).unwrap_or_default()) {
            if err != 0 {
                let what = acked.iter().find(|(s, _)| *s == seq).map_or("batch", |(_, w)| *w);
                let e = std::io::Error::from_raw_os_error(err.saturating_neg());
                return Err(format!("nftables: the kernel refused the {what}: {e}"));
            }
            pending.retain(|(s, _)| *s != seq);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ne16(v: u16) -> Vec<u8> {
        v.to_ne_bytes().to_vec()
    }

    /// Checks that `buf` is a well-formed run of attributes, recursing into nested ones.
    fn check_attributes(buf: &[u8]) {
        let mut at = 0;
        while at < buf.len() {
            let len = usize::from(u16::from_ne_bytes(buf[at..at + 2].try_into().unwrap()));
            let ty = u16::from_ne_bytes(buf[at + 2..at + 4].try_into().unwrap());
            assert!(len >= 4 && at + len <= buf.len(), "attribute overruns at {at}");
            if ty & NLA_F_NESTED != 0 {
                check_attributes(&buf[at + 4..at + len]);
            }
            let next = at + len.next_multiple_of(4);
            assert!(buf[at + len..next.min(buf.len())].iter().all(|&b| b == 0), "padding");
            at = next;
        }
        assert_eq!(at, buf.len());
    }

    #[test]
    fn attributes_are_padded_to_four_bytes() {
        assert_eq!(attr(1, &[6]), [ne16(5), ne16(1), vec![6, 0, 0, 0]].concat());
        assert_eq!(string(3, "out"), [ne16(8), ne16(3), b"out\0".to_vec()].concat());
        assert_eq!(string(1, "isocell"), [ne16(12), ne16(1), b"isocell\0".to_vec()].concat());
        assert_eq!(be32(2, 0xfffffd9c), [ne16(8), ne16(2), vec![0xff, 0xff, 0xfd, 0x9c]].concat());
        assert_eq!(attr(7, &[]), [ne16(4), ne16(7)].concat());
    }

    #[test]
    fn an_expression_nests_as_the_kernel_expects() {
        let cmp = expr("cmp", &[be32(1, 1), be32(2, 0), data(3, &[6])]);
        let expected = [
            ne16(44),
            ne16(NFTA_LIST_ELEM | NLA_F_NESTED),
            [ne16(8), ne16(NFTA_EXPR_NAME), b"cmp\0".to_vec()].concat(),
            ne16(32),
            ne16(NFTA_EXPR_DATA | NLA_F_NESTED),
            [ne16(8), ne16(1), vec![0, 0, 0, 1]].concat(),
            [ne16(8), ne16(2), vec![0, 0, 0, 0]].concat(),
            [ne16(12), ne16(3 | NLA_F_NESTED), ne16(5), ne16(NFTA_DATA_VALUE), vec![6, 0, 0, 0]]
                .concat(),
        ]
        .concat();
        assert_eq!(cmp, expected);
    }

    #[test]
    fn the_batch_is_five_well_formed_messages() {
        let (bytes, acked) = batch(15001);
        let mut at = 0;
        let mut seen = Vec::new();
        while at < bytes.len() {
            let len = u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            let ty = u16::from_ne_bytes(bytes[at + 4..at + 6].try_into().unwrap());
            let flags = u16::from_ne_bytes(bytes[at + 6..at + 8].try_into().unwrap());
            let seq = u32::from_ne_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            assert_eq!(len % 4, 0);
            let nfgen = &bytes[at + 16..at + 20];
            check_attributes(&bytes[at + 20..at + len]);
            seen.push((ty, flags & NLM_F_ACK != 0, seq, nfgen.to_vec()));
            at += len;
        }
        assert_eq!(at, bytes.len());
        let nft = |m: u16| (NFNL_SUBSYS_NFTABLES << 8) | m;
        let ip = vec![NFPROTO_IPV4, 0, 0, 0];
        assert_eq!(
            seen,
            [
                (NFNL_MSG_BATCH_BEGIN, false, 1, vec![0, 0, 0, 10]),
                (nft(NFT_MSG_NEWTABLE), true, 2, ip.clone()),
                (nft(NFT_MSG_NEWCHAIN), true, 3, ip.clone()),
                (nft(NFT_MSG_NEWRULE), true, 4, ip),
                (NFNL_MSG_BATCH_END, false, 5, vec![0, 0, 0, 10]),
            ]
        );
        assert_eq!(acked.map(|(s, _)| s), [2, 3, 4]);
        // The port is loaded big-endian, and the chain hooks output at priority -100.
        let window = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        assert!(window(&[ne16(6), ne16(NFTA_DATA_VALUE), vec![0x3a, 0x99, 0, 0]].concat()));
        assert!(window(&[ne16(8), ne16(NFTA_HOOK_HOOKNUM), vec![0, 0, 0, 3]].concat()));
        assert!(window(
            &[ne16(8), ne16(NFTA_HOOK_PRIORITY), vec![0xff, 0xff, 0xff, 0x9c]].concat()
        ));
    }

    #[test]
    fn kernel_answers_are_read_without_trusting_them() {
        let error = |seq: u32, err: i32| {
            let mut m = Vec::new();
            m.extend_from_slice(&36u32.to_ne_bytes());
            m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            m.extend_from_slice(&0u16.to_ne_bytes());
            m.extend_from_slice(&seq.to_ne_bytes());
            m.extend_from_slice(&0u32.to_ne_bytes());
            m.extend_from_slice(&err.to_ne_bytes());
            m.extend_from_slice(&[0; 16]); // the echoed request header
            m
        };
        let two = [error(2, 0), error(4, -17)].concat();
        assert_eq!(errors(&two), [(2, 0), (4, -17)]);
        assert_eq!(errors(&two[..40]), [(2, 0)]);
        assert_eq!(errors(&[]), []);
        assert_eq!(errors(&[255; 3]), []);
        let mut zero_len = error(2, 0);
        zero_len[..4].copy_from_slice(&0u32.to_ne_bytes());
        assert_eq!(errors(&zero_len), []);
    }
}
