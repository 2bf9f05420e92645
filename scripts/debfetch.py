#!/usr/bin/env python3
"""Download Debian packages and the shared libraries they depend on from a suite other than the
host's (for the kernel guests of scripts/kernel-guest: a newer kernel and iproute2 than
Debian 12 has), without touching the host's apt configuration.

    debfetch.py --suite sid --out DIR iproute2 [more packages...]
    debfetch.py --suite trixie-backports --out DIR --no-deps linux-image-6.18...-cloud-amd64
    debfetch.py --suite trixie-backports --latest 'linux-image-[0-9.]+\\+deb13-cloud-amd64'

Dependencies are followed only into library packages (lib*, zlib1g), which is what an initramfs needs to
run the binaries; the first alternative of each dependency is taken."""
import argparse
import lzma
import os
import re
import sys
import urllib.request

MIRROR = os.environ.get("ESPADA_DEBIAN_MIRROR", "http://deb.debian.org/debian")


def index(suite, cache):
    path = os.path.join(cache, f"Packages-{suite}.xz")
    if not os.path.exists(path):
        urllib.request.urlretrieve(f"{MIRROR}/dists/{suite}/main/binary-amd64/Packages.xz", path)
    pk = {}
    for block in lzma.open(path, "rt").read().split("\n\n"):
        f = {}
        for line in block.splitlines():
            if line and not line[0].isspace() and ":" in line:
                k, v = line.split(":", 1)
                f[k] = v.strip()
        if "Package" in f:
            pk[f["Package"]] = f
    return pk


def version_key(name):
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", name)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-deps", action="store_true")
    ap.add_argument("--latest", help="print the newest package name matching this regex and exit")
    ap.add_argument("packages", nargs="*")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    pk = index(a.suite, a.out)
    if a.latest:
        names = sorted((n for n in pk if re.fullmatch(a.latest, n)), key=version_key)
        if not names:
            sys.exit(f"no package matching {a.latest} in {a.suite}")
        print(names[-1])
        return
    want, seen = list(a.packages), set()
    while want:
        n = want.pop()
        if n in seen:
            continue
        seen.add(n)
        if n not in pk:
            sys.exit(f"{n}: not in {a.suite}")
        if a.no_deps:
            continue
        for dep in pk[n].get("Depends", "").split(",") + pk[n].get("Pre-Depends", "").split(","):
            alt = dep.split("|")[0].strip().split(" ")[0].split(":")[0]
            if (alt.startswith("lib") or alt == "zlib1g") and alt in pk:
                want.append(alt)
    for n in sorted(seen):
        fn = pk[n]["Filename"]
        dst = os.path.join(a.out, os.path.basename(fn))
        if not os.path.exists(dst):
            urllib.request.urlretrieve(f"{MIRROR}/{fn}", dst + ".part")
            os.rename(dst + ".part", dst)
        print(dst)


if __name__ == "__main__":
    main()
