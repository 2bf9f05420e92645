#!/usr/bin/env python3
"""The interleaved runs behind benches/peers/secgw.sh (see there)."""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

KEY = "2b:7e:15:16:28:ae:d2:a6:ab:f7:15:88:09:cf:4f:3d:de:ad:be:ef"
EAL = ["--no-huge", "-m", "512", "--no-pci", "--no-shconf", "-l", "0"]

ENC_CFG = f"""sp ipv4 out esp protect 5 pri 1 dst 192.168.105.0/24 sport 0:65535 dport 0:65535
sa out 5 aead_algo aes-128-gcm aead_key {KEY} mode ipv4-tunnel src 172.16.1.5 dst 172.16.2.5
rt ipv4 dst 172.16.2.5/32 port 1
neigh port 0 02:00:00:00:00:10
neigh port 1 02:00:00:00:00:11
sp ipv4 in esp protect 6 pri 1 dst 192.168.55.0/24 sport 0:65535 dport 0:65535
sa in 6 aead_algo aes-128-gcm aead_key {KEY} mode ipv4-tunnel src 172.16.2.5 dst 172.16.1.5
"""

DEC_CFG = f"""sp ipv4 in esp protect 5 pri 1 dst 192.168.105.0/24 sport 0:65535 dport 0:65535
sa in 5 aead_algo aes-128-gcm aead_key {KEY} mode ipv4-tunnel src 172.16.1.5 dst 172.16.2.5
rt ipv4 dst 192.168.105.0/24 port 1
neigh port 0 02:00:00:00:00:10
neigh port 1 02:00:00:00:00:11
sp ipv4 out esp protect 6 pri 1 dst 192.168.55.0/24 sport 0:65535 dport 0:65535
sa out 6 aead_algo aes-128-gcm aead_key {KEY} mode ipv4-tunnel src 172.16.2.5 dst 172.16.1.5
"""


def plain_pcap(path, size):
    from scapy.all import IP, UDP, Ether, Raw, wrpcap
    pk = []
    for i in range(256):
        p = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:10") / IP(src="192.168.55.10", dst="192.168.105.10") / UDP(sport=10000 + i % 16, dport=5201)
        pk.append(p / Raw(b"\x5a" * (size - 28)))
    wrpcap(path, pk)


def secgw_cmd(a, rx_pcap, tx, cfg, unprotected):
    return ["stdbuf", "-oL", a.secgw, *EAL, "--vdev", f"net_pcap0,rx_pcap={rx_pcap},infinite_rx=1", "--vdev", tx,
            "--vdev", "crypto_aesni_gcm0", "--", "-p", "0x3", "-P", "-u", unprotected, "-l", "-t", "1",
            "--config", "(0,0,0),(1,0,0)", "-f", cfg]


def esp_pcap(a, d, size):
    """ipsec-secgw's own ESP for `size`, 256 frames: what its decrypt run replays."""
    from scapy.all import rdpcap, wrpcap
    raw = os.path.join(d, f"esp{size}-all.pcap")
    cmd = secgw_cmd(a, os.path.join(d, f"plain{size}.pcap"), f"net_pcap1,tx_pcap={raw}", os.path.join(d, "enc.cfg"), "0x2")
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(3)
    p.send_signal(2)
    p.wait(timeout=30)
    frames = rdpcap(raw, count=256)
    if len(frames) < 256:
        sys.exit(f"ipsec-secgw produced {len(frames)} ESP frames at {size} B, expected 256")
    out = os.path.join(d, f"esp{size}.pcap")
    wrpcap(out, frames)
    os.unlink(raw)
    return out


def secgw_rate(a, cmd):
    """Packets per second over the steady part of one run (per-second cumulative counters)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    t0 = time.time()
    samples = []
    try:
        for line in p.stdout:
            if line.startswith("Total packets sent:"):
                samples.append((time.time(), int(line.split(":")[1])))
            if time.time() - t0 > a.seconds + 3:
                break
    finally:
        p.send_signal(2)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
    steady = [s for s in samples if s[0] - t0 >= 3]
    if len(steady) < 2:
        sys.exit(f"ipsec-secgw printed too few statistics ({len(samples)} lines): {' '.join(cmd)}")
    (ta, na), (tb, nb) = steady[0], steady[-1]
    return (nb - na) / (tb - ta)


def espada_rate(a, size, direction):
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([a.espada, "bench", "--layout", "one-core", "--direction", direction, "--backend", a.backend,
                        "--cipher", "aes-gcm-128", "--size", str(size), "--duration", str(a.seconds), "--quiet", "--json", f.name],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        r = json.load(open(f.name))[0]
        if sum(r["drops"].values()):
            sys.exit(f"espada dropped packets in the {direction} run at {size} B: {r['drops']}")
        return r["mpps"] * 1e6, r.get("backend", a.backend)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--secgw", required=True)
    ap.add_argument("--espada", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sizes", default="64 1400")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--directions", default="encrypt decrypt")
    ap.add_argument("--out", default="bench-out/secgw")
    ap.add_argument("--backend", default="auto",
                    help="espada's crypto backend: auto (what a gateway on this CPU picks; "
                         "measured per run) or a name (ipsec-mb, ring, ipsec-mb+ring, ...)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    sizes = [int(s) for s in a.sizes.split()]
    dirs = a.directions.split()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        open(os.path.join(d, "enc.cfg"), "w").write(ENC_CFG)
        open(os.path.join(d, "dec.cfg"), "w").write(DEC_CFG)
        for size in sizes:
            plain_pcap(os.path.join(d, f"plain{size}.pcap"), size)
            esp = esp_pcap(a, d, size) if "decrypt" in dirs else None
            for direction in dirs:
                if direction == "encrypt":
                    cmd = secgw_cmd(a, os.path.join(d, f"plain{size}.pcap"), "net_null0,no-rx=1", os.path.join(d, "enc.cfg"), "0x2")
                else:
                    cmd = secgw_cmd(a, esp, "net_null0,no-rx=1", os.path.join(d, "dec.cfg"), "0x1")
                sg, es, used = [], [], []
                for i in range(a.runs):
                    # Interleaved: A B A B ..., the order flipped every other run.
                    pair = [("secgw", lambda: (secgw_rate(a, cmd), "intel-ipsec-mb")),
                            ("espada", lambda: espada_rate(a, size, direction))]
                    if i % 2:
                        pair.reverse()
                    for name, f in pair:
                        v, backend = f()
                        (sg if name == "secgw" else es).append(v)
                        if name == "espada":
                            used.append(backend)
                        print(f"  {direction} {size} B run {i + 1}: {name} {v / 1e6:.3f} Mpps ({backend})",
                              file=sys.stderr, flush=True)
                rows.append({"direction": direction, "size": size, "runs": a.runs,
                             "secgw_mpps": [x / 1e6 for x in sg], "espada_mpps": [x / 1e6 for x in es],
                             "secgw_median": statistics.median(sg) / 1e6, "espada_median": statistics.median(es) / 1e6,
                             "ratio": statistics.median(es) / statistics.median(sg),
                             "espada_backends": used})
    lines = ["| direction | inner size | ipsec-secgw Mpps median (min–max) | espada Mpps median (min–max) | espada ÷ ipsec-secgw | espada backend |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['direction']} | {r['size']} B | {r['secgw_median']:.2f} ({min(r['secgw_mpps']):.2f}–{max(r['secgw_mpps']):.2f}) | "
                     f"{r['espada_median']:.2f} ({min(r['espada_mpps']):.2f}–{max(r['espada_mpps']):.2f}) | {r['ratio']:.2f}× | "
                     + ", ".join(f"{b} ×{r['espada_backends'].count(b)}" for b in sorted(set(r['espada_backends']))) + " |")
    table = "\n".join(lines) + "\n"
    note = (f"\nOne core each, AES-128-GCM; ipsec-secgw's crypto is intel-ipsec-mb (crypto_aesni_gcm), espada's "
            f"`--backend {a.backend}` (the last column: what ran); {a.runs} interleaved runs of {a.seconds:g} s per cell; "
            "ipsec-secgw: net_pcap infinite_rx → net_null (plain ESP, anti-replay off by default); "
            "espada: `bench --layout one-core` (ESP-in-UDP, decrypt with anti-replay off).\n")
    print(table + note)
    open(os.path.join(a.out, "secgw.md"), "w").write(table + note)
    json.dump(rows, open(os.path.join(a.out, "secgw.json"), "w"), indent=2)


if __name__ == "__main__":
    main()
