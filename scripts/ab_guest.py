#!/usr/bin/env python3
"""The whole `espada ab` inside the project's per-CPU kernel guest (issue 28): Linux >= 6.13
with ESP and RFC 9611 per-CPU SAs (scripts/kernel-guest build --pcpu), booted under QEMU with
the espada binary (and the libraries the guest lacks) added as a second initramfs archive.
Inside, `espada ab` builds its four namespaces and measures every half: loop, kernel XFRM with
per-CPU SAs, kernel XFRM with one SA, espada. The report is checked for completeness: every
half ran and forwarded, the fixed load and the no-drop-rate search have figures, per-CPU usage
is there, and the kernel's per-SA counters show which SAs carried the traffic.

    ab_guest.py --espada BIN --dir DIR [--duration S] [--cpus N]

No speed is asserted: the guest's timing is emulated (TCG) unless /dev/kvm really works, and
the report says which. Needs root only for what scripts/kernel-guest installs (QEMU, cpio)."""
import argparse
import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


class GuestFailed(Exception):
    pass


def fail(msg):
    raise GuestFailed(msg)


def kvm_works():
    """Whether QEMU can use hardware KVM here (a /dev/kvm that only looks like KVM, such as
    kvm-pvm, fails this probe)."""
    if not os.path.exists("/dev/kvm"):
        return False
    try:
        r = subprocess.run(["qemu-system-x86_64", "-accel", "kvm", "-machine", "none", "-display", "none",
                            "-nodefaults", "-S", "-monitor", "none", "-serial", "none"],
                           timeout=5, capture_output=True)
        return r.returncode == 0
    except subprocess.TimeoutExpired:
        return True  # it started and waited: KVM opened
    except OSError:
        return False


def cpio_newc(entries):
    """A newc cpio archive of (path, mode, bytes or None for a directory)."""
    out = io.BytesIO()
    ino = 1000

    def rec(name, mode, data):
        nonlocal ino
        ino += 1
        name_b = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_b), 0))
        out.write(hdr.encode() + name_b)
        out.write(b"\0" * ((4 - (110 + len(name_b)) % 4) % 4))
        out.write(data)
        out.write(b"\0" * ((4 - len(data) % 4) % 4))

    for path, mode, data in entries:
        rec(path, mode, data if data is not None else b"")
    rec("TRAILER!!!", 0, b"")
    return out.getvalue()


def extra_archive(espada, guest_root):
    """espada as /opt/espada/espada, bash as /opt/espada/bash (ab runs its setup through
    `sh -c`, and busybox's ash runs its own `ip` applet before iproute2's), and every library
    either needs that the guest does not have (the guest's newer glibc stays)."""
    have = set()
    for d in ("lib", "lib/x86_64-linux-gnu", "lib64"):
        p = os.path.join(guest_root, d)
        if os.path.isdir(p):
            have.update(os.listdir(p))
    entries = [("opt", 0o40755, None), ("opt/espada", 0o40755, None),
               ("lib", 0o40755, None), ("lib/x86_64-linux-gnu", 0o40755, None)]
    libs = set()
    for binary in (espada, shutil.which("bash")):
        out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
        for m in re.finditer(r"=> (/\S+)", out):
            libs.add(m.group(1))
    for lib in sorted(libs):
        name = os.path.basename(lib)
        if name in have:
            continue
        with open(os.path.realpath(lib), "rb") as f:
            entries.append((f"lib/x86_64-linux-gnu/{name}", 0o100755, f.read()))
    with open(espada, "rb") as f:
        entries.append(("opt/espada/espada", 0o100755, f.read()))
    with open(shutil.which("bash"), "rb") as f:
        entries.append(("opt/espada/bash", 0o100755, f.read()))
    return gzip.compress(cpio_newc(entries), compresslevel=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--espada", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--rate", type=int, default=300, help="packets/s of the fixed load")
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    subprocess.run([os.path.join(HERE, "kernel-guest"), "build", "--pcpu"], check=True, timeout=1800)
    gdir = subprocess.run([os.path.join(HERE, "kernel-guest"), "path", "--pcpu"], check=True,
                          capture_output=True, text=True).stdout.strip()
    root = os.path.join(os.path.dirname(gdir), "root")
    initrd = os.path.join(a.dir, "initrd-ab.gz")
    with open(initrd, "wb") as f:
        with open(os.path.join(gdir, "initrd.gz"), "rb") as base:
            f.write(base.read())
        f.write(extra_archive(os.path.realpath(a.espada), root))
    import kernel_peer  # the guest driver (serial console)
    kernel_peer.A = argparse.Namespace(dir=a.dir, guest=None)
    kernel_peer.fail = fail
    g = None
    kvm = kvm_works()
    if kvm:
        # A /dev/kvm that opens may still not run a guest (kvm-pvm: MSRs it refuses): boot
        # decides, and TCG is the fallback.
        try:
            g = GuestNoNet(gdir, os.path.join(a.dir, "guest-ab-kvm.log"), a.cpus, initrd, True, kernel_peer)
        except GuestFailed as e:
            print(f"KVM did not boot the guest ({str(e)[:160]}): emulating (TCG)", flush=True)
            kvm = False
    timing = "hardware KVM" if kvm else "emulated (TCG): timing is not a measurement"
    print(f"guest: Linux {open(os.path.join(gdir, 'version')).read().strip()}, {a.cpus} vCPUs, {timing}", flush=True)
    for attempt in (1, 2):
        if g is not None:
            break
        # An emulated boot on a loaded host has been seen to die early (a kernel oops in the
        # timer interrupt under TCG): once more, then give up.
        try:
            g = GuestNoNet(gdir, os.path.join(a.dir, f"guest-ab-{attempt}.log"), a.cpus, initrd, False, kernel_peer)
        except GuestFailed as e:
            if attempt == 2:
                raise
            print(f"the guest did not boot ({str(e)[-200:]}); once more", flush=True)
    try:
        g.run("mkdir -p /run /var/lib/espada /tmp && ln -sf /opt/espada/bash /bin/sh "
              "&& export PATH=/sbin:/bin:/opt/espada")
        rc, out = g.run("/opt/espada/espada version", ok=False)
        print(out.strip(), flush=True)
        if rc != 0:
            fail(f"espada does not start in the guest: {out}")
        # Split layout on the guest's vCPUs; a short load, one no-drop-rate step per size.
        # The fixed load at a rate an emulated guest carries (TCG runs a debug build of espada
        # some hundred times slower than the host would), the searches as fast as it goes.
        cmd = (f"/opt/espada/espada ab --duration {a.duration} --flows 2 --rate {a.rate} --ndr 64,imix "
               f"--ndr-steps 1 --prefix g- --out /tmp/ab 2>&1")
        rc, out = g.run(cmd, timeout=1500, ok=False)
        print(out, flush=True)
        _, js = g.run("echo @@JSON; cat /tmp/ab/ab.json; echo @@END", ok=False)
    finally:
        g.stop()
    m = re.search(r"@@JSON\n(.*)\n@@END", js, re.S)
    if not m:
        fail(f"no ab.json from the guest (espada ab exit {rc})")
    report = json.loads(m.group(1))
    with open(os.path.join(a.dir, "ab.json"), "w") as f:
        json.dump(report, f, indent=2)
    check(report, rc)
    # The guest's kernel has pktgen (scripts/kernel-guest loads it): `--generator auto` must
    # have taken it, so the kernel's generator ran every trial above.
    gen = re.search(r"^generator: (.*)$", out, re.M)
    if not gen or not gen.group(1).startswith("pktgen"):
        fail(f"the guest's ab did not use pktgen: {gen.group(0) if gen else 'no generator line'}")
    print(f"{gen.group(0)}", flush=True)
    print(f"ab in the per-CPU kernel guest: complete ({timing})", flush=True)


def check(report, rc):
    names = [v["name"] for v in report]
    want = ["loop (kernel routing, no IPsec)", "kernel XFRM, per-CPU SAs",
            "kernel XFRM, one SA (--no-pcpu)", "espada, per-CPU SAs"]
    if names != want:
        fail(f"the report's halves are {names}, expected {want}")
    for v in report:
        if not (v["ran"] and v["forwarded"]):
            fail(f"{v['name']}: ran {v['ran']}, forwarded {v['forwarded']}: {v['note']}")
        if not (0 < v["received"] <= v["sent"]):
            fail(f"{v['name']}: received {v['received']} of {v['sent']}")
        if v["west_black_tx"] <= 0:
            fail(f"{v['name']}: nothing counted on west's black link")
        if not v["cpu"] or not all(0 <= c["softirq"] <= 1 for c in v["cpu"]):
            fail(f"{v['name']}: no per-CPU usage: {v['cpu']}")
        if [n["size"] for n in v["ndr"]] != ["64", "imix"] or not all(n["trials"] for n in v["ndr"]):
            fail(f"{v['name']}: no-drop-rate searches missing: {v['ndr']}")
        print(f"{v['name']}: sent {v['sent']}, west black {v['west_black_tx']}, received {v['received']}; "
              f"NDR 64 {v['ndr'][0]['pps']:.0f} pps, imix {v['ndr'][1]['pps']:.0f} pps", flush=True)
    for v in report[1:3]:
        carried = [(sa, n) for sa, n in v["sa_packets"] if n > 0]
        if not carried:
            fail(f"{v['name']}: no SA counted packets: {v['sa_packets']}")
        print(f"{v['name']}: SAs that carried packets: {carried}", flush=True)
    pcpu = report[1]["sa_packets"]
    if not any(" cpu " in sa and n > 0 for sa, n in pcpu):
        fail(f"kernel XFRM, per-CPU SAs: no per-CPU SA (pcpu-num) carried packets: {pcpu}")
    if rc != 0:
        fail(f"espada ab exited {rc}")


class GuestNoNet:
    """kernel_peer's serial-console guest without the lab's taps (ab builds its own
    namespaces inside), with KVM when it works."""

    def __init__(self, gdir, log, cpus, initrd, kvm, kp):
        import queue
        import threading
        import time
        self.kp = kp
        self.log = open(log, "w")
        args = ["qemu-system-x86_64", "-accel", "kvm" if kvm else "tcg", "-cpu", "host" if kvm else "max",
                "-m", "1024", "-smp", str(cpus),
                "-kernel", os.path.join(gdir, "vmlinuz"), "-initrd", initrd,
                "-append", "console=ttyS0 quiet panic=-1", "-display", "none", "-serial", "stdio",
                "-monitor", "none", "-nodefaults", "-no-reboot"]
        self.p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.q = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_for(lambda l: "GUEST-READY" in l, 300, "the guest to boot")
        self.write("stty -echo; PS1=''")
        time.sleep(0.5)
        self.run("true")


def _bind():
    import kernel_peer
    for name in ("_read", "wait_for", "write", "run", "stop"):
        setattr(GuestNoNet, name, getattr(kernel_peer.Guest, name))


if __name__ == "__main__":
    _bind()
    try:
        main()
    except GuestFailed as e:
        print(f"FAIL: {e}", flush=True)
        sys.exit(1)
