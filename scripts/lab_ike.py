#!/usr/bin/env python3
"""The namespace lab with strongSwan negotiating and espada carrying (issue 14).

    sunset —red— west (espada + charon) ==black== east (espada + charon) —red— sunrise

Each gateway namespace runs `espada run --ike-tun espada-ike0` (IKE reaches charon through the
TUN) and charon with the kernel-espada plugin (ike/strongswan/), which installs every Child SA
charon negotiates into espada over its control socket. The tunnels have `ike = true`: nothing
passes until charon installs SAs. Checks:
  * traffic raises acquires in espada's workers: charon (start_action = trap, per_cpu_sas =
    encap) negotiates the fallback SA, then one per-CPU Child SA for each worker, each with
    its own UDP source port, and each worker sends on its own (RFC 9611);
  * ping, UDP and TCP both ways through the tunnel, payloads compared;
  * charon's `query_sa` counters (swanctl --list-sas) equal espada's, SA by SA;
  * `swanctl --rekey` of the Child SAs and of the IKE SA under UDP streams lose nothing; so
    do rekeys driven by lifetimes (5 s), which espada's soft/hard events trigger in charon;
  * espada killed (-9) and started again: the tunnel comes back by itself.
With --peer libipsec, east is charon with kernel-libipsec (its own userspace ESP) on the
namespace's kernel, no espada: a peer that is not espada (no ESN there, per-CPU SAs on port 4500).
With --peer no-pcpu, east's charon has per_cpu_sas = no (it answers like a strongSwan without
RFC 9611): west's per-CPU acquires must not pile up Child SAs; every worker carries traffic on
the fallback SA; rekeys lose nothing.

    lab_ike.py --espada BIN --dir DIR [--prefix P] [--peer espada|libipsec|no-pcpu]

Needs root; scripts/strongswan builds charon, swanctl and the plugin (once, cached)."""
import argparse
import json
import os
import re
import subprocess
import sys
import time

import lab_check

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
A = None


def fail(msg):
    print(f"FAIL: {msg}", flush=True)
    for side in ("west", "east"):
        for f in (f"{side}-charon.log", f"{side}.log"):
            p = os.path.join(A.dir, f)
            if os.path.exists(p):
                print(f"--- {f} (tail)\n" + open(p).read()[-2500:], flush=True)
    sys.exit(1)


def sh(cmd, check=True, env=None, timeout=120):
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if check and r.returncode != 0:
        fail(f"{' '.join(cmd)}: {r.stdout}{r.stderr}")
    return r


def lab(what):
    env = dict(os.environ, ESPADA_LAB_PREFIX=A.prefix, ESPADA_LAB_DIR=A.dir, ESPADA_BIN=A.espada,
               ESPADA_WEST="configs/lab/west-ike.toml", ESPADA_EAST="configs/lab/east-ike.toml",
               ESPADA_WEST_ARGS="--ike-tun espada-ike0", ESPADA_EAST_ARGS="--ike-tun espada-ike0",
               ESPADA_LAB_WAIT="sockets", ESPADA_LAB_EXPECT_ESP="1")
    return subprocess.run([os.path.join(HERE, "lab"), what], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def swanctl(side, *args, check=True, timeout=60):
    return sh([os.path.join(A.ss, "sbin", "swanctl"), *args, "--uri", f"unix://{A.dir}/{side}-vici.sock"],
              check=check, timeout=timeout)


def espada_sa(side):
    r = sh([A.espada, "show", "sa", "--json", "--socket", os.path.join(A.dir, f"{side}.sock")])
    return json.loads(r.stdout)["sas"]


def child_sas(side):
    """Each installed Child SA from swanctl: its CPU (None: the fallback SA), SPIs, packets."""
    out = swanctl(side, "--list-sas").stdout
    return parse_child_sas(out), out


def parse_child_sas(out):
    """The installed Child SAs of `swanctl --list-sas` output."""
    sas = []
    for block in re.split(r"\n\s+net: #", out)[1:]:
        cpu = re.match(r"\d+, reqid \d+, cpu (\S+?),", block)
        m = re.search(r"in\s+([0-9a-f]{8})[^\n]*?(\d+) bytes,\s+(\d+) packets[^\n]*\n\s+out\s+([0-9a-f]{8})[^\n]*?(\d+) bytes,\s+(\d+) packets", block)
        if "INSTALLED" in block.split("\n")[0] and m:
            sas.append({"cpu": None if not cpu or cpu.group(1) == "-" else int(cpu.group(1)),
                        "in": int(m.group(1), 16), "in_packets": int(m.group(3)),
                        "out": int(m.group(4), 16), "out_packets": int(m.group(6))})
    return sas


def flows(n=16, count=20):
    """UDP to n destination ports from sunset: flows the gateways' fanout spreads over workers."""
    code = ("import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            f"for p in range(6000,6000+{n}):\n  [s.sendto(b'x'*100,('10.2.0.10',p)) for _ in range({count})]")
    sh(["ip", "netns", "exec", A.prefix + "sunset", sys.executable, "-c", code])


def start_charon(side, libipsec=False):
    """charon in `side`'s namespace: with kernel-espada (espada carries), or with charon's own
    userspace ESP (kernel-libipsec: a peer that is not espada; the namespace's kernel routes)."""
    conf = os.path.join(A.dir, f"{side}-strongswan.conf")
    for stale in (f"{side}-vici.sock", f"{side}-charon.log"):
        if os.path.exists(os.path.join(A.dir, stale)):
            os.remove(os.path.join(A.dir, stale))
    with open(conf, "w") as f:
        f.write(f"""charon {{
    load = random nonce openssl pem pkcs1 x509 pubkey kdf {"kernel-libipsec" if libipsec else "kernel-espada"} kernel-netlink socket-default vici
    install_routes = {"yes" if libipsec else "no"}
    install_virtual_ip = no
    filelog {{
        log {{
            path = {A.dir}/{side}-charon.log
            default = 1
            knl = 2
            esp = {3 if os.environ.get("LAB_IKE_DEBUG") else 1}
            net = {2 if os.environ.get("LAB_IKE_DEBUG") else 1}
            ike = 1
        }}
    }}
    plugins {{
        kernel-espada {{
            socket = {A.dir}/{side}.sock
        }}
        vici {{
            socket = unix://{A.dir}/{side}-vici.sock
        }}
    }}
}}
""")
    # The PID file directory is compiled in: each charon gets its own, on a tmpfs of its own
    # mount namespace.
    run = os.path.join(A.ss, "run")
    cmd = f"mount -t tmpfs tmpfs {run} && exec {A.ss}/libexec/ipsec/charon"
    p = subprocess.Popen(["ip", "netns", "exec", A.prefix + side, "unshare", "-m", "sh", "-c", cmd],
                         env=dict(os.environ, STRONGSWAN_CONF=conf),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        if os.path.exists(os.path.join(A.dir, f"{side}-vici.sock")):
            break
        if p.poll() is not None:
            fail(f"charon ({side}) exited")
        time.sleep(0.1)
    else:
        fail(f"charon ({side}) opened no VICI socket")
    sconf = os.path.join(ROOT, "ike", "strongswan", f"{side}.swanctl.conf")
    if A.peer == "libipsec":
        # libipsec sends only from charon's own sockets (500/4500): per-CPU SAs on the IKE
        # ports (per_cpu_sas = yes instead of encap). The shipped proposals are unchanged
        # (issue 25 item 5: they work with libipsec as they are).
        text = open(sconf).read().replace("per_cpu_sas = encap", "per_cpu_sas = yes")
        sconf = os.path.join(A.dir, f"{side}.swanctl.conf")
        open(sconf, "w").write(text)
    elif A.peer == "no-pcpu" and side == "east":
        # A peer that does not do RFC 9611 (what most IKE peers in the field are).
        text = open(sconf).read().replace("per_cpu_sas = encap", "per_cpu_sas = no")
        sconf = os.path.join(A.dir, f"{side}.swanctl.conf")
        open(sconf, "w").write(text)
    swanctl(side, "--load-all", "--file", sconf)
    return p


def traffic(udp=50, tcp=256 << 10):
    r = sh([sys.executable, os.path.join(HERE, "lab_traffic.py"), "--sunset", A.prefix + "sunset",
            "--sunrise", A.prefix + "sunrise", "--src", "10.1.0.10", "--dst", "10.2.0.10",
            "--udp", str(udp), "--tcp", str(tcp)], check=False, timeout=300)
    print(r.stdout.strip(), flush=True)
    if r.returncode != 0 or r.stdout.count(" OK") != 4:
        fail("UDP/TCP through the IKE-keyed tunnel")


def wait_per_cpu(seconds, when):
    """Sends flows over both workers until west has the fallback and both per-CPU Child SAs
    (the workers' acquires); its Child SAs and swanctl's listing."""
    t0 = time.time()
    while True:
        flows()
        sas, text = child_sas("west")
        if {c["cpu"] for c in sas} >= {None, 0, 1}:
            return sas, text
        if time.time() - t0 > seconds:
            fail(f"west has no fallback and two per-CPU Child SAs {when}: {sas}")
        time.sleep(0.5)


def stream(udp):
    """A UDP stream both ways (each datagram echoed and compared) in the background."""
    return subprocess.Popen([sys.executable, os.path.join(HERE, "lab_traffic.py"), "--sunset", A.prefix + "sunset",
                             "--sunrise", A.prefix + "sunrise", "--src", "10.1.0.10", "--dst", "10.2.0.10",
                             "--udp", str(udp), "--tcp", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def during(udp, what, action):
    """`action` under a UDP stream of `udp` datagrams each way: every one must come back."""
    s = stream(udp)
    time.sleep(1)
    action()
    out, _ = s.communicate(timeout=300)
    lines = [l for l in out.splitlines() if l.startswith("UDP")]
    print(f"during {what}:\n" + "\n".join(lines), flush=True)
    if sum(" OK" in l for l in lines) != 2:
        fail(f"datagrams lost during {what}:\n{out}")


def agree(tag, sides=("west", "east"), least=3):
    """espada's counters on charon's SAs equal charon's (query_sa), on each gateway."""
    time.sleep(1.5)  # espada publishes SA counters every few hundred polls
    for side in sides:
        sas, text = child_sas(side)
        if not sas:
            fail(f"{side}: no installed Child SA:\n{text}")
        es = {(r["dir"], int(r["spi"], 16)): r for r in espada_sa(side)}
        compared = 0
        for c in sas:
            for d, spi, n in (("in", c["in"], c["in_packets"]), ("out", c["out"], c["out_packets"])):
                e = es.get((d, spi))
                if e is None:
                    # Not in espada any more: a per-CPU SA both sides negotiated at once
                    # (RFC 9611 allows it) whose twin took its slot. (The fallback SA once
                    # every worker has its own is still there, with its counters.)
                    continue
                compared += 1
                if e["packets"] != n:
                    fail(f"{side}: SA {spi:08x} {d}: espada {e['packets']} packets, swanctl {n}:\n{text}")
        if compared < least:
            fail(f"{side}: only {compared} SA(s) to compare: {sas}")
        print(f"{tag}: {side} charon and espada agree on {compared} SAs: " + ", ".join(
            f"in {c['in']:08x} {c['in_packets']} / out {c['out']:08x} {c['out_packets']} packets" for c in sas), flush=True)


def lifetime_rekeys():
    """Rekeys driven by lifetimes: west's Child SAs get a rekey time of 5 s (life 10 s; the
    connection is reloaded and renegotiated so the new SAs carry it): espada counts the
    lifetimes and reports soft and hard events to charon (the kernel's expires); a UDP stream
    of a dozen seconds crosses several rekeys of every Child SA and loses nothing."""
    conf = os.path.join(A.dir, "west-short.swanctl.conf")
    text = open(os.path.join(ROOT, "ike", "strongswan", "west.swanctl.conf")).read()
    open(conf, "w").write(text.replace("start_action = trap", "start_action = trap\n                rekey_time = 5s\n"
                                       "                life_time = 10s\n                rand_time = 1s"))
    # Rekeyed Child SAs and the trap keep their config: start over with the new one (the
    # next packets negotiate with it).
    swanctl("west", "--terminate", "--ike", "lab", "--timeout", "10", check=False)
    swanctl("west", "--uninstall", "--child", "net", check=False)
    swanctl("west", "--load-conns", "--file", conf)
    swanctl("west", "--install", "--child", "net")
    sas, _ = wait_per_cpu(30, "after loading the short rekey time")
    first = {c["out"] for c in sas}
    if os.environ.get("LAB_IKE_DEBUG"):
        print(child_sas("west")[1], flush=True)
    seen = set(first)
    t0, sent, udp = time.time(), 0, []
    while time.time() - t0 < 14:
        s = stream(500)
        while s.poll() is None:
            seen |= {c["out"] for c in child_sas("west")[0]}
            time.sleep(0.5)
        out, _ = s.communicate(timeout=300)
        udp = [l for l in out.splitlines() if l.startswith("UDP")]
        sent += 1000
        if sum(" OK" in l for l in udp) != 2:
            fail(f"datagrams lost across lifetime-driven rekeys (exit {s.returncode}):\n{out}")
    print(f"with a 5 s rekey time: {sent} datagrams both ways over {time.time() - t0:.0f} s, every one echoed", flush=True)
    rekeys = len(seen - first)
    if rekeys < 3:
        fail(f"only {rekeys} lifetime-driven rekeys happened")
    print(f"lifetime-driven rekeys: {rekeys} new outbound Child SAs during the stream, nothing lost", flush=True)
    # Back to the shipped lifetimes.
    swanctl("west", "--load-conns", "--file", os.path.join(ROOT, "ike", "strongswan", "west.swanctl.conf"))


PACED_SEND = r'''
import socket, sys, time
dst, port, n, rate, tag, flows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5], int(sys.argv[6])
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(flows)]
t0 = time.time()
for i in range(n):
    socks[i % flows].sendto(f"{tag}-{i:07d}".encode() + b"." * 100, (dst, port))
    delay = t0 + (i + 1) / rate - time.time()
    if delay > 0: time.sleep(delay)
'''



def paced_both_ways(seconds, rate, flows=8):
    """`rate` datagrams a second each way for `seconds`, over `flows` UDP flows per direction
    (spread over the workers): (received west->east, received east->west, duplicates, sent)."""
    n = int(seconds * rate)
    recv = {}
    for name, ns_, port in (("fwd", "sunrise", 7100), ("rev", "sunset", 7101)):
        # lab_check's receiver: counts distinct datagrams of its tag until 4 s of silence.
        p = subprocess.Popen(["ip", "netns", "exec", A.prefix + ns_, sys.executable, "-c", lab_check.RECV, str(port), str(n), name],
                             stdout=subprocess.PIPE, text=True)
        if p.stdout.readline().strip() != "ready":
            fail("paced stream receiver did not start")
        recv[name] = p
    send = [subprocess.Popen(["ip", "netns", "exec", A.prefix + ns_, sys.executable, "-c", PACED_SEND, dst, str(port),
                              str(n), str(rate), name, str(flows)])
            for name, ns_, dst, port in (("fwd", "sunset", "10.2.0.10", 7100), ("rev", "sunrise", "10.1.0.10", 7101))]
    for s in send:
        s.wait(timeout=seconds * 3 + 60)
    got = {}
    for name, p in recv.items():
        out, _ = p.communicate(timeout=60)
        g, d = map(int, out.split())
        got[name] = (g, d)
    return got["fwd"][0], got["rev"][0], got["fwd"][1] + got["rev"][1], n


def long_rekeys(seconds=60, rate=1000, rekey="10s", peer_drops=None):
    """Issue 25: a stream of `rate` datagrams a second each way for `seconds` while every Child
    SA rekeys every `rekey` (lifetime-driven, espada's soft events to charon): nothing lost.

    `peer_drops` (a Linux peer): called before and after the stream, it returns
    ({counter: value} of what the peer's kernel dropped itself on its way out to west,
    {counter: value} of what it dropped after decrypting, on its forward path to sunrise).
    Linux races its own rekeys there: it sends on an SA charon is deleting
    (XfrmOutStateInvalid), or forwards a decrypted packet whose route was invalidated by the
    SA change (XfrmFwdHdrError). A datagram lost in a direction where the peer's kernel
    counted as many drops of its own is reported as the peer's, with the counters; anything
    else lost fails."""
    conf = os.path.join(A.dir, "west-long.swanctl.conf")
    text = open(os.path.join(ROOT, "ike", "strongswan", "west.swanctl.conf")).read()
    open(conf, "w").write(text.replace("start_action = trap", f"start_action = trap\n                rekey_time = {rekey}\n"
                                       "                life_time = 30s\n                rand_time = 2s"))
    swanctl("west", "--terminate", "--ike", "lab", "--timeout", "10", check=False)
    swanctl("west", "--uninstall", "--child", "net", check=False)
    swanctl("west", "--load-conns", "--file", conf)
    swanctl("west", "--install", "--child", "net")
    if A.peer in ("espada", "linux"):
        sas, _ = wait_per_cpu(30, "before the long stream")
    else:
        t0 = time.time()
        while not child_sas("west")[0]:
            flows()
            if time.time() - t0 > 30:
                fail("no Child SA before the long stream")
            time.sleep(0.5)
        sas = child_sas("west")[0]
    first = {c["out"] for c in sas}
    seen = set(first)
    result = {}

    before = peer_drops() if peer_drops else ({}, {})

    def run():
        result["r"] = paced_both_ways(seconds, rate)
    import threading
    logp = os.path.join(A.dir, "west-charon.log")
    conns0 = open(logp).read().count("kernel-espada: new connection to espada")
    th = threading.Thread(target=run)
    th.start()
    while th.is_alive():
        seen |= {c["out"] for c in child_sas("west")[0]}
        time.sleep(1)
    fwd, rev, dup, n = result["r"]
    rekeys = len(seen - first)
    print(f"{seconds} s at {rate} datagrams/s each way over 8 flows, rekey_time {rekey}: west->east {fwd}/{n}, "
          f"east->west {rev}/{n} ({n - fwd} and {n - rev} lost, {dup} duplicates); {rekeys} new outbound "
          f"Child SAs on west meanwhile", flush=True)
    # The plugin keeps its connections (issue 25 item 2): polling acquires 5 times a second
    # and every install would each take a connection of its own otherwise.
    conns = open(logp).read().count("kernel-espada: new connection to espada") - conns0
    print(f"west's plugin opened {conns} connections to espada during the {seconds} s stream "
          f"(it polls acquires 5 times a second and installed {rekeys * 2}+ SAs)", flush=True)
    if conns > seconds // 2:
        fail(f"the plugin opened {conns} connections in {seconds} s: it does not keep them")
    if rekeys < 3:
        fail(f"only {rekeys} rekeys during the long stream")
    excused = [0, 0]  # west->east, east->west
    if peer_drops and (rev != n or fwd != n):
        after = peer_drops()
        for i, what in ((1, "before sending to west"), (0, "on the way in from west (its inbound XFRM, its forward path)")):
            j = 0 if i == 1 else 1
            delta = {k: after[j].get(k, 0) - before[j].get(k, 0) for k in after[j]
                     if after[j].get(k, 0) != before[j].get(k, 0)}
            excused[i] = sum(delta.values())
            print(f"the peer's kernel dropped {excused[i]} packets itself {what} during the stream: {delta}", flush=True)
    if n - fwd > excused[0] or n - rev > excused[1]:
        fail("datagrams lost across lifetime-driven rekeys in the long stream")
    if rev != n or fwd != n:
        print(f"lost: {n - fwd} west->east, {n - rev} east->west, all counted by the peer's kernel as drops "
              "in its own stack (not espada's)", flush=True)
    swanctl("west", "--load-conns", "--file", os.path.join(ROOT, "ike", "strongswan", "west.swanctl.conf"))


def restart_west():
    """espada on west is killed (-9) and started again: the plugin sees espada's new run, deletes
    the IKE_SAs (the peer is told), and the next packets negotiate everything again: no manual
    step."""
    pidf = os.path.join(A.dir, "west.pid")
    pid = int(open(pidf).read())
    os.kill(pid, 9)
    for _ in range(100):
        if not os.path.exists(f"/proc/{pid}"):
            break
        time.sleep(0.1)
    time.sleep(1)
    log = open(os.path.join(A.dir, "west.log"), "w")
    p = subprocess.Popen(["ip", "netns", "exec", A.prefix + "west", A.espada, "run", "-c", "configs/lab/west-ike.toml",
                          "--state-dir", os.path.join(A.dir, "state"), "--control", os.path.join(A.dir, "west.sock"),
                          "--port", "af-packet", "--ike-tun", "espada-ike0", "--idle-sleep-us", "50", "--interval", "1",
                          "--stats-json", os.path.join(A.dir, "west.jsonl")], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    open(pidf, "w").write(str(p.pid))
    t0 = time.time()
    while time.time() - t0 < 90:
        if sh(["ip", "netns", "exec", A.prefix + "sunset", "ping", "-c", "1", "-W", "1", "10.2.0.10"],
              check=False).returncode == 0:
            break
    else:
        fail("the tunnel did not come back after espada restarted")
    print(f"espada (west) killed with -9 and started again: traffic passes again after {time.time() - t0:.1f} s, "
          "no manual step", flush=True)
    wait_per_cpu(30, "after the restart")
    traffic(udp=20, tcp=64 << 10)
    agree("after espada restarted")


def worker_encaps(side):
    r = sh([A.espada, "show", "stats", "--json", "--socket", os.path.join(A.dir, f"{side}.sock")])
    return [w["encap_packets"] for w in json.loads(r.stdout)["workers"]]


def no_pcpu_peer():
    """Against a peer without per-CPU SAs (issue 25 item 1): 30 s of flows over both workers;
    west's and east's Child SAs stay bounded, every west worker carries traffic on the fallback
    SA, and Child SA and IKE SA rekeys under streams lose nothing."""
    before = worker_encaps("west")
    t0 = time.time()
    while time.time() - t0 < 30:
        flows(count=5)
        time.sleep(1)
    west, wtext = child_sas("west")
    east, _ = child_sas("east")
    after = worker_encaps("west")
    print("west$ swanctl --list-sas (after 30 s of flows over both workers)\n" + wtext.strip(), flush=True)
    print(f"Child SAs after 30 s: west {len(west)}, east {len(east)}; per-worker packets encapsulated "
          f"during them: {[a - b for a, b in zip(after, before)]}", flush=True)
    if len(west) > 2 or len(east) > 2:
        fail(f"Child SAs pile up against a peer without per-CPU SAs: west {len(west)}, east {len(east)}")
    if any(a - b <= 0 for a, b in zip(after, before)):
        fail(f"a west worker carried no traffic: {before} -> {after}")
    log = open(os.path.join(A.dir, "west-charon.log")).read()
    if "per-CPU acquires off" not in log:
        fail("the plugin did not pass pcpu_acquires = no to espada")
    print("west's plugin: " + [l for l in log.splitlines() if "per-CPU acquires off" in l][0].strip(), flush=True)
    es = [r for r in espada_sa("west") if r["dir"] == "out" and r["owner_cores"]]
    if len({r["spi"] for r in es}) != 1 or sorted(c for r in es for c in r["owner_cores"]) != [0, 1]:
        fail(f"the workers do not all send on the one fallback SA: {es}")
    print(f"both workers send on the fallback SA {es[0]['spi']}", flush=True)
    traffic()
    agree("no-pcpu peer", sides=("west", "east"), least=1)
    during(1000, "swanctl --rekey --child net (no-pcpu peer)", lambda: swanctl("west", "--rekey", "--child", "net"))
    during(1000, "swanctl --rekey --ike lab (no-pcpu peer)", lambda: swanctl("west", "--rekey", "--ike", "lab"))
    west, _ = child_sas("west")
    if len(west) > 2:
        fail(f"Child SAs after the rekeys: {len(west)}")
    if os.environ.get("LAB_IKE_LONG", "1") == "1":
        long_rekeys()
        west, _ = child_sas("west")
        if len(west) > 2:
            fail(f"Child SAs after the long stream: {len(west)}")
    print("\nIKE lab checks passed (peer: charon without per-CPU SAs)", flush=True)


def libipsec_peer():
    """East becomes charon with kernel-libipsec on the namespace's own kernel (no espada there):
    west (espada + charon) must interoperate with it."""
    pid = int(open(os.path.join(A.dir, "east.pid")).read())
    os.kill(pid, 15)
    for _ in range(100):
        if not os.path.exists(f"/proc/{pid}"):
            break
        time.sleep(0.1)
    os.remove(os.path.join(A.dir, "east.pid"))
    e = A.prefix + "east"
    for cmd in (["ip", "addr", "add", "192.168.100.2/24", "dev", "east-black"],
                ["ip", "addr", "add", "10.2.0.1/24", "dev", "east-red"],
                ["sysctl", "-qw", "net.ipv4.ip_forward=1"]):
        sh(["ip", "netns", "exec", e, *cmd])
    print("east: espada stopped; charon with kernel-libipsec (userspace ESP) on the namespace's kernel", flush=True)
    return start_charon("east", libipsec=True)


def main():
    global A
    ap = argparse.ArgumentParser()
    ap.add_argument("--espada", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--prefix", default="ike-")
    ap.add_argument("--peer", default="espada", choices=["espada", "libipsec", "no-pcpu"],
                    help="east: espada + charon (default), charon with kernel-libipsec alone, "
                         "or espada + charon without per-CPU SAs")
    A = ap.parse_args()
    A.espada = os.path.abspath(A.espada)
    os.makedirs(A.dir, exist_ok=True)
    sh([os.path.join(HERE, "strongswan"), "build"], timeout=1800)
    A.ss = sh([os.path.join(HERE, "strongswan"), "path"]).stdout.strip()
    charons = []
    try:
        up = lab("up")
        if up.returncode != 0:
            fail(f"scripts/lab up: {up.stdout}{up.stderr}")
        charons.append(start_charon("west"))
        charons.append(libipsec_peer() if A.peer == "libipsec" else start_charon("east"))
        # `swanctl --initiate` brings up the IKE_SA and the fallback Child SA; then each worker
        # sending on the fallback SA raises an acquire for its own per-CPU SA. (Without the
        # initiate, the first packets' acquire without CPU does the same: see restart_west.)
        t0 = time.time()
        if A.peer in ("espada", "no-pcpu"):
            r = swanctl("west", "--initiate", "--child", "net", "--timeout", "30", check=False, timeout=60)
            if r.returncode != 0:
                fail(f"swanctl --initiate: {r.stdout}{r.stderr}")
            print("west$ swanctl --initiate --child net: " + r.stdout.strip().splitlines()[-1], flush=True)
        while time.time() - t0 < 30:
            if sh(["ip", "netns", "exec", A.prefix + "sunset", "ping", "-c", "1", "-W", "1", "10.2.0.10"],
                  check=False).returncode == 0:
                break
        else:
            fail("no packet passed within 30 s of the first acquire")
        print(f"first packet through after {time.time() - t0:.1f} s", flush=True)
        if A.peer == "no-pcpu":
            no_pcpu_peer()
            return
        sas, text = wait_per_cpu(40 - (time.time() - t0), "after the first packets")
        print("west$ swanctl --list-sas\n" + text.strip(), flush=True)
        flows()
        time.sleep(2)
        show = sh([A.espada, "show", "sa", "--socket", os.path.join(A.dir, "west.sock")]).stdout
        print("west$ espada show sa\n" + show.strip(), flush=True)
        es = espada_sa("west")
        for cpu in (0, 1):
            row = [r for r in es if r["dir"] == "out" and r["cpu"] == cpu]
            ok = row and row[0]["packets"] > 0 and row[0]["owner_cores"] == [cpu] and any(
                c["cpu"] == cpu and c["out"] == int(row[0]["spi"], 16) for c in sas)
            if not ok:
                fail(f"core {cpu} does not send on a per-CPU Child SA charon negotiated for CPU {cpu}: {row}")
        ports = {r["udp_src_port"] for r in es if r["dir"] == "out"}
        if A.peer == "espada" and len(ports) != len([r for r in es if r["dir"] == "out"]):
            fail(f"the outbound SAs do not each have their own UDP source port: {ports}")
        if A.peer == "espada":
            east = espada_sa("east")
            for cpu in (0, 1):
                if not any(r["dir"] == "out" and r["cpu"] == cpu for r in east):
                    fail(f"east has no per-CPU SA for CPU {cpu}: {east}")
            print("east$ espada show sa\n" + sh([A.espada, "show", "sa", "--socket", os.path.join(A.dir, "east.sock")]).stdout.strip(), flush=True)
        print("per-CPU Child SAs: each worker sends on its own "
              + ("(and from its own UDP source port) " if A.peer == "espada" else "(UDP port 4500: libipsec peer) ")
              + ", ".join(f"core {r['cpu']}: {r['spi']} port {r['udp_src_port']} ({r['packets']} packets)"
                          for r in es if r["dir"] == "out" and r["cpu"] is not None), flush=True)
        out_spis = {c["out"] for c in sas}
        p = sh(["ip", "netns", "exec", A.prefix + "sunset", "ping", "-c", "5", "-i", "0.3", "-W", "3", "10.2.0.10"],
               check=False)
        got = re.search(r"(\d+) received", p.stdout)
        print(f"ping sunset -> sunrise over charon's SAs: {got.group(1) if got else 0}/5", flush=True)
        if not got or got.group(1) != "5":
            fail(f"ping: {p.stdout}{p.stderr}")
        traffic()
        if A.peer == "libipsec":
            agree("libipsec peer", sides=("west",))
            print("\nIKE lab checks passed (peer: charon with kernel-libipsec)", flush=True)
            return
        agree("after traffic")
        # Rekey of the Child SA under a UDP stream: nothing lost, new SPIs.
        during(300, "swanctl --rekey --child net", lambda: swanctl("west", "--rekey", "--child", "net"))
        time.sleep(2)
        sas2, _ = child_sas("west")
        new = [c for c in sas2 if c["out"] not in out_spis]
        if not new:
            fail(f"no new Child SA after the rekey: {sas2}")
        # charon lists a Child SA once its install call returned; the gateway's listing may
        # lag by a moment under load (seen once in CI after 2 s): wait for it, bounded.
        t0 = time.time()
        while True:
            es = espada_sa("west")
            missing = [c for c in new
                       if not any(r["dir"] == "out" and int(r["spi"], 16) == c["out"] for r in es)]
            if not missing:
                break
            if time.time() - t0 > 10:
                fail(f"espada does not send on the rekeyed SA {missing[0]['out']:08x}")
            time.sleep(0.5)
        print("rekeyed: west sends on " + ", ".join(f"{c['out']:08x} (cpu {c['cpu'] if c['cpu'] is not None else '-'})" for c in new), flush=True)
        traffic(udp=20, tcp=64 << 10)
        agree("after the rekey")
        # Rekey of the IKE SA under a UDP stream: the Child SAs stay; nothing lost.
        before = swanctl("west", "--list-sas").stdout
        during(200, "swanctl --rekey --ike lab", lambda: swanctl("west", "--rekey", "--ike", "lab"))
        time.sleep(1)
        after = swanctl("west", "--list-sas").stdout
        spis = lambda t: re.findall(r"ESTABLISHED, IKEv2, ([0-9a-f]+)_i", t)
        if spis(before) == spis(after) or "ESTABLISHED" not in after:
            fail(f"the IKE SA was not rekeyed:\n{before}\n{after}")
        print(f"IKE SA rekeyed: {spis(before)} -> {spis(after)}", flush=True)
        agree("after the IKE SA rekey")
        lifetime_rekeys()
        if os.environ.get("LAB_IKE_LONG", "1") == "1":
            long_rekeys()
        restart_west()
        print("\nIKE lab checks passed", flush=True)
    finally:
        for p in charons:
            p.terminate()
        for p in charons:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        down = lab("down")
        print(down.stdout[-1500:], flush=True)
        if down.returncode != 0 and sys.exc_info()[0] is None:
            # The black-link capture check (scripts/lab down): a repeated (SPI, sequence).
            fail(f"scripts/lab down: {down.stdout[-2000:]}{down.stderr[-1000:]}")


if __name__ == "__main__":
    main()
