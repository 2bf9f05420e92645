#!/usr/bin/env python3
"""Checks on a running lab (scripts/lab up): what the black link carries, that tshark decrypts it
with the entries of `espada wireshark`, that injected garbage, replays and forgeries are counted
and never reach sunrise, and that a steady UDP stream loses nothing.

  lab_check.py --prefix P --dir D --espada BIN --west-config F --east-config F
  lab_check.py --repeats CAPTURE [INJECTED_DIR]   (no repeated (SPI, sequence) on the black link)
Exits non-zero with a message on the first failed check."""
import argparse
import json
import os
import random
import subprocess
import sys
import time

A = None


def ns(name):
    return A.prefix + name


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def in_ns(n, cmd, **kw):
    return sh(["ip", "netns", "exec", ns(n)] + cmd, **kw)


def fail(msg):
    print("FAIL: " + msg, flush=True)
    sys.exit(1)


def esp_key(frame):
    """(outer source, SPI, sequence number) of an Ethernet frame carrying ESP-in-UDP (RFC 3948,
    port 4500, not the non-ESP marker), or None. Reads only the headers (a short snaplen will do)."""
    import struct
    if len(frame) < 14:
        return None
    et = struct.unpack("!H", frame[12:14])[0]
    if et == 0x0800 and len(frame) >= 34:
        ihl = (frame[14] & 0x0f) * 4
        if frame[23] != 17:
            return None
        src, udp = frame[26:30].hex(), 14 + ihl
    elif et == 0x86dd and len(frame) >= 54:
        if frame[20] != 17:
            return None
        src, udp = frame[22:38].hex(), 54
    else:
        return None
    esp = frame[udp + 8:udp + 16]
    if len(esp) < 8 or 4500 not in struct.unpack("!HH", frame[udp:udp + 4]):
        return None
    spi, seq = struct.unpack("!II", esp)
    if spi == 0:
        return None  # IKE (non-ESP marker)
    return (src, spi, seq)


def pcap_frames(path):
    """The frames of a classic pcap file (dumpcap -P), as bytes."""
    import struct
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 24:
        return []
    magic = data[:4]
    endian = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    out, off = [], 24
    while off + 16 <= len(data):
        _, _, incl, _ = struct.unpack(endian + "IIII", data[off:off + 16])
        out.append(data[off + 16:off + 16 + incl])
        off += 16 + incl
    return out


def repeated_esp(cap, injected_dir=None):
    """The one check every lab run makes of its black-link capture: no (source, SPI, sequence
    number) pair may appear twice, except for frames a test injected on purpose (replays),
    listed one hex frame per line in files under `injected_dir`. Returns (ESP frames, repeats)."""
    from collections import Counter
    seen = Counter(k for k in map(esp_key, pcap_frames(cap)) if k)
    allowed = Counter()
    if injected_dir and os.path.isdir(injected_dir):
        for name in os.listdir(injected_dir):
            with open(os.path.join(injected_dir, name)) as f:
                for line in f:
                    line = line.strip()
                    if line:
                        k = esp_key(bytes.fromhex(line))
                        if k:
                            allowed[k] += 1
    repeats = [(k, n) for k, n in seen.items() if n - allowed.get(k, 0) > 1]
    return sum(seen.values()), repeats


def last_cores(gw):
    with open(os.path.join(A.dir, gw + ".jsonl")) as f:
        lines = [json.loads(l) for l in f if l.strip()]
    return [l for l in lines if "cores" in l][-1]["cores"]


def last_stats(gw):
    cores = last_cores(gw)
    tot = {"encap": sum(c["encap_packets"] for c in cores), "decap": sum(c["decap_packets"] for c in cores), "drops": {}}
    for c in cores:
        for k, v in c["drops_by_reason"].items():
            tot["drops"][k] = tot["drops"].get(k, 0) + v
    return tot


def wait_stats():
    time.sleep(2.5)  # gateways write a JSON line every second


SEND = r'''
import socket, sys, time
dst, port, n, rate, tag = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
t0 = time.time()
for i in range(n):
    s.sendto(f"{tag}-{i:06d}".encode() + b"." * 200, (dst, port))
    if rate > 0:
        delay = t0 + (i + 1) / rate - time.time()
        if delay > 0: time.sleep(delay)
'''

RECV = r'''
import socket, sys
port, n, tag = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", port)); s.settimeout(4)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
print("ready", flush=True)
seen = set(); dup = 0
try:
    while True:
        d, _ = s.recvfrom(65535)
        k = d.split(b".")[0].decode()
        if k.startswith(tag):
            if k in seen: dup += 1
            seen.add(k)
except socket.timeout:
    pass
print(len(seen), dup, flush=True)
'''


def udp_stream(n, rate, port, tag):
    r = subprocess.Popen(["ip", "netns", "exec", ns("sunrise"), sys.executable, "-c", RECV, str(port), str(n), tag], stdout=subprocess.PIPE, text=True)
    assert r.stdout.readline().strip() == "ready"
    in_ns("sunset", [sys.executable, "-c", SEND, A.dst, str(port), str(n), str(rate), tag], timeout=300)
    out, _ = r.communicate(timeout=60)
    got, dup = map(int, out.split())
    return got, dup


def capture_and_decrypt():
    cap = os.path.join(A.dir, "black.pcap")
    dump = subprocess.Popen(["ip", "netns", "exec", ns("east"), "dumpcap", "-q", "-i", "east-black", "-w", cap, "-a", "duration:6"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(2)
    got, _ = udp_stream(40, 50, 5300, "capture")
    dump.wait(timeout=30)
    if got != 40:
        fail(f"capture run: sunrise received {got}/40 datagrams")
    os.chmod(cap, 0o644)
    # 1. Only ESP-in-UDP to port 4500 (and ARP) on the black link, from the per-CPU ports.
    rows = sh(["tshark", "-r", cap, "-T", "fields", "-E", "separator=,", "-e", "eth.type", "-e", "ip.proto", "-e", "udp.srcport", "-e", "udp.dstport", "-e", "esp.spi"]).stdout.split("\n")
    sports = set()
    n_esp = 0
    for r in filter(None, rows):
        t, proto, sp, dp, spi = (r.split(",") + [""] * 5)[:5]
        if t == "0x0806":
            continue
        if proto != "17" or dp != "4500" or not spi:
            fail(f"black link carried something other than ESP-in-UDP/4500: {r}")
        sports.add(int(sp))
        n_esp += 1
    cfg_ports = {4500, 4501, 4502}
    if not sports or not sports <= cfg_ports or not (sports & {4501, 4502}):
        fail(f"ESP source ports {sorted(sports)} are not the per-CPU ports {sorted(cfg_ports)}")
    print(f"black link: {n_esp} ESP-in-UDP frames to port 4500, UDP source ports {sorted(sports)} (per-CPU SAs)")
    # 2. tshark decrypts them with the entries from `espada wireshark`.
    opts = []
    for cfg in (A.west_config, A.east_config):
        for o in sh([A.espada, "wireshark", "-c", cfg, "--options-only"]).stdout.split("\n"):
            if o and o not in opts:
                opts += [o]
    args = ["tshark", "-r", cap]
    for o in opts:
        args += ["-o", o]
    dec = sh(args + ["-Y", "udp.dstport == 5300", "-T", "fields", "-e", "ip.dst", "-e", "data.data"]).stdout.split("\n")
    payloads = set()
    for r in filter(None, dec):
        dsts, data = (r.split("\t") + [""])[:2]
        if A.dst in dsts.split(",") and data:
            payloads.add(bytes.fromhex(data.replace(":", "")).split(b".")[0].decode())
    want = {f"capture-{i:06d}" for i in range(40)}
    if payloads != want:
        fail(f"tshark decrypted {len(payloads)} of the 40 inner datagrams ({sorted(want - payloads)[:3]} missing)")
    print("tshark decrypts the black link with `espada wireshark`: all 40 inner datagrams match what sunset sent")
    return cap


INJECT = r'''
import socket, sys
iface, path = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((iface, 0))
frames = [bytes.fromhex(l.strip()) for l in open(path) if l.strip()]
for f in frames:
    s.send(f)
print(len(frames))
'''


def inject(cap):
    # Frames west really sent (ESP to east), taken from the capture.
    hexes = sh(["tshark", "-r", cap, "-Y", "udp.dstport == 4500 && ip.dst == 192.168.100.2", "-T", "fields", "-e", "frame.number"]).stdout.split()
    raw = sh(["tshark", "-r", cap, "-x", "-Y", "udp.dstport == 4500 && ip.dst == 192.168.100.2", "-T", "json"]).stdout
    pkts = json.loads(raw)
    frames = []
    for p in pkts:
        # -x with json puts the raw frame under "frame_raw" in _source.layers
        fr = p["_source"]["layers"].get("frame_raw")
        if fr:
            frames.append(bytes.fromhex(fr[0] if isinstance(fr, list) else fr))
    if len(frames) < 10:
        fail(f"not enough ESP frames in the capture to replay ({len(frames)}; {len(hexes)} listed)")
    replays = frames[:10]
    forged = []
    for f in frames[10:15]:
        b = bytearray(f)
        b[-20] ^= 0x55  # inside the ciphertext / ICV
        b[14 + 20 + 8 + 4:14 + 20 + 8 + 8] = (0x7fff0000 + len(forged)).to_bytes(4, "big")  # fresh sequence number
        forged.append(bytes(b))
    rnd = random.Random(7)
    garbage = [bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(20, 200))) for _ in range(5)]
    short_esp = bytearray(frames[0][:14 + 20 + 8 + 12])
    short_esp[14 + 2:14 + 4] = (20 + 8 + 12).to_bytes(2, "big")  # IP total length
    short_esp[14 + 10:14 + 12] = b"\0\0"
    # recompute the IPv4 header checksum
    h = short_esp[14:34]
    s = sum(int.from_bytes(h[i:i + 2], "big") for i in range(0, 20, 2))
    while s > 0xffff:
        s = (s & 0xffff) + (s >> 16)
    short_esp[24:26] = (~s & 0xffff).to_bytes(2, "big")
    short_esp[14 + 20 + 4:14 + 20 + 6] = (8 + 12).to_bytes(2, "big")  # UDP length
    short_esp[14 + 20 + 6:14 + 20 + 8] = b"\0\0"
    # Listed where the black-link capture check (repeated_esp) finds the replays it must allow.
    os.makedirs(os.path.join(A.dir, "injected"), exist_ok=True)
    path = os.path.join(A.dir, "injected", "lab_check.hex")
    with open(path, "w") as f:
        for fr in replays + forged + garbage + [bytes(short_esp)]:
            f.write(fr.hex() + "\n")
    before = last_stats("east")
    in_ns("west", [sys.executable, "-c", INJECT, "west-black", path])
    wait_stats()
    after = last_stats("east")
    d = {k: after["drops"].get(k, 0) - before["drops"].get(k, 0) for k in set(after["drops"]) | set(before["drops"])}
    print(f"injected 10 replays, 5 forgeries, 5 garbage frames, 1 truncated ESP packet; east counted {dict(sorted((k, v) for k, v in d.items() if v))}")
    if after["decap"] != before["decap"]:
        fail(f"east delivered {after['decap'] - before['decap']} injected packets to sunrise")
    if d.get("replay", 0) < 10:
        fail("replays were not all counted as replay")
    if d.get("integrity", 0) < 5:
        fail("forgeries were not all counted as integrity failures")
    if d.get("not-for-us", 0) + d.get("malformed", 0) < 6:
        fail("garbage and the truncated packet were not counted")
    # The gateways keep forwarding.
    got, _ = udp_stream(20, 100, 5301, "after")
    if got != 20:
        fail(f"after the injection only {got}/20 datagrams passed")
    print("gateways keep forwarding after the injection: 20/20")


def steady():
    n, rate = 6000, 2000
    wb, eb = last_stats("west"), last_stats("east")
    got, dup = udp_stream(n, rate, 5302, "steady")
    wait_stats()
    wa, ea = last_stats("west"), last_stats("east")
    enc, dec = wa["encap"] - wb["encap"], ea["decap"] - eb["decap"]
    print(f"steady run: {n} datagrams at {rate}/s: sunrise received {got} ({dup} duplicates); west encapsulated {enc}, east decapsulated {dec}")
    if got != n or dup != 0:
        fail("the steady run lost or duplicated datagrams")
    if enc < n or dec < n:
        fail("the gateways' counters do not account for every datagram")


def repeats_main(cap, injected):
    n, reps = repeated_esp(cap, injected)
    print(f"black link: {n} ESP frames captured, {len(reps)} repeated (SPI, sequence) pairs")
    for (src, spi, seq), k in reps[:10]:
        print(f"  REPEATED: from {src} SPI {spi:#010x} sequence {seq} seen {k} times")
    # A lab brought up and down without traffic captures nothing; a test that sent traffic
    # says so (ESPADA_LAB_EXPECT_ESP=1), and then an empty capture is a broken check.
    empty = n == 0 and os.environ.get("ESPADA_LAB_EXPECT_ESP") == "1"
    if empty:
        print("  FAIL: no ESP frame captured on the black link: the check saw nothing")
    sys.exit(1 if reps or empty else 0)


def main():
    global A
    if len(sys.argv) >= 3 and sys.argv[1] == "--repeats":
        repeats_main(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--espada", required=True)
    ap.add_argument("--west-config", default="configs/west.toml")
    ap.add_argument("--east-config", default="configs/east.toml")
    ap.add_argument("--dst", default="10.2.0.10")
    A = ap.parse_args()
    cap = capture_and_decrypt()
    inject(cap)
    steady()
    print("lab checks passed")


if __name__ == "__main__":
    main()
