#!/usr/bin/env python3
"""Issue 26 in the namespace lab: both gateways with N generated tunnels (scripts/gen-tunnels
--lab-tunnel --lab-rekey) plus the lab hosts' own tunnel (static keys: the untouched one), and:

  1. `espada check` of both configurations (median of 3);
  2. the lab up, then west restarted alone: seconds from `espada run` to the first ping through,
     and how long SIGTERM takes to stop it;
  3. `espada sa batch` of N inbound SAs on west (new SPIs and keys): SA adds per second;
  4. a paced UDP stream sunset -> sunrise on the lab tunnel while `espada sa rekey` moves all N
     tunnels of both gateways to their next generation: datagrams per second at sunrise (the
     lowest second against the median), lost and duplicated datagrams, the rekeys' durations;
  5. RSS of west at start, after the batch, and after each of R reloads (per SA).

  lab_scale.py --espada target/release/espada [--n 10000] [--rate 2000] [--seconds 15]
               [--reloads 10] [--dir /tmp/espada-scale] [--prefix sc-] [--keep]

Prints a table; exits 1 if anything was lost or duplicated, a second fell below --rate-floor of
the median (default 0.9), a rekey or the batch failed, or the black link carried an (SPI,
sequence number) pair twice. Durations are reported, not asserted (the machine is shared)."""
import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

RECV = r"""
import json, socket, sys, time
port, n, secs = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind(("0.0.0.0", port))
s.settimeout(0.5)
print("ready", flush=True)
seen, dup, per = set(), 0, {}
t0 = last = None
end = time.time() + secs + 30
while len(seen) < n and time.time() < end:
    try:
        d, _ = s.recvfrom(2048)
    except socket.timeout:
        if t0 is not None and time.time() - last > 3:
            break
        continue
    last = time.time()
    i = int(d[:10])
    if t0 is None:
        t0 = last - i / float(sys.argv[4])
    if i in seen:
        dup += 1
        continue
    seen.add(i)
    sec = int(last - t0)
    per[sec] = per.get(sec, 0) + 1
print(json.dumps({"got": len(seen), "dup": dup, "per": per}))
"""

SEND = r"""
import socket, sys, time
dst, port, n, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
t0 = time.time()
pad = b"x" * 90
for i in range(n):
    due = t0 + i / rate
    d = due - time.time()
    if d > 0:
        time.sleep(d)
    s.sendto(b"%010d" % i + pad, (dst, port))
"""


def sh(cmd, check=True, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        sys.exit(f"FAIL: {' '.join(map(str, cmd))}: {r.stdout}{r.stderr}")
    return r


def rss_kb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--espada", default=os.path.join(ROOT, "target/release/espada"))
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--rate", type=int, default=2000)
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--reloads", type=int, default=10)
    ap.add_argument("--dir", default="/tmp/espada-scale")
    ap.add_argument("--prefix", default="sc-")
    ap.add_argument("--keep", action="store_true", help="leave the lab up")
    ap.add_argument("--rate-floor", type=float, default=0.9,
                    help="fail if a second of the stream falls below this fraction of the median (0: report only)")
    a = ap.parse_args()
    esp = os.path.abspath(a.espada)
    os.makedirs(a.dir, exist_ok=True)
    cfgdir = os.path.join(a.dir, "configs")
    sh([os.path.join(HERE, "gen-tunnels"), str(a.n), cfgdir, "--lab-tunnel", "--lab-rekey", "86400"])
    west, east = os.path.join(cfgdir, "west.toml"), os.path.join(cfgdir, "east.toml")
    rows = []
    bad = []

    # 1. check
    ts = []
    for _ in range(3):
        t = time.time()
        sh([esp, "check", "-q", "-c", west, "-c", east])
        ts.append(time.time() - t)
    rows.append(("espada check (both configs, median of 3)", f"{statistics.median(ts):.2f} s"))

    env = dict(os.environ, ESPADA_LAB_PREFIX=a.prefix, ESPADA_LAB_DIR=os.path.join(a.dir, "lab"),
               ESPADA_BIN=esp, ESPADA_WEST=west, ESPADA_EAST=east)
    lab = lambda what: subprocess.run([os.path.join(HERE, "lab"), what], env=env, cwd=ROOT,
                                      capture_output=True, text=True)
    lab("down")
    t = time.time()
    r = lab("up")
    if r.returncode != 0:
        sys.exit(f"FAIL: lab up: {r.stdout}{r.stderr}")
    rows.append(("lab up (namespaces, both gateways, first ping)", f"{time.time() - t:.2f} s"))
    ldir = os.path.join(a.dir, "lab")
    ns = lambda n: a.prefix + n
    sock = {g: os.path.join(ldir, g + ".sock") for g in ("west", "east")}
    try:
        # 2. west alone: start to forwarding, SIGTERM to exit.
        pid = int(open(os.path.join(ldir, "west.pid")).read())
        t = time.time()
        os.kill(pid, 15)
        while os.path.exists(f"/proc/{pid}") and time.time() - t < 30:
            try:
                if open(f"/proc/{pid}/stat").read().split()[2] == "Z":
                    break
            except OSError:
                break
            time.sleep(0.01)
        rows.append(("west: SIGTERM to exit", f"{time.time() - t:.2f} s"))
        log = open(os.path.join(ldir, "west.log"), "a")
        t = time.time()
        w = subprocess.Popen(["ip", "netns", "exec", ns("west"), esp, "run", "-c", west, "--state-dir",
                              os.path.join(ldir, "state"), "--control", sock["west"], "--idle-sleep-us", "50",
                              "--interval", "1", "--stats-json", os.path.join(ldir, "west.jsonl")],
                             stdout=log, stderr=log)
        open(os.path.join(ldir, "west.pid"), "w").write(str(w.pid))
        fwd = None
        while time.time() - t < 30:
            if sh(["ip", "netns", "exec", ns("sunset"), "ping", "-c1", "-W", "0.2", "-q", "10.2.0.10"],
                  check=False).returncode == 0:
                fwd = time.time() - t
                break
        if fwd is None:
            sys.exit("FAIL: west did not forward within 30 s of its restart")
        rows.append(("west: `espada run` to the first ping through", f"{fwd:.2f} s"))
        sas = json.loads(sh([esp, "show", "sa", "--json", "--socket", sock["west"]]).stdout)["sas"]
        n_sa = len(sas)
        rows.append(("west SAs (every generation a lab_rekey tunnel accepts counts)",
                     f"{n_sa}: {sum(s['dir'] == 'out' for s in sas)} out, {sum(s['dir'] == 'in' for s in sas)} in"))
        # `show sa --tunnel`: one tunnel's rows out of tens of thousands.
        one = json.loads(sh([esp, "show", "sa", "--json", "--tunnel", "t0", "--socket", sock["west"]]).stdout)["sas"]
        if not one or any(r["tunnel"] != "t0" for r in one):
            bad.append(f"show sa --tunnel t0: {len(one)} rows, not only t0's")
        miss = sh([esp, "show", "sa", "--tunnel", "no-such", "--socket", sock["west"]], check=False)
        if miss.returncode != 1 or "no SA of tunnel" not in miss.stderr:
            bad.append(f"show sa --tunnel no-such: {miss.returncode} {miss.stderr}")
        rows.append(("show sa --tunnel t0", f"{len(one)} rows (of {n_sa})"))
        rss0 = rss_kb(w.pid)
        rows.append(("west RSS after start", f"{rss0 / 1024:.0f} MB"))

        # 3. sa batch: N new inbound SAs (as a person installs the peer's next SAs).
        bf = os.path.join(a.dir, "batch.jsonl")
        fd = os.open(bf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            for i in range(a.n):
                f.write(json.dumps({"what": "add", "args": {"tunnel": f"t{i}", "dir": "in",
                                    "spi": 0x4000_0000 + i, "key": secrets.token_hex(20)}}) + "\n")
        t = time.time()
        r = sh(["ip", "netns", "exec", ns("west"), esp, "sa", "batch", bf, "--socket", sock["west"]], check=False)
        dt = time.time() - t
        if r.returncode != 0:
            bad.append(f"sa batch: {r.stdout}{r.stderr}")
        rows.append((f"sa batch of {a.n} inbound SA adds", f"{dt:.2f} s: {a.n / dt:.0f} SA/s ({r.stdout.strip()})"))
        time.sleep(1)  # as after a reload: once the freed heap went back
        rss1 = rss_kb(w.pid)
        rows.append(("west RSS after the batch", f"{rss1 / 1024:.0f} MB"))

        # 4. stream on the lab tunnel, all N rekeyed meanwhile.
        n = a.rate * a.seconds
        rcv = subprocess.Popen(["ip", "netns", "exec", ns("sunrise"), sys.executable, "-c", RECV, "5999",
                                str(n), str(a.seconds), str(a.rate)], stdout=subprocess.PIPE, text=True)
        assert rcv.stdout.readline().strip() == "ready"
        snd = subprocess.Popen(["ip", "netns", "exec", ns("sunset"), sys.executable, "-c", SEND, "10.2.0.10",
                                "5999", str(n), str(a.rate)])
        time.sleep(a.seconds / 3)
        rk = {}
        for g in ("east", "west"):
            log = os.path.join(ldir, g + ".log")
            mark = os.path.getsize(log)
            t = time.time()
            r = sh([esp, "sa", "rekey", "--socket", sock[g]], check=False)
            rk[g] = time.time() - t
            if r.returncode != 0:
                bad.append(f"sa rekey on {g}: {r.stdout}{r.stderr}")
            first = r.stdout.splitlines()[:1]
            # Done when the gateway logs a slice with nothing more to follow.
            done = rk[g] if "more snapshot" not in r.stdout else None
            while done is None and time.time() - t < 30:
                with open(log) as f:
                    f.seek(mark)
                    ticks = [l for l in f.read().splitlines()
                             if "to their next generation" in l or "rekeyed to generation" in l]
                if ticks and "more follow" not in ticks[-1]:
                    done = time.time() - t
                time.sleep(0.02)
            rows.append((f"sa rekey of all tunnels on {g}",
                         f"command {rk[g]:.2f} s, all installed after {done if done is None else round(done, 2)} s; {first}"))
            if done is None:
                bad.append(f"sa rekey on {g} not finished within 30 s")
        snd.wait(timeout=a.seconds + 60)
        out, _ = rcv.communicate(timeout=90)
        res = json.loads(out)
        per = [res["per"].get(str(s), 0) for s in range(1, a.seconds - 1)]  # whole seconds
        med = statistics.median(per) if per else 0
        low = min(per) if per else 0
        rows.append((f"stream {a.rate}/s on the lab tunnel, {a.seconds} s",
                     f"{res['got']}/{n} received, {n - res['got']} lost, {res['dup']} duplicates; "
                     f"per second {per}; lowest {low} = {low / max(med, 1):.2f} x median"))
        if res["got"] != n or res["dup"]:
            bad.append("datagrams lost or duplicated on the untouched tunnel")
        if low < a.rate_floor * med:
            bad.append(f"a second at {low / med:.2f} x the median rate (floor {a.rate_floor})")

        # 5. reloads
        rss = []
        for i in range(a.reloads):
            t = time.time()
            r = sh([esp, "reload", "--socket", sock["west"]], check=False)
            rt = time.time() - t
            if r.returncode != 0:
                bad.append(f"reload {i + 1}: {r.stdout}{r.stderr}")
            # The gateway hands freed heap back 300 ms after a big change (its workers let go
            # of the old snapshot first): read once it has.
            time.sleep(1)
            rss.append(rss_kb(w.pid))
            if i == 0:
                rows.append(("reload (the first, through the control socket)", f"{rt:.2f} s"))
        if rss:
            rows.append((f"west RSS over {a.reloads} reloads (1 s after each)", " ".join(f"{x / 1024:.0f}" for x in rss) + " MB"))
            # Per SA as held at each moment: the batch's SAs and the rekeys' new generations
            # are in the database after the reloads as well.
            n_now = len(json.loads(sh([esp, "show", "sa", "--json", "--socket", sock["west"]]).stdout)["sas"])
            rows.append(("west RSS per SA: at start, after the last reload",
                         f"{rss0 * 1024 / n_sa:.0f} B ({n_sa} SAs), {rss[-1] * 1024 / n_now:.0f} B ({n_now} SAs)"))
            growth = (max(rss) - min(rss)) / min(rss)
            rows.append(("west RSS growth over the reloads", f"{growth * 100:.1f} %"))
        st = json.loads(sh([esp, "show", "stats", "--json", "--socket", sock["west"]]).stdout)
        rows.append(("west drops", json.dumps(st.get("drops", st.get("total", {}).get("drops", {})))[:200]))
    finally:
        if not a.keep:
            # `lab down` also checks the black-link capture: no (SPI, sequence number) twice.
            r = lab("down")
            print("\n".join((r.stdout + r.stderr).splitlines()[-12:]))
            if r.returncode != 0:
                bad.append("scripts/lab down (black-link capture check) failed")
    w_ = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w_}}  {v}")
    if bad:
        print("FAIL: " + "; ".join(bad))
        sys.exit(1)
    print("scale checks passed")


if __name__ == "__main__":
    main()
