//! Living next to the Linux kernel's IPsec: the UDP_ENCAP socket the kernel needs before it
//! decapsulates inbound ESP-in-UDP (RFC 3948), which an IKE daemon normally holds.
#![allow(unsafe_code)]

use std::net::UdpSocket;
use std::os::fd::AsRawFd;

const UDP_ENCAP: libc::c_int = 100;
const UDP_ENCAP_ESPINUDP: libc::c_int = 2;

/// Binds UDP `port` on every address, sets UDP_ENCAP_ESPINUDP on it and holds it until the
/// process is killed (returns only on an error).
pub fn hold_udp_encap_socket(port: u16) -> std::io::Result<()> {
    let s = encap_socket(port)?;
    loop {
        std::thread::park();
        let _ = &s;
    }
}

/// The socket itself (tests hold it for a while and drop it).
pub fn encap_socket(port: u16) -> std::io::Result<UdpSocket> {
    let s = UdpSocket::bind(("0.0.0.0", port))?;
    let v: libc::c_int = UDP_ENCAP_ESPINUDP;
    // SAFETY: a valid socket, a c_int option value of the right size.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_UDP,
            UDP_ENCAP,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(s)
}
