#!/usr/bin/env python3
"""Steering a running lab through the control socket (issue 13), under traffic:
  1. `espada show sa` lists each gateway's SAs;
  2. `espada sa rekey` on west, then on east, while a stream runs: every datagram arrives, and
     both gateways then send on new SPIs;
  3. `espada sa del --tunnel` on west: the tunnel's traffic is discarded and counted by west
     (policy-discard), never sent in the clear; `espada sa add --tunnel` puts it back and a
     stream arrives whole;
  4. `espada sa update --spi` gives an SA a new hard lifetime, which `show sa` reports;
  5. refusals are clear: an unknown tunnel, a static-key rekey target, an outbound SPI to delete.

  lab_sa.py --prefix P --dir D --espada BIN"""
import argparse
import json
import os
import subprocess
import sys
import time

import lab_check as lc
from lab_check import fail, last_stats, udp_stream, wait_stats

TUNNEL = "sunset-sunrise"


def esp(a, gw, *args, ok=True):
    r = subprocess.run([a.espada, *args, "--socket", os.path.join(a.dir, f"{gw}.sock")],
                       capture_output=True, text=True)
    if ok and r.returncode != 0:
        fail(f"espada {' '.join(args)} ({gw}): {r.stdout}{r.stderr}")
    if not ok and r.returncode == 0:
        fail(f"espada {' '.join(args)} ({gw}) was accepted: {r.stdout}")
    return r.stdout + r.stderr


def out_spis(a, gw):
    sa = json.loads(esp(a, gw, "show", "sa", "--json"))
    # (SPIs are hex strings in the JSON answer, as in the table.)
    return sorted(r["spi"] for r in sa["sas"] if r["dir"] == "out")


def stream_in_background(a, n, rate, port, tag):
    return subprocess.Popen([sys.executable, "-c", "import sys; sys.path.insert(0, 'scripts'); import lab_check as lc, argparse;"
                             f"lc.A = argparse.Namespace(prefix={a.prefix!r}, dir={a.dir!r}, dst={a.dst!r});"
                             f"print(*lc.udp_stream({n}, {rate}, {port}, {tag!r}))"], stdout=subprocess.PIPE, text=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--espada", required=True)
    ap.add_argument("--dst", default="10.2.0.10")
    a = ap.parse_args()
    lc.A = a

    # 1. The SAs, as an operator sees them.
    table = esp(a, "west", "show", "sa")
    print("west: espada show sa\n" + table)
    before = {gw: out_spis(a, gw) for gw in ("west", "east")}

    # 2. Rekey both gateways, one after the other, under a stream.
    bg = stream_in_background(a, 3000, 500, 5371, "rekey")
    time.sleep(1.5)
    print(esp(a, "west", "sa", "rekey", "--tunnel", TUNNEL).strip())
    time.sleep(1.5)
    print(esp(a, "east", "sa", "rekey").strip())
    out, _ = bg.communicate(timeout=120)
    got, dup = map(int, out.split())
    after = {gw: out_spis(a, gw) for gw in ("west", "east")}
    print(f"rekey under a stream: {got}/3000 datagrams ({dup} duplicates); west sends on "
          f"{before['west']} -> {after['west']}, east {before['east']} -> {after['east']}")
    if got != 3000 or dup:
        fail("datagrams were lost across the rekey")
    if set(before["west"]) & set(after["west"]) or set(before["east"]) & set(after["east"]):
        fail("the rekey did not move the gateways to new SPIs")
    got, _ = udp_stream(300, 500, 5372, "after-rekey")
    if got != 300:
        fail(f"after both rekeys only {got}/300 arrived")

    # 3. Delete the tunnel on west, then put it back.
    got, _ = udp_stream(300, 500, 5373, "before-del")
    print(esp(a, "west", "sa", "del", "--tunnel", TUNNEL).strip())
    wait_stats()
    d0 = last_stats("west")["drops"].get("policy-discard", 0)
    gone, _ = udp_stream(100, 500, 5374, "deleted")
    wait_stats()
    d1 = last_stats("west")["drops"].get("policy-discard", 0)
    sa = json.loads(esp(a, "west", "show", "sa", "--json"))
    left = [r for r in sa["sas"] if r["tunnel"] == TUNNEL]
    print(esp(a, "west", "sa", "add", "--tunnel", TUNNEL).strip())
    back, _ = udp_stream(300, 500, 5375, "re-added")
    print(f"delete and re-add: {got}/300 before; while deleted {gone}/100 delivered, {d1 - d0} discarded by west, "
          f"{len(left)} SA(s) of the tunnel listed; after re-adding {back}/300")
    if got != 300 or gone != 0 or d1 - d0 < 100 or left or back != 300:
        fail("deleting or re-adding the tunnel did not do what it says")

    # 4. A new hard lifetime for one SA.
    spi = out_spis(a, "west")[0]
    print(esp(a, "west", "sa", "update", "--spi", spi, "--hard-seconds", "7200").strip())
    sa = json.loads(esp(a, "west", "show", "sa", "--json"))
    row = [r for r in sa["sas"] if r["spi"] == spi and r["dir"] == "out"][0]
    if row["lifetime"]["hard_seconds"] != 7200:
        fail(f"sa update did not change the hard lifetime: {row}")

    # 5. Clear refusals.
    for args in (["sa", "del", "--tunnel", "nowhere"], ["sa", "rekey", "--tunnel", "nowhere"],
                 ["sa", "del", "--spi", spi]):
        print(f"refused: espada {' '.join(args)}: {esp(a, 'west', *args, ok=False).strip()}")
    got, _ = udp_stream(100, 500, 5376, "end")
    if got != 100:
        fail(f"after the refusals only {got}/100 arrived")
    print("sa command checks passed")


if __name__ == "__main__":
    main()
