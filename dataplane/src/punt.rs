//! IKE to the daemon and back, off the fast path: a TUN interface in the gateway's namespace
//! carries the black address, so an IKE daemon (charon) binds UDP 500 and 4500 there as it would
//! on the real interface.
//!
//! * black → daemon: a worker hands IKE messages (UDP 500 to us; UDP 4500 with the non-ESP
//!   marker; NAT-T keepalives) to the gateway's control queue as whole IP packets; the punt
//!   thread writes them into the TUN, and the kernel delivers them to the daemon's sockets.
//! * daemon → black: what the daemon sends leaves through the TUN (a route sends the black
//!   subnet there); the punt thread reads it, keeps only UDP from our black address with source
//!   port 500 or 4500, and queues it for worker 0, which adds the Ethernet header (ARP / neighbor
//!   discovery as for any packet) and sends it on black.
//!
//! Both queues are bounded; every packet that does not fit or does not belong is counted.

#![allow(unsafe_code)]

use crate::pktbuf::PacketBuf;
use crate::worker::{GatewayShared, Side};
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// IKE's UDP port (RFC 7296 §2).
pub const IKE_PORT: u16 = 500;

/// What the punt path did (control path counters).
#[derive(Debug, Default)]
pub struct PuntCounters {
    /// IKE packets written to the daemon.
    pub to_daemon: AtomicU64,
    /// Packets from the daemon queued for black.
    pub from_daemon: AtomicU64,
    /// Packets the TUN gave that were not IKE from our black address (dropped).
    pub not_ike: AtomicU64,
    /// Packets from the daemon dropped because the queue to the workers was full.
    pub queue_full: AtomicU64,
    /// Writes to the TUN that failed (the daemon's side is gone or full).
    pub write_errors: AtomicU64,
}

/// A TUN interface (no packet information header: each read or write is one IP packet).
#[derive(Debug)]
pub struct IkeTun {
    fd: OwnedFd,
    name: String,
}

const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IkeTun {
    /// Creates (or attaches to) TUN interface `name`, non-blocking.
    pub fn open(name: &str) -> io::Result<IkeTun> {
        if name.is_empty() || name.len() > 15 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("TUN interface name `{name}` must be 1 to 15 bytes"),
            ));
        }
        // SAFETY: plain syscalls on a descriptor owned here; the ifreq is a valid, zeroed
        // struct of the size the ioctl reads.
        unsafe {
            let fd = libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            );
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(fd);
            let mut req = IfReq {
                name: [0; 16],
                flags: IFF_TUN | IFF_NO_PI,
                _pad: [0; 22],
            };
            req.name[..name.len()].copy_from_slice(name.as_bytes());
            if libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut req) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(IkeTun {
                fd,
                name: name.to_string(),
            })
        }
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The `ip` commands that give the TUN the black side's addresses and send the black
    /// subnets (and the black gateway's destinations) through it, so the daemon's packets come
    /// back to espada. With `black_if` (an interface the kernel still sees, as with AF_PACKET),
    /// the kernel is also kept from taking black's frames itself now that the black address is
    /// local: strict reverse-path filtering drops them there (their source is routed through
    /// the TUN), and IPv6 is off on it, so the daemon sees each IKE message once.
    pub fn setup_commands(&self, black: &Side, black_if: Option<&str>) -> Vec<Vec<String>> {
        let n = self.name.clone();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let mut v = Vec::new();
        if let Some(i) = black_if {
            v.push(s(&[
                "sysctl",
                "-qw",
                &format!("net.ipv4.conf.{i}.rp_filter=1"),
            ]));
            v.push(s(&[
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{i}.disable_ipv6=1"),
            ]));
        }
        v.extend([
            s(&["ip", "link", "set", &n, "up"]),
            s(&["ip", "addr", "add", &format!("{}/32", black.ip), "dev", &n]),
            s(&[
                "ip",
                "route",
                "add",
                &black.prefix.to_string(),
                "dev",
                &n,
                "src",
                &black.ip.to_string(),
            ]),
        ]);
        if black.gateway.is_some() {
            v.push(s(&[
                "ip",
                "route",
                "add",
                "default",
                "dev",
                &n,
                "src",
                &black.ip.to_string(),
            ]));
        }
        if let Some(v6) = black.v6 {
            v.push(s(&[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{}/128", v6.ip),
                "dev",
                &n,
                "nodad",
            ]));
            v.push(s(&[
                "ip",
                "-6",
                "route",
                "add",
                &v6.prefix.to_string(),
                "dev",
                &n,
                "src",
                &v6.ip.to_string(),
            ]));
            if v6.gateway.is_some() {
                v.push(s(&[
                    "ip",
                    "-6",
                    "route",
                    "add",
                    "default",
                    "dev",
                    &n,
                    "src",
                    &v6.ip.to_string(),
                ]));
            }
        } else {
            v.push(s(&[
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{n}.disable_ipv6=1"),
            ]));
        }
        v
    }

    /// Runs [`Self::setup_commands`]; the first failure is returned with its output.
    pub fn configure(&self, black: &Side, black_if: Option<&str>) -> Result<(), String> {
        for c in self.setup_commands(black, black_if) {
            let out = std::process::Command::new(&c[0])
                .args(&c[1..])
                .output()
                .map_err(|e| format!("{}: {e}", c.join(" ")))?;
            if !out.status.success() {
                return Err(format!(
                    "{}: {}",
                    c.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        Ok(())
    }

    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is valid for buf.len() bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn write(&self, pkt: &[u8]) -> io::Result<usize> {
        // SAFETY: pkt is valid for pkt.len() bytes.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), pkt.as_ptr().cast(), pkt.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn wait_readable(&self, timeout_ms: i32) {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, timeout_ms) };
    }
}

/// Whether `pkt` (an IP packet the daemon sent) is IKE from our black address: UDP from
/// port 500 or 4500. Anything else the namespace's kernel sends into the TUN is not ours.
pub fn is_ike_from(pkt: &[u8], black: &Side) -> bool {
    use espada_wire::{ip_proto, ipv4, ipv6, udp};
    let (src, l4): (IpAddr, &[u8]) = match pkt.first().map(|v| v >> 4) {
        Some(4) => match ipv4::Packet::new_checked(pkt) {
            Ok(p) if p.protocol() == ip_proto::UDP && !p.is_fragment() => {
                let (hl, tl) = (p.header_len() as usize, p.total_len() as usize);
                (IpAddr::V4(p.src_addr()), &pkt[hl..tl])
            }
            _ => return false,
        },
        Some(6) => match ipv6::Packet::new_checked(pkt) {
            Ok(p) if p.next_header() == ip_proto::UDP => (
                IpAddr::V6(p.src_addr()),
                &pkt[ipv6::HEADER_LEN..p.total_len()],
            ),
            _ => return false,
        },
        _ => return false,
    };
    let ours = src == IpAddr::V4(black.ip) || black.v6.is_some_and(|v| IpAddr::V6(v.ip) == src);
    let port_ok = udp::Packet::new_checked(l4)
        .is_ok_and(|u| [IKE_PORT, espada_wire::esp::UDP_ENCAP_PORT].contains(&u.src_port()));
    ours && port_ok
}

/// The punt loop: until `stop`, moves the control queue's IKE packets into the TUN and the
/// TUN's IKE packets to `shared.from_daemon` (for worker 0). Buffers for the daemon's packets
/// come from `pool` (the gateway's heap pool; a DPDK port copies them into an mbuf, counted).
pub fn run(
    tun: &IkeTun,
    shared: &GatewayShared,
    pool: &Arc<crate::pool::Pool>,
    stop: &std::sync::atomic::AtomicBool,
    c: &PuntCounters,
) {
    let mut cache = crate::pool::PoolCache::new(pool.clone());
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        tun.wait_readable(2);
        // Daemon → black.
        // Until EAGAIN: nothing more to read.
        while let Ok(n) = tun.read(&mut buf) {
            let pkt = &buf[..n];
            if !is_ike_from(pkt, &shared.black) {
                c.not_ike.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let Some(mut b) = cache.get() else {
                c.queue_full.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            match b.append(pkt.len()) {
                Some(d) => d.copy_from_slice(pkt),
                None => {
                    cache.put(b);
                    c.queue_full.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
            match shared.from_daemon.push(b) {
                Ok(()) => {
                    c.from_daemon.fetch_add(1, Ordering::Relaxed);
                }
                Err(b) => {
                    cache.put(b);
                    c.queue_full.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        // Black → daemon.
        while let Some(b) = shared.control.pop() {
            match tun.write(b.data()) {
                Ok(_) => c.to_daemon.fetch_add(1, Ordering::Relaxed),
                Err(_) => c.write_errors.fetch_add(1, Ordering::Relaxed),
            };
            drop(b); // back to its pool
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::Side6;

    fn black() -> Side {
        Side {
            ip: "192.168.100.1".parse().unwrap(),
            prefix: "192.168.100.0/24".parse().unwrap(),
            mtu: 1500,
            gateway: None,
            v6: Some(Side6 {
                ip: "fd00:100::1".parse().unwrap(),
                prefix: "fd00:100::/64".parse().unwrap(),
                gateway: None,
            }),
        }
    }

    #[test]
    fn only_ike_from_our_black_address_leaves() {
        use espada_wire::udp::{build_packet, IpHeader};
        let b = black();
        let v4 = |src: &str, sport| {
            build_packet(
                IpHeader::V4(espada_wire::ipv4::Repr {
                    src: src.parse().unwrap(),
                    dst: "192.168.100.2".parse().unwrap(),
                    protocol: 17,
                    payload_len: 0,
                    ttl: 64,
                    tos: 0,
                    ident: 0,
                    dont_frag: true,
                }),
                sport,
                500,
                b"ike",
            )
        };
        assert!(is_ike_from(&v4("192.168.100.1", 500), &b));
        assert!(is_ike_from(&v4("192.168.100.1", 4500), &b));
        assert!(!is_ike_from(&v4("192.168.100.1", 53), &b));
        assert!(!is_ike_from(&v4("10.9.9.9", 500), &b));
        let v6 = build_packet(
            IpHeader::V6(espada_wire::ipv6::Repr {
                src: "fd00:100::1".parse().unwrap(),
                dst: "fd00:100::2".parse().unwrap(),
                next_header: 17,
                payload_len: 0,
                hop_limit: 64,
                traffic_class: 0,
                flow_label: 0,
            }),
            4500,
            4500,
            b"\0\0\0\0ike",
        );
        assert!(is_ike_from(&v6, &b));
        for n in 0..v6.len() {
            assert!(!is_ike_from(&v6[..n], &b) || n == v6.len());
        }
        assert!(!is_ike_from(&[], &b));
    }

    #[test]
    fn setup_gives_the_tun_the_black_addresses_and_routes() {
        let t = IkeTun {
            // SAFETY: /dev/null is opened only to have a descriptor for the struct.
            fd: unsafe { OwnedFd::from_raw_fd(libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY)) },
            name: "espada-ike0".into(),
        };
        let c: Vec<String> = t
            .setup_commands(&black(), Some("west-black"))
            .iter()
            .map(|c| c.join(" "))
            .collect();
        assert_eq!(c[0], "sysctl -qw net.ipv4.conf.west-black.rp_filter=1");
        assert!(
            c.contains(&"ip addr add 192.168.100.1/32 dev espada-ike0".to_string()),
            "{c:?}"
        );
        assert!(
            c.contains(
                &"ip route add 192.168.100.0/24 dev espada-ike0 src 192.168.100.1".to_string()
            ),
            "{c:?}"
        );
        assert!(
            c.iter()
                .any(|l| l.starts_with("ip -6 addr add fd00:100::1/128")),
            "{c:?}"
        );
    }
}
