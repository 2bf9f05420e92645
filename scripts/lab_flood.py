#!/usr/bin/env python3
"""UDP as fast as one Python process can send, from sunset through the lab to sunrise (the
discard port range 9000-9015, nobody listening: sunrise drops them), then what west's worker
made of it, from its control socket: packets encapsulated, worker time per packet, drops.

  python3 scripts/lab_flood.py --sunset NS --dst IP --socket WEST.sock [--size 1400] [--seconds 5]

A load for comparing west's ports (AF_PACKET, AF_XDP, DPDK) on the same veth lab, not a
throughput figure for espada: the sender is one Python loop, and on veth the receiving side's
kernel work runs inside the sender's transmit call, so it counts in the worker's busy time.
"""
import argparse
import json
import socket
import subprocess
import sys
import time


def send(dst, size, seconds):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
    payload = b"x" * max(size - 28, 0)
    ports = [(dst, 9000 + i) for i in range(16)]
    n, t0 = 0, time.time()
    end = t0 + seconds
    while True:
        for p in ports:
            try:
                s.sendto(payload, p)
                n += 1
            except OSError:
                pass  # a full socket buffer: the next round tries again
        if n % 1024 < 16 and time.time() > end:
            return n, time.time() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sunset", help="sender namespace (when called from outside it)")
    ap.add_argument("--dst", required=True)
    ap.add_argument("--socket", required=True, help="west's control socket")
    ap.add_argument("--espada", default="target/release/espada")
    ap.add_argument("--size", type=int, default=1400)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--send-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.send_only:
        n, dt = send(a.dst, a.size, a.seconds)
        print(json.dumps({"sent": n, "seconds": dt}))
        return
    show = lambda what: json.loads(subprocess.run([a.espada, "show", what, "--json", "--socket", a.socket],
                                                  check=True, capture_output=True, text=True).stdout)
    before_w, before_s = show("workers"), show("stats")
    cmd = [sys.executable, __file__, "--send-only", "--dst", a.dst, "--socket", a.socket, "--size", str(a.size),
           "--seconds", str(a.seconds)]
    if a.sunset:
        cmd = ["ip", "netns", "exec", a.sunset] + cmd
    sent = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    time.sleep(0.5)
    after_w, after_s = show("workers"), show("stats")
    encap = after_s["total"]["encap_packets"] - before_s["total"]["encap_packets"]
    busy = sum(w["busy_ns"] for w in after_w["workers"]) - sum(w["busy_ns"] for w in before_w["workers"])
    drops = {k: v - before_s["total"]["drops_by_reason"].get(k, 0)
             for k, v in after_s["total"]["drops_by_reason"].items()}
    drops = {k: v for k, v in drops.items() if v}
    port = lambda ws, k: sum(w["red"][k] for w in ws["workers"])
    rx = port(after_w, "rx_packets") - port(before_w, "rx_packets")
    rx_dropped = port(after_w, "rx_dropped") - port(before_w, "rx_dropped")
    print(f"offered {sent['sent']} datagrams of {a.size} B in {sent['seconds']:.1f} s "
          f"({sent['sent'] / sent['seconds'] / 1e3:.0f} kpps); west's red port received {rx} "
          f"(port drops {rx_dropped}; the rest never reached it: the kernel's veth backlog), "
          f"encapsulated {encap} ({encap / sent['seconds'] / 1e3:.0f} kpps), "
          f"worker time {busy / max(encap, 1):.0f} ns/packet, drops {drops or 'none'}")


if __name__ == "__main__":
    main()
