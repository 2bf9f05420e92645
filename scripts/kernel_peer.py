#!/usr/bin/env python3
"""espada against a Linux kernel IPsec gateway (issue 15): the lab with east replaced by Linux 6.1
in a QEMU guest (scripts/kernel-guest), whose SAs and policies are `espada xfrm -c east.toml`
loaded verbatim.

    sunset —red— west (espada) ==black== east (Linux 6.1, QEMU) —red— sunrise

For each variant (cipher, ESN, `espada xfrm` with or without --no-pcpu, IPv4 or IPv6 outer
header, IPv4 and IPv6 inner packets) it checks:
  * ping, UDP and a TCP transfer both ways, payloads compared (scripts/lab_traffic.py), over
    IPv4 and, in the dual-stack variants, over IPv6;
  * espada's SA counters equal the kernel's (`ip -s xfrm state`), SA by SA;
  * replayed and tampered ESP packets are dropped and counted by each side;
  * `espada xfrm --delete` removes everything it set up.

    kernel_peer.py --espada BIN --dir DIR [--prefix P] [--variants all|quick|ipv6]

Needs root (namespaces, taps), qemu-system-x86 (scripts/kernel-guest installs it). The guest is
emulated (TCG): tens of Mbit/s, so the transfers are small; this is about interoperability."""
import argparse
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
A = None

VARIANTS = [
    # (name, cipher, esn, xfrm flags, east pcpu, family)
    # family: "v4" (IPv4 inside and out), "v6" (IPv6 outer header; IPv4 and IPv6 inside:
    # configs/lab/*-dual.toml), "v6in4" (IPv4 outer header; IPv4 and IPv6 inside).
    ("aes-gcm-128, ESN, espada xfrm", "aes-gcm-128", True, [], 0, "v4"),
    ("aes-gcm-256, no ESN, espada xfrm --no-pcpu", "aes-gcm-256", False, ["--no-pcpu"], 2, "v4"),
    ("aes-gcm-128, no ESN, espada xfrm --no-pcpu", "aes-gcm-128", False, ["--no-pcpu"], 2, "v4"),
    ("aes-gcm-256, ESN, espada xfrm", "aes-gcm-256", True, [], 0, "v4"),
    ("IPv6 outer, IPv4 + IPv6 inner, aes-gcm-128, ESN, espada xfrm --no-pcpu", "aes-gcm-128", True, ["--no-pcpu"], 2, "v6"),
    ("IPv4 outer, IPv4 + IPv6 inner, aes-gcm-256, no ESN, espada xfrm", "aes-gcm-256", False, [], 0, "v6in4"),
]


def fail(msg):
    print(f"FAIL: {msg}", flush=True)
    g = getattr(A, "guest", None) if A else None
    if g and not getattr(A, "diagnosing", False):
        A.diagnosing = True
        print("-- diagnostics", flush=True)
        for cmd in ("ip -s xfrm state", "cat /proc/net/xfrm_stat", "ip neigh", "ip -s link", "ip route", "netstat -uln", "cat /proc/net/snmp"):
            try:
                print(f"guest$ {cmd}\n" + re.sub(r"0x[0-9a-f]{40,}", "0x<key>", g.run(cmd, ok=False)[1]), flush=True)
            except SystemExit:
                pass
        try:
            print("west log:\n" + open(os.path.join(A.dir, "west.log")).read()[-3000:])
        except OSError:
            pass
    sys.exit(1)


def ns(n):
    return A.prefix + n


def sh(cmd, check=True, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        fail(f"{' '.join(cmd)}: {r.stdout}{r.stderr}")
    return r


def nsx(n, *cmd, check=True, **kw):
    return sh(["ip", "netns", "exec", ns(n), *cmd], check=check, **kw)


class Guest:
    """The QEMU guest, driven over its serial console (a shell on ttyS0)."""

    def __init__(self, gdir, log, cpus=1, initrd=None):
        self.log = open(log, "w")
        args = ["ip", "netns", "exec", ns("east"), "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", "512",
                "-smp", str(cpus),
                "-kernel", os.path.join(gdir, "vmlinuz"), "-initrd", initrd or os.path.join(gdir, "initrd.gz"),
                "-append", "console=ttyS0 quiet panic=-1", "-display", "none", "-serial", "stdio",
                "-monitor", "none", "-nodefaults", "-no-reboot",
                "-netdev", "tap,id=b,ifname=kbl,script=no,downscript=no",
                "-device", "virtio-net-pci,netdev=b,mac=52:54:00:00:0b:02",
                "-netdev", "tap,id=r,ifname=krd,script=no,downscript=no",
                "-device", "virtio-net-pci,netdev=r,mac=52:54:00:00:0a:02"]
        self.p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.q = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        t0 = time.time()
        self.wait_for(lambda l: "GUEST-READY" in l, 240, "the guest to boot")
        self.boot_s = time.time() - t0
        self.write("stty -echo; PS1=''")
        time.sleep(0.5)
        self.run("true")

    def _read(self):
        buf = b""
        while True:
            c = self.p.stdout.read1(4096) if hasattr(self.p.stdout, "read1") else self.p.stdout.read(1)
            if not c:
                self.q.put(None)
                return
            buf += c
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                s = line.decode(errors="replace").rstrip("\r")
                self.log.write(s + "\n")
                self.log.flush()
                self.q.put(s)

    def wait_for(self, pred, timeout, what):
        end = time.time() + timeout
        lines = []
        while time.time() < end:
            try:
                l = self.q.get(timeout=max(0.1, end - time.time()))
            except queue.Empty:
                break
            if l is None:
                fail(f"the guest stopped while waiting for {what}: {lines[-20:]}")
            lines.append(l)
            if pred(l):
                return lines
        fail(f"timed out waiting for {what}: {lines[-20:]}")

    def write(self, s):
        self.p.stdin.write((s + "\n").encode())
        self.p.stdin.flush()

    def run(self, cmd, timeout=60, ok=True):
        # busybox's shell runs its own `ip` applet before $PATH: iproute2 is /sbin/ip.
        cmd = re.sub(r"(^|; )ip ", r"\1/sbin/ip ", cmd)
        self.write(f'{cmd}; echo "@@DONE $?@@"')
        lines = self.wait_for(lambda l: re.search(r"@@DONE \d+@@", l), timeout, cmd[:60])
        rc = int(re.search(r"@@DONE (\d+)@@", lines[-1]).group(1))
        out = "\n".join(lines[:-1])
        if ok and rc != 0:
            fail(f"guest: {cmd[:200]}: exit {rc}: {out}")
        return rc, out

    def stop(self):
        try:
            self.write("poweroff -f")
            self.p.wait(timeout=20)
        except Exception:
            self.p.kill()


def topology():
    down()
    for n in ("sunset", "west", "east", "sunrise"):
        sh(["ip", "netns", "add", ns(n)])
        nsx(n, "ip", "link", "set", "lo", "up")
    sh(["ip", "link", "add", "s0", "netns", ns("sunset"), "type", "veth", "peer", "name", "west-red", "netns", ns("west")])
    sh(["ip", "link", "add", "west-black", "netns", ns("west"), "type", "veth", "peer", "name", "e-black", "netns", ns("east")])
    sh(["ip", "link", "add", "e-red", "netns", ns("east"), "type", "veth", "peer", "name", "s0", "netns", ns("sunrise")])
    for n, d in (("sunset", "s0"), ("west", "west-red"), ("west", "west-black"), ("east", "e-black"), ("east", "e-red"), ("sunrise", "s0")):
        nsx(n, "sysctl", "-qw", f"net.ipv6.conf.{d}.disable_ipv6=1")
        nsx(n, "ethtool", "-K", d, "tx", "off", "rx", "off", "tso", "off", "gso", "off", "gro", "off", check=False)
        nsx(n, "ip", "link", "set", d, "up")
    for n in ("sunset", "sunrise"):
        nsx(n, "ip", "link", "set", "s0", "mtu", "1400")
    nsx("sunset", "ip", "addr", "add", "10.1.0.10/24", "dev", "s0")
    nsx("sunset", "ip", "route", "add", "default", "via", "10.1.0.1")
    nsx("sunrise", "ip", "addr", "add", "10.2.0.10/24", "dev", "s0")
    nsx("sunrise", "ip", "route", "add", "default", "via", "10.2.0.1")
    # IPv6 on the hosts (used by the dual-stack variants; the gateways' links stay IPv4 until
    # their configs give them address6).
    for n, net in (("sunset", "fd00:1"), ("sunrise", "fd00:2")):
        nsx(n, "sysctl", "-qw", "net.ipv6.conf.s0.disable_ipv6=0")
        nsx(n, "ip", "-6", "addr", "add", f"{net}::10/64", "dev", "s0", "nodad")
        nsx(n, "ip", "-6", "route", "add", "default", "via", f"{net}::1", "dev", "s0")
    for br in ("brb", "brr"):
        nsx("east", "ip", "link", "add", br, "type", "bridge")
        nsx("east", "ip", "link", "set", br, "up")
    nsx("east", "ip", "link", "set", "e-black", "master", "brb")
    nsx("east", "ip", "link", "set", "e-red", "master", "brr")


def attach_taps():
    for _ in range(100):
        if nsx("east", "ip", "link", "show", "kbl", check=False).returncode == 0 and \
                nsx("east", "ip", "link", "show", "krd", check=False).returncode == 0:
            break
        time.sleep(0.1)
    nsx("east", "ip", "link", "set", "kbl", "master", "brb")
    nsx("east", "ip", "link", "set", "krd", "master", "brr")
    nsx("east", "ip", "link", "set", "kbl", "up")
    nsx("east", "ip", "link", "set", "krd", "up")


def down():
    for n in ("sunset", "west", "east", "sunrise"):
        sh(["ip", "netns", "pids", ns(n)], check=False)
        for pid in sh(["ip", "netns", "pids", ns(n)], check=False).stdout.split():
            sh(["kill", "-KILL", pid], check=False)
        sh(["ip", "netns", "del", ns(n)], check=False)


def configs(cipher, esn, east_pcpu, family="v4"):
    out = {}
    for side in ("west", "east"):
        base = f"{side}.toml" if family == "v4" else f"lab/{side}-dual.toml"
        t = open(os.path.join(ROOT, "configs", base)).read()
        if family == "v6in4":
            # The dual-stack configs with the tunnel's endpoints back on IPv4.
            t = re.sub(r'\n(local|remote) = "fd00:100::(\d)"', r'\n\1 = "192.168.100.\2"', t)
        t = t.replace('cipher = "aes-gcm-128"', f'cipher = "{cipher}"')
        t = re.sub(r"esn = (true|false)", f"esn = {'true' if esn else 'false'}", t)
        t = re.sub(r"lab_rekey = true", "lab_rekey = false", t)
        # The kernel side sends on `east_pcpu` per-CPU SAs (0: its fallback SA only); west
        # sends on 2 and knows how many the kernel sends on.
        mine, peer = (east_pcpu, 2) if side == "east" else (2, east_pcpu)
        t = re.sub(r"\npcpu = \d+[^\n]*", f"\npcpu = {mine}\npeer_pcpu = {peer}", t, count=1)
        p = os.path.join(A.dir, f"{side}.toml")
        with open(p, "w") as f:
            f.write(t)
        out[side] = p
    return out


def start_west(cfg):
    stop_west()
    log = open(os.path.join(A.dir, "west.log"), "w")
    jl = os.path.join(A.dir, "west.jsonl")
    if os.path.exists(jl):
        os.remove(jl)
    p = subprocess.Popen(["ip", "netns", "exec", ns("west"), A.espada, "run", "-c", cfg, "--state-dir", os.path.join(A.dir, "state"), "--new-keys",
                          "--control", os.path.join(A.dir, "west.sock"), "--idle-sleep-us", "50", "--interval", "1",
                          "--stats-json", jl], stdout=log, stderr=subprocess.STDOUT)
    A.west = p
    for _ in range(100):
        if os.path.exists(os.path.join(A.dir, "west.sock")):
            return
        if p.poll() is not None:
            fail("espada west stopped: " + open(os.path.join(A.dir, "west.log")).read()[-2000:])
        time.sleep(0.1)
    fail("espada west did not open its control socket")


def stop_west():
    p = getattr(A, "west", None)
    if p and p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
    A.west = None


def espada_sa():
    r = sh([A.espada, "show", "sa", "--json", "--socket", os.path.join(A.dir, "west.sock")])
    return json.loads(r.stdout)["sas"]


def kernel_sa(g):
    _, out = g.run("ip -s xfrm state", timeout=30)
    sas = {}
    for block in re.split(r"\n(?=src )", out):
        m = re.search(r"spi (0x[0-9a-f]+)", block)
        c = re.search(r"lifetime current:\s*\n\s*(\d+)\(bytes\), (\d+)\(packets\)", block)
        st = re.search(r"replay (\d+) failed (\d+)", block)
        if m and c:
            sas[int(m.group(1), 16)] = {"bytes": int(c.group(1)), "packets": int(c.group(2)),
                                       "replay": int(st.group(1)) if st else 0, "failed": int(st.group(2)) if st else 0}
    return sas


def xfrm_stat(g):
    _, out = g.run("cat /proc/net/xfrm_stat")
    return {k: int(v) for k, v in re.findall(r"(\w+)\s+(\d+)", out)}


CAPTURE = r'''
import socket, sys, time
iface, dst, secs, path = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)); s.bind((iface, 0)); s.settimeout(0.2)
print("ready", flush=True)
out = []; end = time.time() + secs
v6 = ":" in dst
while time.time() < end:
    try: f = s.recv(65535)
    except socket.timeout: continue
    if not v6 and len(f) > 50 and f[12:14] == b"\x08\x00" and f[23] == 17 and f[36:38] == b"\x11\x94" and socket.inet_ntoa(f[30:34]) == dst and f[42:46] != b"\0\0\0\0":
        out.append(f.hex())
    if v6 and len(f) > 70 and f[12:14] == b"\x86\xdd" and f[20] == 17 and f[56:58] == b"\x11\x94" and f[38:54] == socket.inet_pton(socket.AF_INET6, dst) and f[62:66] != b"\0\0\0\0":
        out.append(f.hex())
open(path, "w").write("\n".join(out))
print(len(out), flush=True)
'''

INJECT = r'''
import socket, sys
iface, path = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind((iface, 0))
n = 0
for l in open(path):
    if l.strip(): s.send(bytes.fromhex(l.strip())); n += 1
print(n)
'''


def capture_esp(where, iface, dst, tag):
    """ESP frames to `dst` seen on `iface` in namespace `where` while a UDP stream runs."""
    path = os.path.join(A.dir, f"cap-{tag}.hex")
    cap = subprocess.Popen(["ip", "netns", "exec", ns(where), sys.executable, "-c", CAPTURE, iface, dst, "5", path], stdout=subprocess.PIPE, text=True)
    assert cap.stdout.readline().strip() == "ready"
    sh([sys.executable, os.path.join(HERE, "lab_traffic.py"), "--sunset", ns("sunset"), "--sunrise", ns("sunrise"),
        "--src", "10.1.0.10", "--dst", "10.2.0.10", "--udp", "30", "--tcp", "1"], check=False, timeout=300)
    cap.wait(timeout=60)
    frames = [bytes.fromhex(l) for l in open(path).read().split() if l]
    if len(frames) < 15:
        fail(f"captured only {len(frames)} ESP frames to {dst}")
    return frames


def udp6_checksum(f):
    """Recomputes the UDP checksum of an Ethernet + IPv6 + UDP frame (mandatory over IPv6)."""
    b = bytearray(f)
    n = int.from_bytes(b[58:60], "big")
    b[60:62] = b"\0\0"
    data = bytes(b[22:54]) + n.to_bytes(4, "big") + b"\0\0\0\x11" + bytes(b[54:54 + n])
    if len(data) % 2:
        data += b"\0"
    c = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while c >> 16:
        c = (c & 0xffff) + (c >> 16)
    c = (~c) & 0xffff
    b[60:62] = (c or 0xffff).to_bytes(2, "big")
    return bytes(b)


def forge(frames):
    """10 replays and 5 tampered copies (fresh sequence numbers, a flipped ciphertext byte;
    over IPv6 with the UDP checksum made right again, so the receiver gets to the ESP checks)."""
    out = [f for f in frames[:10]]
    v6 = frames[0][12:14] == b"\x86\xdd"
    at = 14 + (40 if v6 else 20) + 8 + 4
    # Fresh sequence numbers, above anything sent: the receiver gets to the ICV check.
    top = max(int.from_bytes(f[at:at + 4], "big") for f in frames)
    for i, f in enumerate(frames[10:15]):
        b = bytearray(f)
        b[-20] ^= 0x55
        b[at:at + 4] = ((top + 1000 + i) & 0xffffffff).to_bytes(4, "big")
        out.append(udp6_checksum(b) if v6 else bytes(b))
    path = os.path.join(A.dir, "inject.hex")
    with open(path, "w") as f:
        f.write("\n".join(x.hex() for x in out))
    # The black-link capture check allows the replays injected on purpose.
    inj = os.path.join(A.dir, "injected")
    os.makedirs(inj, exist_ok=True)
    shutil.copy(path, os.path.join(inj, f"{len(os.listdir(inj))}.hex"))
    return path


def start_black_capture(tag):
    """The black link (east's side of it), headers only, for the whole variant."""
    inj = os.path.join(A.dir, "injected")
    shutil.rmtree(inj, ignore_errors=True)
    cap = os.path.join(A.dir, f"black-{tag}.pcap")
    p = subprocess.Popen(["ip", "netns", "exec", ns("east"), "dumpcap", "-q", "-P", "-s", "128", "-i", "e-black",
                          "-f", "udp port 4500", "-w", cap], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(50):
        if os.path.exists(cap) and os.path.getsize(cap) > 0:
            break
        time.sleep(0.1)
    return p, cap


def check_black_capture(p, cap):
    """Issue 24: no (SPI, sequence number) pair on the black link twice in one variant (one set
    of keys), from espada or from the kernel, but for the replays injected on purpose."""
    import signal
    p.send_signal(signal.SIGINT)
    p.wait(timeout=20)
    sys.path.insert(0, HERE)
    from lab_check import repeated_esp
    n, reps = repeated_esp(cap, os.path.join(A.dir, "injected"))
    print(f"black link: {n} ESP frames captured, {len(reps)} repeated (SPI, sequence) pairs", flush=True)
    if n == 0 or reps:
        fail(f"black-link capture: {n} frames, repeats {reps[:5]}")


def west_drops():
    time.sleep(2.5)
    with open(os.path.join(A.dir, "west.jsonl")) as f:
        lines = [json.loads(l) for l in f if l.strip()]
    cores = [l for l in lines if "cores" in l][-1]["cores"]
    tot = {}
    for c in cores:
        for k, v in c["drops_by_reason"].items():
            tot[k] = tot.get(k, 0) + v
    return tot


PERCPU_CHECK = r'''
import socket, sys, time
iface, secs, path = sys.argv[1], float(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)); s.bind((iface, 0)); s.settimeout(0.2)
print("ready", flush=True)
seen = {}; end = time.time() + secs
while time.time() < end:
    try: f = s.recv(65535)
    except socket.timeout: continue
    if len(f) > 50 and f[12:14] == b"\x08\x00" and f[23] == 17 and f[36:38] == b"\x11\x94" and socket.inet_ntoa(f[30:34]) == "192.168.100.1":
        k = (int.from_bytes(f[42:46], "big"), int.from_bytes(f[34:36], "big"))
        seen[k] = seen.get(k, 0) + 1
print(repr(seen), flush=True)
'''


def percpu_on_the_wire(g):
    """The kernel's own per-CPU SAs: pings from the guest pinned to CPU 0 and to CPU 1 leave on
    the SA with pcpu-num 0 and 1 (SPI and UDP source port), as seen on the wire."""
    cap = subprocess.Popen(["ip", "netns", "exec", ns("east"), sys.executable, "-c", PERCPU_CHECK, "e-black", "15", "-"],
                           stdout=subprocess.PIPE, text=True)
    assert cap.stdout.readline().strip() == "ready"
    for cpu in (0, 1):
        g.run(f"taskset -c {cpu} ping -c 6 -i 0.2 -W 2 10.1.0.10 >/dev/null", ok=False, timeout=60)
    out, _ = cap.communicate(timeout=60)
    seen = eval(out.strip())
    by_cpu = {0: (0x2001, 4501), 1: (0x2002, 4502)}
    print("kernel per-CPU SAs on the wire (SPI, UDP source port: frames): " +
          ", ".join(f"({spi:#010x}, {sp}): {n}" for (spi, sp), n in sorted(seen.items())))
    for cpu, key in by_cpu.items():
        if seen.get(key, 0) < 5:
            fail(f"pings from guest CPU {cpu} did not leave on per-CPU SA {key[0]:#010x} (port {key[1]}): {seen}")


def variant(g, name, cipher, esn, flags, east_pcpu, family="v4", percpu=False):
    print(f"\n== {name}", flush=True)
    cfg = configs(cipher, esn, east_pcpu, family)
    dump = start_black_capture(re.sub(r"[^a-z0-9]+", "-", name.lower()))
    start_west(cfg["west"])
    xf = sh([A.espada, "xfrm", "-c", cfg["east"], *flags]).stdout
    n = 0
    for line in xf.splitlines():
        if line.startswith("ip xfrm"):
            g.run(line)
            n += 1
    _, cnt = g.run("ip xfrm state count; ip xfrm policy count")
    print(f"kernel: {n} `espada xfrm {' '.join(['-c', 'east.toml'] + flags)}` commands loaded verbatim ({' / '.join(cnt.split())})")
    # Warm up ARP on both sides, then the checks.
    nsx("sunset", "ping", "-c", "2", "-i", "0.5", "-W", "5", "10.2.0.10", check=False)
    r = nsx("sunset", "ping", "-c", "5", "-i", "0.3", "-W", "5", "10.2.0.10", check=False)
    got = re.search(r"(\d+) received", r.stdout)
    print(f"ping sunset -> sunrise: {got.group(1) if got else 0}/5")
    if not got or got.group(1) != "5":
        fail(f"ping through the kernel peer: {r.stdout}{r.stderr}")
    t = sh([sys.executable, os.path.join(HERE, "lab_traffic.py"), "--sunset", ns("sunset"), "--sunrise", ns("sunrise"),
            "--src", "10.1.0.10", "--dst", "10.2.0.10", "--udp", "50", "--tcp", str(256 << 10)], check=False, timeout=600)
    print(t.stdout.strip())
    if t.returncode != 0 or t.stdout.count(" OK") != 4:
        fail("UDP/TCP through the kernel peer")
    if family != "v4":
        # IPv6 inside: neighbor discovery on both sides first (the first packet to an unknown
        # neighbor starts it), then ping, UDP and TCP both ways.
        nsx("sunset", "ping", "-6", "-c", "3", "-i", "0.5", "-W", "3", "fd00:2::10", check=False)
        r = nsx("sunset", "ping", "-6", "-c", "5", "-i", "0.3", "-W", "5", "fd00:2::10", check=False)
        got = re.search(r"(\d+) received", r.stdout)
        hop = re.search(r"ttl=(\d+)", r.stdout)
        print(f"IPv6 ping sunset -> sunrise: {got.group(1) if got else 0}/5, hop limit at sunset {hop.group(1) if hop else '?'}")
        if not got or got.group(1) != "5":
            fail(f"IPv6 ping through the kernel peer: {r.stdout}{r.stderr}")
        t = sh([sys.executable, os.path.join(HERE, "lab_traffic.py"), "--sunset", ns("sunset"), "--sunrise", ns("sunrise"),
                "--src", "fd00:1::10", "--dst", "fd00:2::10", "--udp", "50", "--tcp", str(256 << 10)], check=False, timeout=600)
        print("IPv6: " + t.stdout.strip().replace("\n", "\nIPv6: "))
        if t.returncode != 0 or t.stdout.count(" OK") != 4:
            fail("IPv6 UDP/TCP through the kernel peer")
    # Counters, SA by SA: what espada sent on an SA the kernel received on it, and back.
    time.sleep(1.5)
    es, ks = espada_sa(), kernel_sa(g)
    compared = 0
    for r in es:
        spi = int(r["spi"], 16)
        if r["packets"] == 0 and ks.get(spi, {}).get("packets", 0) == 0:
            continue
        k = ks.get(spi)
        if k is None:
            fail(f"espada used SA {r['spi']} ({r['dir']}) which the kernel does not have: {sorted(hex(s) for s in ks)}")
        if k["packets"] != r["packets"]:
            fail(f"SA {r['spi']}: espada {r['dir']} {r['packets']} packets, kernel {k['packets']}")
        compared += 1
    used_by_kernel = [s for s, k in ks.items() if k["packets"] > 0]
    if compared < 2 or any(s not in {int(r["spi"], 16) for r in es} for s in used_by_kernel):
        fail(f"SA counters: compared {compared}; kernel SAs in use {[hex(s) for s in used_by_kernel]}")
    print(f"SA counters agree on {compared} SAs: " + ", ".join(f"{r['spi']} {r['dir']} {r['packets']}" for r in es if r["packets"]))
    if percpu:
        percpu_on_the_wire(g)
    # Replays and forgeries, both ways.
    kaddr, waddr = ("fd00:100::2", "fd00:100::1") if family == "v6" else ("192.168.100.2", "192.168.100.1")
    to_k = capture_esp("east", "e-black", kaddr, "to-kernel")
    before = xfrm_stat(g)
    kb = kernel_sa(g)
    nsx("west", sys.executable, "-c", INJECT, "west-black", forge(to_k))
    time.sleep(2)
    after = xfrm_stat(g)
    ka = kernel_sa(g)
    seq = after.get("XfrmInStateSeqError", 0) - before.get("XfrmInStateSeqError", 0)
    proto = after.get("XfrmInStateProtoError", 0) - before.get("XfrmInStateProtoError", 0)
    rep = sum(v["replay"] for v in ka.values()) - sum(v["replay"] for v in kb.values())
    bad = sum(v["failed"] for v in ka.values()) - sum(v["failed"] for v in kb.values())
    print(f"kernel: 10 replays, 5 tampered -> XfrmInStateSeqError +{seq}, XfrmInStateProtoError +{proto} (SA stats: replay +{rep}, failed +{bad})")
    if seq < 10 or proto < 5:
        fail("the kernel did not drop and count every replay and tampered packet")
    to_w = capture_esp("east", "e-black", waddr, "to-west")
    d0 = west_drops()
    nsx("east", sys.executable, "-c", INJECT, "e-black", forge(to_w))
    d1 = west_drops()
    dr = {k: d1.get(k, 0) - d0.get(k, 0) for k in set(d0) | set(d1) if d1.get(k, 0) != d0.get(k, 0)}
    print(f"espada: 10 replays, 5 tampered -> {dr}")
    if dr.get("replay", 0) < 10 or dr.get("integrity", 0) < 5:
        fail("espada did not drop and count every replay and tampered packet")
    check_black_capture(*dump)
    # Teardown with espada xfrm --delete.
    for line in sh([A.espada, "xfrm", "-c", cfg["east"], "--delete", *flags]).stdout.splitlines():
        if line.startswith("ip xfrm"):
            g.run(line)
    _, cnt = g.run("ip xfrm state count; ip xfrm policy count")
    if any(int(x) for x in re.findall(r"\b(\d+)\b", cnt)):
        fail(f"espada xfrm --delete left: {cnt}")
    print(f"espada xfrm --delete: kernel now {' / '.join(cnt.split())}")


def main():
    global A
    ap = argparse.ArgumentParser()
    ap.add_argument("--espada", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--prefix", default="k-")
    ap.add_argument("--variants", default="all", choices=["all", "quick", "ipv6"],
                    help="all; quick: the first two; ipv6: the dual-stack ones")
    ap.add_argument("--no-pcpu-kernel", action="store_true", help="skip the per-CPU kernel (Linux >= 6.13)")
    A = ap.parse_args()
    os.makedirs(A.dir, exist_ok=True)
    sh([os.path.join(HERE, "kernel-guest"), "build"], timeout=900)
    gdir = sh([os.path.join(HERE, "kernel-guest"), "path"]).stdout.strip()
    topology()
    g = None
    try:
        g = boot(gdir, 1, "guest.log")
        vs = {"all": VARIANTS, "quick": VARIANTS[:2], "ipv6": [v for v in VARIANTS if v[5] != "v4"]}[A.variants]
        for v in vs:
            variant(g, *v)
        if not A.no_pcpu_kernel:
            g.stop()
            sh([os.path.join(HERE, "kernel-guest"), "build", "--pcpu"], timeout=1800)
            pdir = sh([os.path.join(HERE, "kernel-guest"), "path", "--pcpu"]).stdout.strip()
            g = boot(pdir, 2, "guest-pcpu.log")
            variant(g, "aes-gcm-128, ESN, per-CPU SAs on both sides (espada xfrm with pcpu-num)",
                    "aes-gcm-128", True, [], 2, "v4", percpu=True)
        print("\nkernel peer checks passed")
    finally:
        stop_west()
        if g:
            g.stop()
        down()


def boot(gdir, cpus, log, initrd=None, encap=True):
    """Boots the guest (`initrd`: another initramfs, e.g. with an overlay) and gives it the
    lab's addresses; with `encap`, the helper holding UDP 4500 (without an IKE daemon)."""
    A.guest = None  # no diagnostics from an earlier guest if this one does not boot
    for attempt in (1, 2):
        try:
            g = Guest(gdir, os.path.join(A.dir, log), cpus, initrd)
            break
        except SystemExit:
            # An emulated SMP boot on a busy host has been seen to oops early (int3 while the
            # kernel patches its own code, under multi-threaded TCG): once more.
            if attempt == 2:
                raise
            print("the guest did not boot (an early oops under TCG): booting it once more", flush=True)
            time.sleep(1)
    A.guest = g
    attach_taps()
    _, ver = g.run("uname -r")
    _, ipv = g.run("ip -V")
    print(f"kernel guest: Linux {ver.strip()} on {cpus} CPU(s), {ipv.strip()}, booted in {g.boot_s:.1f} s (QEMU TCG)")
    for cmd in ("ip link set eth0 up", "ip link set eth1 up", "ip addr add 192.168.100.2/24 dev eth0",
                "ip addr add 10.2.0.1/24 dev eth1",
                # The kernel routes before it looks at the policy: west's red subnet is reached
                # through west (from 10.2.0.1, so the guest's own packets match the policy).
                "ip route add 10.1.0.0/24 via 192.168.100.1 dev eth0 src 10.2.0.1",
                # IPv6 (the dual-stack variants): the same, on fd00:100::/64 and fd00:2::/64.
                "ip -6 addr add fd00:100::2/64 dev eth0 nodad", "ip -6 addr add fd00:2::1/64 dev eth1 nodad",
                "ip -6 route add fd00:1::/64 via fd00:100::1 dev eth0 src fd00:2::1"):
        g.run(cmd)
    if not encap:
        return g
    # The UDP_ENCAP_ESPINUDP socket on 4500 (an IKE daemon's job): without it the kernel
    # answers ESP-in-UDP with port-unreachable.
    g.run("(setsid /sbin/encap4500 </dev/null >/dev/null 2>&1 &)")
    time.sleep(0.5)
    _, ns4500 = g.run("netstat -uln")
    if ":4500" not in ns4500:
        fail(f"no UDP_ENCAP socket on 4500 in the guest: {ns4500}")
    return g


if __name__ == "__main__":
    main()
