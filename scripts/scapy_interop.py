#!/usr/bin/env python3
"""Independent ESP-in-UDP AES-GCM peer for espada's interoperability tests, built on scapy.

  scapy_interop.py gen OUT [--count N] [--seed S]
      scapy encrypts random inner packets (payload 0..1500 bytes, IPv4 and IPv6 inner, IPv4 and
      IPv6 outer, AES-GCM-128 and -256, ESN on and off) and writes a vector file in the format
      of tests/vectors/README.md; `espada vectors check OUT` must decrypt every one and
      re-encrypt it to the same bytes.

  scapy_interop.py check FILE
      For a vector file made by `espada vectors gen`: scapy decrypts every `esp` and compares it
      with `inner`, and re-encrypts `inner` with the same SA, sequence number and IV and compares
      with `esp`. Prints one line per failure and `N passed, M failed`; exits 1 on any failure.
"""
import argparse
import json
import random
import sys

from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.packet import Raw, raw


def make_sa(v):
    key = bytes.fromhex(v["key_salt"])
    outer = IPv6 if v["outer"] == "ipv6" else IP
    return SecurityAssociation(
        ESP,
        spi=v["spi"],
        crypt_algo="AES-GCM",
        crypt_key=key,
        tunnel_header=outer(src=v["outer_src"], dst=v["outer_dst"]),
        nat_t_header=UDP(sport=v["udp_sport"], dport=v["udp_dport"]),
        esn_en=v["esn"],
        esn=v["seq"] >> 32,
    )


def parse_inner(b):
    return IPv6(b) if b[0] >> 4 == 6 else IP(b)


def encrypt(v, inner_bytes):
    sa = make_sa(v)
    out = sa.encrypt(parse_inner(inner_bytes), seq_num=v["seq"] & 0xFFFFFFFF, iv=bytes.fromhex(v["iv"]))
    return raw(out[UDP].payload), raw(out)


def decrypt(v, esp_bytes):
    sa = make_sa(v)
    outer = IPv6 if v["outer"] == "ipv6" else IP
    pkt = outer(raw(outer(src=v["outer_src"], dst=v["outer_dst"]) / UDP(sport=v["udp_sport"], dport=v["udp_dport"]) / Raw(esp_bytes)))
    # scapy dissects UDP/4500 as NAT-T ESP.
    return raw(sa.decrypt(pkt))


def random_inner(rng, v6, n):
    payload = bytes(rng.getrandbits(8) for _ in range(n))
    if v6:
        p = IPv6(src="2001:db8:a::10", dst="2001:db8:b::20", tc=rng.randrange(0, 256) & 0xFC, hlim=64) / UDP(sport=rng.randrange(1024, 65535), dport=5201) / Raw(payload)
    else:
        p = IP(src="192.0.2.10", dst="198.51.100.20", tos=rng.randrange(0, 256) & 0xFC, id=rng.randrange(0, 65536), flags="DF" if rng.random() < 0.5 else 0, ttl=64) / UDP(sport=rng.randrange(1024, 65535), dport=5201) / Raw(payload)
    return raw(p)


def gen(args):
    rng = random.Random(args.seed)
    vectors = []
    sizes = [0, 1, 2, 3, 4, 5, 1500] + [rng.randrange(0, 1501) for _ in range(max(0, args.count - 7))]
    for i, n in enumerate(sizes[: args.count]):
        bits = 256 if i % 2 else 128
        esn = (i // 2) % 2 == 1
        inner_v6 = (i // 4) % 2 == 1
        outer_v6 = (i // 8) % 2 == 1
        key = bytes(rng.getrandbits(8) for _ in range(bits // 8 + 4))
        seq = rng.randrange(1 << 32, 1 << 40) if esn else rng.randrange(1, 1 << 32)
        v = {
            "name": f"scapy-{i}/aes-gcm-{bits}-{'ipv6' if outer_v6 else 'ipv4'}-{'esn' if esn else 'seq32'}/{'ipv6' if inner_v6 else 'ipv4'}-{n}",
            "aead": f"aes-gcm-{bits}",
            "key_salt": key.hex(),
            "spi": rng.randrange(0x100, 1 << 32),
            "esn": esn,
            "seq": seq,
            "iv": bytes(rng.getrandbits(8) for _ in range(8)).hex(),
            "outer": "ipv6" if outer_v6 else "ipv4",
            "outer_src": "2001:db8:1::1" if outer_v6 else "203.0.113.1",
            "outer_dst": "2001:db8:1::2" if outer_v6 else "203.0.113.2",
            "udp_sport": 4500 + rng.randrange(0, 16),
            "udp_dport": 4500,
            "next_header": 41 if inner_v6 else 4,
            "expect": "accept",
        }
        inner = random_inner(rng, inner_v6, n)
        esp, outer_packet = encrypt(v, inner)
        v["inner"] = inner.hex()
        v["esp"] = esp.hex()
        v["outer_packet"] = outer_packet.hex()
        vectors.append(v)
    with open(args.out, "w") as f:
        json.dump({"source": f"scapy (scripts/scapy_interop.py gen --seed {args.seed})", "set": "interop", "vectors": vectors}, f, indent=1)
    print(f"wrote {len(vectors)} scapy-made vectors to {args.out}")


def check(args):
    with open(args.file) as f:
        vectors = json.load(f)["vectors"]
    passed = failed = 0
    for v in vectors:
        if v["expect"] != "accept":
            continue
        inner = bytes.fromhex(v["inner"])
        esp = bytes.fromhex(v["esp"])
        errs = []
        try:
            got = decrypt(v, esp)
            if got != inner:
                errs.append("scapy's decryption differs from inner")
        except Exception as e:  # noqa: BLE001 - any failure of the peer is a failed vector
            errs.append(f"scapy could not decrypt: {e!r}")
        try:
            mine, _ = encrypt(v, inner)
            if mine != esp:
                errs.append("scapy's encryption differs from esp")
        except Exception as e:  # noqa: BLE001
            errs.append(f"scapy could not encrypt: {e!r}")
        if errs:
            failed += 1
            print(f"FAIL {v['name']}: {'; '.join(errs)}")
        else:
            passed += 1
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed or not passed else 0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen")
    g.add_argument("out")
    g.add_argument("--count", type=int, default=64)
    g.add_argument("--seed", type=int, default=1)
    g.set_defaults(fn=gen)
    c = sub.add_parser("check")
    c.add_argument("file")
    c.set_defaults(fn=check)
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
