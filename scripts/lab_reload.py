#!/usr/bin/env python3
"""Reloading a running gateway (espada reload / SIGHUP) under traffic, against a running lab
whose west configuration is the file WEST (a copy the test may edit):
  1. a steady stream runs while west's configuration gains a discard policy for UDP port 5360
     and west reloads: not one datagram of the stream is lost;
  2. datagrams to port 5360 are now discarded by west (policy-discard), others still pass;
  3. a broken configuration is refused and west keeps forwarding.

  lab_reload.py --prefix P --dir D --espada BIN --west FILE"""
import argparse
import os
import subprocess
import sys
import time

import lab_check as lc
from lab_check import fail, last_stats, ns, udp_stream, wait_stats

POLICIES = '''
[[policy]]
name = "no-5360"
src = "10.1.0.0/24"
dst = "10.2.0.0/24"
proto = "udp"
dst_port = "5360"
action = "discard"

[[policy]]
name = "lab"
src = "10.1.0.0/24"
dst = "10.2.0.0/24"
action = "protect"
tunnel = "sunset-sunrise"
'''


def reload(a, ok=True):
    r = subprocess.run([a.espada, "reload", "--socket", os.path.join(a.dir, "west.sock")], capture_output=True, text=True)
    if ok and r.returncode != 0:
        fail(f"espada reload: {r.stdout}{r.stderr}")
    if not ok and r.returncode == 0:
        fail(f"espada reload accepted a broken configuration: {r.stdout}")
    return (r.stdout + r.stderr).strip()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--espada", required=True)
    ap.add_argument("--west", required=True)
    ap.add_argument("--dst", default="10.2.0.10")
    a = ap.parse_args()
    lc.A = a
    original = open(a.west).read()
    # 1. Reload under a steady stream.
    bg = subprocess.Popen([sys.executable, "-c", "import sys; sys.path.insert(0, 'scripts'); import lab_check as lc, argparse;"
                           f"lc.A = argparse.Namespace(prefix={a.prefix!r}, dir={a.dir!r}, dst={a.dst!r});"
                           "print(*lc.udp_stream(3000, 500, 5361, 'reload'))"], stdout=subprocess.PIPE, text=True)
    time.sleep(2)
    with open(a.west, "w") as f:
        f.write(original + POLICIES)
    reload(a)
    out, _ = bg.communicate(timeout=120)
    got, dup = map(int, out.split())
    log = open(os.path.join(a.dir, "west.log")).read()
    reloaded = [l for l in log.splitlines() if "reloaded" in l]
    print(f"reload under a stream: {got}/3000 datagrams ({dup} duplicates); west: {reloaded[-1:] }")
    if not reloaded:
        fail(f"west did not reload: {log[-2000:]}")
    if got != 3000 or dup:
        fail("datagrams were lost across the reload")
    # 2. The new policy is in force.
    before = last_stats("west")["drops"].get("policy-discard", 0)
    got5360, _ = udp_stream(50, 200, 5360, "discarded")
    got5362, _ = udp_stream(50, 200, 5362, "kept")
    wait_stats()
    after = last_stats("west")["drops"].get("policy-discard", 0)
    print(f"after the reload: port 5360 {got5360}/50 delivered, {after - before} discarded by west; port 5362 {got5362}/50")
    if got5360 != 0 or after - before < 50 or got5362 != 50:
        fail("the reloaded policy is not what west applies")
    # 3. A broken configuration is refused; west keeps going.
    with open(a.west, "w") as f:
        f.write(original.replace("replay_window = 4096", "replay_window = 7"))
    said = reload(a, ok=False)
    print(f"espada reload answered: {said}")
    time.sleep(1)
    log = open(os.path.join(a.dir, "west.log")).read()
    if "reload refused" not in log:
        fail("a broken configuration was not refused")
    got, _ = udp_stream(50, 200, 5362, "after-refusal")
    print(f"broken configuration refused: {[l for l in log.splitlines() if 'reload refused' in l][-1]}; then {got}/50")
    if got != 50:
        fail("west stopped forwarding after a refused reload")
    with open(a.west, "w") as f:
        f.write(original)
    print("reload checks passed")


if __name__ == "__main__":
    main()
