"""TRex stateless profile for the seed lab (sunset — west == east — sunrise, TRex on sunset
sending on one port and receiving on the other), as the public per-CPU SA tests ran it: N UDP
flows, each pinned to one CPU of west by its UDP source port.

    start -f benches/trex/espada_pcpu.py -t flows=4,size=1400 -m 100%

Flow i leaves sunset with UDP source port BASE_PORT + i; west steers it to CPU/queue i with a
flow rule (print them with `python3 benches/trex/espada_pcpu.py --rules IFACE N`):

    ethtool -N west-red flow-type udp4 src-port 50000 action 0

so that with per-CPU SAs (RFC 9611; espada's workers or the kernel's pcpu-num SAs) flow i is
encrypted on CPU i's SA, and the throughput scales with the flows. `size` is the frame length
(64-1500 bytes without FCS) or `imix` (7:4:1 of 64, 594 and 1418-byte frames).

The packets are built with scapy (what TRex itself uses); the TRex classes are imported only
when TRex loads the profile, so `benches/trex/check.py` can build and check every packet
without TRex."""
import sys

SUNSET = "10.1.0.10"
SUNRISE = "10.2.0.10"
BASE_PORT = 50000
DST_PORT = 5201
IMIX = [(64, 7), (594, 4), (1418, 1)]


def frame_sizes(size):
    """[(frame length, weight)] for `size` (bytes or "imix")."""
    if str(size) == "imix":
        return IMIX
    n = int(size)
    if not 64 <= n <= 1500:
        raise ValueError(f"frame size must be 64-1500 bytes or imix, got {size}")
    return [(n, 1)]


def flow_packets(flows, size):
    """Per flow, its packets: [(flow, frame length, weight, scapy packet)]."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    out = []
    for i in range(int(flows)):
        for length, weight in frame_sizes(size):
            base = Ether() / IP(src=SUNSET, dst=SUNRISE, ttl=64) / UDP(sport=BASE_PORT + i, dport=DST_PORT)
            pad = max(0, length - len(base))
            out.append((i, length, weight, base / (b"\x00" * pad)))
    return out


def rules(iface, flows):
    """The ethtool flow rules that pin flow i to queue (CPU) i on west's red interface."""
    return [f"ethtool -N {iface} flow-type udp4 src-port {BASE_PORT + i} action {i}" for i in range(int(flows))]


class STLEspadaPcpu:
    """The TRex stateless profile: one continuous stream per flow and frame size, the rate
    split by IMIX weight."""

    def get_streams(self, direction=0, flows=4, size=1400, **kwargs):
        from trex_stl_lib.api import STLPktBuilder, STLStream, STLTXCont
        streams = []
        for flow, length, weight, pkt in flow_packets(flows, size):
            streams.append(STLStream(packet=STLPktBuilder(pkt=pkt), mode=STLTXCont(percentage=weight),
                                     name=f"flow{flow}-{length}"))
        return streams


def register():
    return STLEspadaPcpu()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--rules":
        print("\n".join(rules(sys.argv[2], sys.argv[3])))
    else:
        print(__doc__)
