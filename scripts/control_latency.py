#!/usr/bin/env python3
"""How long one control-socket request takes, on a fresh connection each time (what the
kernel-espada plugin did before it kept connections) and on one kept connection (what it
does now): median and p90 over N requests of each kind, interleaved.

    control_latency.py --socket /run/espada/espada.sock [--requests 200]

The requests are the plugin's most frequent: `show sa` of one SPI (charon's query_sa) and
`sa acquires` (its poll, five times a second). Read-only: safe on a running gateway."""
import argparse
import json
import socket
import statistics
import time

REQS = {
    "query_sa (show sa of one SPI)": {"cmd": "show", "what": "sa", "args": {"spi": 4096}},
    "acquire poll (sa acquires)": {"cmd": "sa", "what": "acquires", "args": {"daemon": 12345}},
}


def one(s, f, line):
    s.sendall(line)
    ans = f.readline()
    if not ans.endswith(b"\n"):
        raise SystemExit(f"cut answer: {ans[:200]!r}")
    json.loads(ans)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--requests", type=int, default=200)
    a = ap.parse_args()
    for name, req in REQS.items():
        line = (json.dumps(req) + "\n").encode()
        fresh, kept = [], []
        ks, kf, kuses, kborn = None, None, 0, 0.0
        for _ in range(a.requests):
            t0 = time.perf_counter()
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(a.socket)
            f = s.makefile("rb")
            one(s, f, line)
            f.close()
            s.close()
            fresh.append(time.perf_counter() - t0)
            # Kept: as the plugin, a new connection after 48 requests or 5 s.
            if ks is None or kuses >= 48 or time.time() - kborn > 5:
                if ks:
                    kf.close()
                    ks.close()
                ks = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                ks.connect(a.socket)
                kf, kuses, kborn = ks.makefile("rb"), 0, time.time()
            t0 = time.perf_counter()
            one(ks, kf, line)
            kept.append(time.perf_counter() - t0)
            kuses += 1
        if ks:
            kf.close()
            ks.close()

        def q(v, p):
            return sorted(v)[int(p * (len(v) - 1))] * 1e6

        print(f"{name}: fresh connection median {statistics.median(fresh) * 1e6:.0f} us (p90 {q(fresh, 0.9):.0f}); "
              f"kept connection median {statistics.median(kept) * 1e6:.0f} us (p90 {q(kept, 0.9):.0f}); "
              f"ratio of medians {statistics.median(fresh) / statistics.median(kept):.2f}", flush=True)


if __name__ == "__main__":
    main()
