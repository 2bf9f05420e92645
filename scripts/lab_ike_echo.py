#!/usr/bin/env python3
"""IKE-shaped UDP between the lab's two gateways' IKE daemons' places (issue 14, the punt path):
`espada run --ike-tun` gives each gateway's namespace a TUN with the black address, so a
program there binds UDP 500/4500 as charon would.

    lab_ike_echo.py server SECONDS      (in east's namespace) answer on UDP 500 and 4500
    lab_ike_echo.py client DST          (in west's namespace) an IKE_SA_INIT-sized datagram
                                        from and to port 500, one with the non-ESP marker
                                        from and to 4500, a NAT-T keepalive; each answered
"""
import socket, sys, time, select
role = sys.argv[1]
if role == "server":
    socks = []
    for port in (500, 4500):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", port)); socks.append(s)
    print("ready", flush=True)
    end = time.time() + float(sys.argv[2]); n = 0
    while time.time() < end:
        r, _, _ = select.select(socks, [], [], 0.2)
        for s in r:
            d, a = s.recvfrom(65535); n += 1
            s.sendto((b"\0\0\0\0" if s.getsockname()[1] == 4500 else b"") + b"resp:" + d, a)
    print(n, flush=True)
else:
    dst = sys.argv[2]; ok = 0
    for port, payload in ((500, b"IKE_SA_INIT" * 20), (4500, b"\0\0\0\0IKE_AUTH" * 10), (4500, b"\xff")):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", port)); s.settimeout(3)
        for _ in range(3):
            s.sendto(payload, (dst, port))
            try:
                d, a = s.recvfrom(65535)
            except socket.timeout:
                continue
            good = d.endswith(b"resp:" + payload) and a == (dst, port)
            print(f"UDP {port} {len(payload)} B -> {dst}: answer {'OK' if good else 'WRONG'}", flush=True)
            ok += good
            break
        else:
            print(f"UDP {port} {len(payload)} B -> {dst}: no answer", flush=True)
        s.close()
    print(f"{ok}/3 answered", flush=True)
