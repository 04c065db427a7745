//! Interfaces and routes, set with the classic ioctls on an `AF_INET` datagram socket (there is
//! no `ip` binary in a cell, and these few settings need no rtnetlink).

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

use libc::{c_char, c_short, ifreq};
use nix::errno::Errno;
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

nix::ioctl_read_bad!(
    /// SIOCGIFFLAGS: reads an interface's flags.
    get_flags,
    libc::SIOCGIFFLAGS,
    ifreq
);
nix::ioctl_write_ptr_bad!(
    /// SIOCSIFFLAGS: sets an interface's flags.
    set_flags,
    libc::SIOCSIFFLAGS,
    ifreq
);
nix::ioctl_write_ptr_bad!(
    /// SIOCSIFADDR: sets an interface's IPv4 address.
    set_addr,
    libc::SIOCSIFADDR,
    ifreq
);
nix::ioctl_write_ptr_bad!(
    /// SIOCSIFNETMASK: sets the netmask of an interface's IPv4 address.
    set_netmask,
    libc::SIOCSIFNETMASK,
    ifreq
);
nix::ioctl_write_ptr_bad!(
    /// SIOCADDRT: adds an IPv4 route.
    add_route,
    libc::SIOCADDRT,
    RtEntry
);

/// The kernel's `struct rtentry` (`<linux/route.h>`), spelled out because not every libc
/// target of the `libc` crate has it; `repr(C)` gives it the kernel's layout on every arch.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: c_short,
    rt_dev: *mut c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// A socket for the ioctls.
fn control_socket() -> Result<OwnedFd, String> {
    socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| format!("socket for interface settings: {e}"))
}

/// An interface name as the kernel wants it: NUL-padded to `IFNAMSIZ`.
fn ifname(name: &str) -> Result<[c_char; libc::IFNAMSIZ], String> {
    let mut out: [c_char; libc::IFNAMSIZ] = [0; libc::IFNAMSIZ];
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(format!("bad interface name {name:?}"));
    }
    for (o, b) in out.iter_mut().zip(name.bytes()) {
        *o = c_char::from_ne_bytes([b]); // i8 or u8 depending on the arch
    }
    Ok(out)
}

/// An `ifreq` for interface `name`, its union zeroed.
fn request(name: &str) -> Result<ifreq, String> {
    // SAFETY: `ifreq` is a plain C struct (a name array and a union of integers, addresses and
    // a raw pointer), for which all-zero bytes are a valid value.
    let mut req: ifreq = unsafe { std::mem::zeroed() };
    req.ifr_name = ifname(name)?;
    Ok(req)
}

/// `ip` as a `struct sockaddr` (really a `sockaddr_in`, port 0), as the ioctls take it.
pub fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let mut sa_data: [c_char; 14] = [0; 14];
    // sockaddr_in: port (2 bytes, zero here), then the address in network order.
    for (d, b) in sa_data[2..6].iter_mut().zip(ip.octets()) {
        *d = c_char::from_ne_bytes([b]);
    }
    libc::sockaddr { sa_family: libc::AF_INET as libc::sa_family_t, sa_data }
}

/// Brings interface `name` up.
pub fn up(name: &str) -> Result<(), String> {
    let sock = control_socket()?;
    let mut req = request(name)?;
    // SAFETY: `req` is a valid, writable ifreq that outlives the call; SIOCGIFFLAGS writes
    // only its flags.
    unsafe { get_flags(sock.as_raw_fd(), &mut req) }
        .map_err(|e| format!("read the flags of {name}: {e}"))?;
    // SAFETY: SIOCGIFFLAGS just filled in `ifru_flags`, the union member read here.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as c_short;
    // SAFETY: `req` is a valid ifreq naming the interface, with its flags set; the kernel only
    // reads it.
    unsafe { set_flags(sock.as_raw_fd(), &req) }.map_err(|e| format!("bring {name} up: {e}"))?;
    Ok(())
}

/// Gives interface `name` the address `addr`/`netmask` and brings it up.
pub fn configure(name: &str, addr: Ipv4Addr, netmask: Ipv4Addr) -> Result<(), String> {
    let sock = control_socket()?;
    let mut req = request(name)?;
    req.ifr_ifru.ifru_addr = sockaddr(addr);
    // SAFETY: `req` is a valid ifreq naming the interface with an AF_INET address; the kernel
    // only reads it.
    unsafe { set_addr(sock.as_raw_fd(), &req) }
        .map_err(|e| format!("give {name} the address {addr}: {e}"))?;
    req.ifr_ifru.ifru_netmask = sockaddr(netmask);
    // SAFETY: as above, with the netmask in the union.
    unsafe { set_netmask(sock.as_raw_fd(), &req) }
        .map_err(|e| format!("give {name} the netmask {netmask}: {e}"))?;
    up(name)
}

/// Adds the default route through interface `name` (no gateway: the interface is the link).
/// A default route that is already there is fine.
pub fn add_default_route(name: &str) -> Result<(), String> {
    let sock = control_socket()?;
    // The kernel copies IFNAMSIZ - 1 bytes from `rt_dev`, so it points at a full-size buffer.
    let mut dev = ifname(name)?;
    let any = sockaddr(Ipv4Addr::UNSPECIFIED);
    let route = RtEntry {
        rt_pad1: 0,
        rt_dst: any,
        rt_gateway: any,
        rt_genmask: any,
        rt_flags: libc::RTF_UP,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: dev.as_mut_ptr(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    // SAFETY: `route` is a valid rtentry whose `rt_dev` points at `dev`, a NUL-terminated
    // IFNAMSIZ buffer that outlives the call; the kernel only reads both.
    match unsafe { add_route(sock.as_raw_fd(), &route) } {
        Ok(_) | Err(Errno::EEXIST) => Ok(()),
        Err(e) => Err(format!("add the default route via {name}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn addresses_are_laid_out_as_a_sockaddr_in() {
        let sa = sockaddr(Ipv4Addr::new(10, 0, 2, 15));
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: u32::from(Ipv4Addr::new(10, 0, 2, 15)).to_be() },
            sin_zero: [0; 8],
        };
        assert_eq!(std::mem::size_of_val(&sa), std::mem::size_of_val(&sin));
        assert_eq!(sa.sa_family, sin.sin_family);
        let data: Vec<u8> = sa.sa_data.iter().map(|c| c.to_ne_bytes()[0]).collect();
        assert_eq!(&data[..6], &[0, 0, 10, 0, 2, 15]);
        assert_eq!(
            &data[..6],
            &[&0u16.to_ne_bytes()[..], &sin.sin_addr.s_addr.to_ne_bytes()].concat()
        );
        assert!(data[6..].iter().all(|&b| b == 0));
    }

    #[test]
    fn interface_names_fit_and_are_nul_terminated() {
        let n = ifname("dummy0").unwrap();
        assert_eq!(n[..7].iter().map(|c| c.to_ne_bytes()[0]).collect::<Vec<_>>(), b"dummy0\0");
        assert!(ifname("").is_err());
        assert!(ifname(&"x".repeat(libc::IFNAMSIZ)).is_err());
        assert!(ifname("a\0b").is_err());
        assert!(ifname(&"x".repeat(libc::IFNAMSIZ - 1)).is_ok());
    }

    #[cfg(target_pointer_width = "64")]
    #[test]
    fn the_route_entry_has_the_kernels_layout() {
        assert_eq!(std::mem::size_of::<RtEntry>(), 120);
        assert_eq!(std::mem::offset_of!(RtEntry, rt_flags), 56);
        assert_eq!(std::mem::offset_of!(RtEntry, rt_dev), 88);
    }
}
