//! Issue 15: espada against a real Linux kernel IPsec gateway. Linux 6.1 (Debian's cloud
//! kernel) boots under QEMU as the lab's east gateway, its SAs and policies loaded verbatim from
//! `espada xfrm` / `espada xfrm --no-pcpu`; west is espada. For AES-GCM-128 and -256, ESN on and
//! off: ping, UDP and TCP both ways with payloads compared, SA counters equal on both sides,
//! replayed and tampered packets dropped and counted by each side, and `espada xfrm --delete`
//! leaving nothing behind; with an IPv6 outer header (IPv4 and IPv6 inside) and with IPv6
//! inner packets in an IPv4 tunnel, over the dual-stack gateway. Then a kernel with RFC 9611 per-CPU SAs (Debian trixie-backports,
//! iproute2 7.x from unstable) on 2 vCPUs: `espada xfrm` with `pcpu-num` loaded verbatim, and
//! the guest's traffic from CPU 0 and CPU 1 leaving on the two per-CPU SAs. See
//! scripts/kernel_peer.py (needs root; scripts/kernel-guest fetches the kernels, busybox,
//! iproute2 and QEMU).

use std::process::Command;

#[test]
fn a_linux_kernel_gateway_interoperates_with_espada() {
    for (var, what) in [
        ("ESPADA_SKIP_NETNS", "network namespaces"),
        ("ESPADA_SKIP_KERNEL_PEER", "the kernel peer"),
    ] {
        if std::env::var(var).is_ok_and(|v| v == "1") {
            eprintln!("{var}=1 ({what}): the kernel-peer test was NOT run");
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("python3")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "scripts/kernel_peer.py",
            "--espada",
            env!("CARGO_BIN_EXE_espada"),
            "--dir",
        ])
        .arg(dir.path())
        .args(["--prefix", &format!("k{}-", std::process::id() % 100_000)])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(
        out.status.success(),
        "scripts/kernel_peer.py failed:\n{text}"
    );
    assert!(text.contains("kernel peer checks passed"));
    // Six Linux 6.1 variants (two with an IPv6 outer header or IPv6 inner packets), then
    // Linux >= 6.13 with per-CPU SAs on both sides.
    assert_eq!(text.matches("SA counters agree").count(), 7, "{text}");
    assert_eq!(
        text.matches("IPv6 ping sunset -> sunrise: 5/5").count(),
        2,
        "{text}"
    );
    assert_eq!(text.matches("IPv6: TCP").count(), 4, "{text}");
    assert!(text.contains("kernel per-CPU SAs on the wire"), "{text}");
}
