#!/usr/bin/env python3
"""UDP and TCP through the lab, both directions, every payload compared. Runs each end in its
namespace with `ip netns exec` (sockets are opened by child processes inside the namespace)."""
import argparse
import hashlib
import os
import subprocess
import sys

SERVER = r'''
import socket, sys, hashlib
proto, port, n, fam = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
af, any_ = (socket.AF_INET6, "::") if fam == "6" else (socket.AF_INET, "0.0.0.0")
if proto == "udp":
    s = socket.socket(af, socket.SOCK_DGRAM); s.bind((any_, port)); s.settimeout(5)
    print("ready", flush=True)
    got = set()
    try:
        while len(got) < n:
            d, a = s.recvfrom(65535)
            i = int.from_bytes(d[:4], "big")
            if d[4:] == hashlib.sha256(d[:4]).digest() * (len(d[4:]) // 32): got.add(i)
            s.sendto(d, a)
    except socket.timeout:
        pass
    print(len(got), flush=True)
else:
    s = socket.socket(af); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((any_, port)); s.listen(1); s.settimeout(20)
    print("ready", flush=True)
    c, _ = s.accept(); c.settimeout(20)
    h = hashlib.sha256(); total = 0
    while total < n:
        d = c.recv(65536)
        if not d: break
        h.update(d); total += len(d)
    c.sendall(h.digest()); c.close()
    print(total, h.hexdigest(), flush=True)
'''

CLIENT = r'''
import socket, sys, hashlib, os, time
proto, dst, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if proto == "udp":
    s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
    ok = 0
    for i in range(n):
        d = i.to_bytes(4, "big"); d = d + hashlib.sha256(d).digest() * (1 + i % 40)
        s.sendto(d, (dst, port))
        try:
            r, _ = s.recvfrom(65535); ok += (r == d)
        except socket.timeout:
            pass
    print(ok, flush=True)
else:
    data = os.urandom(n)
    c = socket.create_connection((dst, port), timeout=20); c.sendall(data); c.shutdown(socket.SHUT_WR)
    digest = b""
    while len(digest) < 32:
        d = c.recv(64)
        if not d: break
        digest += d
    print("match" if digest == hashlib.sha256(data).digest() else "MISMATCH", flush=True)
'''


def run(ns_srv, ns_cli, dst, proto, port, n):
    fam = "6" if ":" in dst else "4"
    srv = subprocess.Popen(["ip", "netns", "exec", ns_srv, sys.executable, "-c", SERVER, proto, str(port), str(n), fam], stdout=subprocess.PIPE, text=True)
    assert srv.stdout.readline().strip() == "ready"
    cli = subprocess.run(["ip", "netns", "exec", ns_cli, sys.executable, "-c", CLIENT, proto, dst, str(port), str(n)], capture_output=True, text=True, timeout=120)
    out, _ = srv.communicate(timeout=60)
    return cli.stdout.strip(), out.strip()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sunset", required=True)
    ap.add_argument("--sunrise", required=True)
    ap.add_argument("--src", required=True)
    ap.add_argument("--dst", required=True)
    ap.add_argument("--udp", type=int, default=200)
    ap.add_argument("--tcp", type=int, default=4 << 20)
    a = ap.parse_args()
    failed = False
    for (srv, cli, dst, name) in [(a.sunrise, a.sunset, a.dst, "sunset -> sunrise"), (a.sunset, a.sunrise, a.src, "sunrise -> sunset")]:
        c, s = run(srv, cli, dst, "udp", 5201, a.udp)
        ok = c == str(a.udp) and s == str(a.udp)
        print(f"UDP {name}: {a.udp} datagrams sent, server got {s} intact, client got {c} echoes back {'OK' if ok else 'FAIL'}")
        failed |= not ok
        c, s = run(srv, cli, dst, "tcp", 5202, a.tcp)
        ok = c == "match" and s.startswith(str(a.tcp))
        print(f"TCP {name}: {a.tcp} bytes, sha256 {'matches' if c == 'match' else 'DIFFERS'} ({s.split()[0] if s else '?'} bytes received) {'OK' if ok else 'FAIL'}")
        failed |= not ok
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
