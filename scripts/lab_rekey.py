#!/usr/bin/env python3
"""Rekeying without IKE under traffic, against a running lab (scripts/lab up) whose configs say
lab_rekey = true with short lifetimes: a steady UDP stream and a ping run for DURATION seconds
across several generation switches; nothing may be lost, no SA may expire, and the gateways must
have switched generations.

  lab_rekey.py --prefix P --dir D [--seconds 40]"""
import argparse
import os
import subprocess
import sys

import lab_check as lc
from lab_check import fail, last_stats, ns, udp_stream, wait_stats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--dst", default="10.2.0.10")
    ap.add_argument("--seconds", type=int, default=40)
    a = ap.parse_args()
    lc.A = a
    rate = 200
    n = a.seconds * rate
    ping = subprocess.Popen(["ip", "netns", "exec", ns("sunset"), "ping", "-q", "-i", "0.5", "-W", "2",
                             "-c", str(a.seconds * 2), a.dst], stdout=subprocess.PIPE, text=True)
    got, dup = udp_stream(n, rate, 5350, "rekey")
    pout, _ = ping.communicate(timeout=a.seconds + 30)
    wait_stats()
    drops = {}
    for gw in ("west", "east"):
        for k, v in last_stats(gw)["drops"].items():
            drops[f"{gw}:{k}"] = v
    switches = {gw: open(os.path.join(a.dir, gw + ".log")).read().count("rekeyed to generation") for gw in ("west", "east")}
    summary = [l for l in pout.splitlines() if "transmitted" in l]
    print(f"{a.seconds} s under traffic: {got}/{n} datagrams ({dup} duplicates); ping: {summary}; "
          f"generation switches {switches}; drops {drops}")
    if any(k.endswith(("sa-expired", "no-outbound-sa", "no-sa", "integrity", "replay")) and v for k, v in drops.items()):
        fail("SAs expired or were missing across the rekeys")
    if got != n or dup:
        fail("datagrams were lost across the rekeys")
    if not summary or f"{a.seconds * 2} received" not in summary[0]:
        fail("pings were lost across the rekeys")
    if min(switches.values()) < 2:
        fail(f"the gateways did not switch generations: {switches}")
    print("rekey checks passed")


if __name__ == "__main__":
    main()
