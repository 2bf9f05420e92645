#!/usr/bin/env python3
"""Builds every packet of the TRex profiles under benches/trex (no TRex needed) and checks
them: frame lengths as asked (64, 1400, IMIX 7:4:1), one UDP source port per flow (the port
that pins the flow to a CPU), addresses in sunset's and sunrise's subnets, valid IPv4 and UDP
checksums, and the flow rules naming each flow's queue. Exit 0 when all hold."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import espada_pcpu as p  # noqa: E402
from scapy.layers.inet import IP, UDP  # noqa: E402
from scapy.layers.l2 import Ether  # noqa: E402


def check(flows, size):
    pkts = p.flow_packets(flows, size)
    want = p.frame_sizes(size)
    assert len(pkts) == flows * len(want), (flows, size, len(pkts))
    for flow, length, weight, pkt in pkts:
        raw = bytes(pkt)
        assert len(raw) == length, (size, length, len(raw))
        back = Ether(raw)
        ip, udp = back[IP], back[UDP]
        assert (ip.src, ip.dst) == (p.SUNSET, p.SUNRISE)
        assert udp.sport == p.BASE_PORT + flow and udp.dport == p.DST_PORT
        # The checksums scapy filled in, checked by recomputing them.
        ip_sum, udp_sum = ip.chksum, udp.chksum
        del ip.chksum, udp.chksum
        again = Ether(bytes(back))
        assert again[IP].chksum == ip_sum and again[UDP].chksum == udp_sum
    ports = {pkt[UDP].sport for _, _, _, pkt in pkts}
    assert len(ports) == flows
    if size == "imix":
        assert sorted((l, w) for f, l, w, _ in pkts if f == 0) == [(64, 7), (594, 4), (1418, 1)]
    return len(pkts)


def main():
    n = 0
    for flows in (1, 2, 4, 8):
        for size in (64, 1400, "imix"):
            n += check(flows, size)
    rules = p.rules("west-red", 4)
    assert rules[3] == "ethtool -N west-red flow-type udp4 src-port 50003 action 3", rules
    try:
        p.frame_sizes(9000)
        raise AssertionError("a 9000-byte frame must be refused")
    except ValueError:
        pass
    print(f"trex profiles: {n} packets built and checked (1-8 flows; 64, 1400, imix)")


if __name__ == "__main__":
    main()
