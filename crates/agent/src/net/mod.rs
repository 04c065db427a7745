//! The guest side of the cell's network (the contract is `isocell_proto::net`). The VMM has no
//! network device: everything is carried over vsock.
//!
//! - The loopback is always brought up.
//! - **Egress**: `dummy0` gets [`CELL_ADDR`] and the default route, so programs can connect
//!   anywhere; an nftables rule redirects every outgoing TCP connection (except to the
//!   loopback) to the agent's listener on [`EGRESS_LISTEN_PORT`], which learns the original
//!   destination and asks the host for it over one vsock stream per connection. DNS queries
//!   to 127.0.0.1:53 are forwarded to the host as well.
//! - **Ingress**: the host's connections to [`INGRESS_PORT`] are relayed to the port they name
//!   on the cell's loopback.

mod dns;
mod link;
mod nft;
mod relay;

use std::net::{Ipv4Addr, TcpListener};

use isocell_proto::net::INGRESS_PORT;

use crate::boot::Net;
use crate::log;

/// The loopback port the egress redirect sends outgoing connections to.
pub const EGRESS_LISTEN_PORT: u16 = 15001;
/// The cell's own address on `dummy0`, the interface the default route points at (packets
/// never leave through it: the redirect catches them first).
pub const CELL_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The netmask of [`CELL_ADDR`].
pub const CELL_NETMASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
/// The interface that carries [`CELL_ADDR`] and the default route.
const EGRESS_DEVICE: &str = "dummy0";

/// Sets up the parts of the network the kernel command line asks for. Nothing here is fatal:
/// each failure is said on the console in one line and the cell goes on without that part.
pub fn set_up(net: Net) {
    if let Err(e) = link::up("lo") {
        log(&format!("network: {e}; the loopback is down"));
    }
    if net.egress {
        match egress() {
            Ok(()) => {
                if let Err(e) = dns::start() {
                    log(&format!("network: {e}; no DNS"));
                }
            }
            Err(e) => log(&format!("network: {e}; no egress")),
        }
    }
    if net.ingress {
        if let Err(e) = relay::listen_ingress() {
            log(&format!("network: vsock port {INGRESS_PORT}: {e}; no published ports"));
        }
    }
}

/// Sets up egress. The order matters: the listener is bound before the redirect exists, and
/// the default route comes last, so if a step fails programs get "network unreachable" at
/// once rather than connections that hang. (Should even the thread fail to start, the
/// listener is closed and redirected connections are refused, never left waiting.)
fn egress() -> Result<(), String> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, EGRESS_LISTEN_PORT))
        .map_err(|e| format!("listen on 127.0.0.1:{EGRESS_LISTEN_PORT}: {e}"))?;
    nft::install_redirect(EGRESS_LISTEN_PORT)?;
    link::configure(EGRESS_DEVICE, CELL_ADDR, CELL_NETMASK)?;
    link::add_default_route(EGRESS_DEVICE)?;
    relay::serve_egress(listener)
}
