//! Living next to the Linux kernel's IPsec: the UDP_ENCAP socket the kernel needs before it
//! decapsulates inbound ESP-in-UDP (RFC 3948), which an IKE daemon normally holds.
#![allow(unsafe_code)]

use std::net::UdpSocket;
use std::os::fd::AsRawFd;

const UDP_ENCAP: libc::c_int = 100;
const UDP_ENCAP_ESPINUDP: libc::c_int = 2;

/// Binds UDP `port` on every IPv4 address, and on every IPv6 address when the host has IPv6,
/// sets UDP_ENCAP_ESPINUDP on both and holds them until the process is killed (returns only on
/// an error).
pub fn hold_udp_encap_socket(port: u16) -> std::io::Result<()> {
    let s = encap_socket(port)?;
    let s6 = encap_socket6(port);
    if let Err(e) = &s6 {
        eprintln!("espada: no IPv6 UDP_ENCAP socket on port {port} ({e}); IPv4 only");
    }
    loop {
        std::thread::park();
        let _ = (&s, &s6);
    }
}

fn set_encap(fd: libc::c_int) -> std::io::Result<()> {
    let v: libc::c_int = UDP_ENCAP_ESPINUDP;
    // SAFETY: a valid socket, a c_int option value of the right size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_UDP,
            UDP_ENCAP,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The IPv4 socket itself (tests hold it for a while and drop it).
pub fn encap_socket(port: u16) -> std::io::Result<UdpSocket> {
    let s = UdpSocket::bind(("0.0.0.0", port))?;
    set_encap(s.as_raw_fd())?;
    Ok(s)
}

/// The IPv6 socket (IPv6 only, so it does not collide with the IPv4 one): Linux decapsulates
/// ESP-in-UDP over IPv6 since 5.8.
pub fn encap_socket6(port: u16) -> std::io::Result<UdpSocket> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a descriptor this function owns; on success it is handed
    // to a UdpSocket, which closes it.
    unsafe {
        let fd = libc::socket(libc::AF_INET6, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let s = UdpSocket::from_raw_fd(fd);
        let one: libc::c_int = 1;
        if libc::setsockopt(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        let mut a: libc::sockaddr_in6 = std::mem::zeroed();
        a.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        a.sin6_port = port.to_be();
        if libc::bind(
            fd,
            &a as *const libc::sockaddr_in6 as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        set_encap(fd)?;
        Ok(s)
    }
}
