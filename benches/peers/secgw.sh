#!/usr/bin/env bash
# espada beside DPDK's own ipsec-secgw, one core each, same harness, interleaved.
#
#   benches/peers/secgw.sh [--runs N] [--sizes "64 1400"] [--seconds S] [--out DIR]
#
# Builds ipsec-secgw once from Debian's dpdk-doc example sources into a cache directory outside
# the repository (ESPADA_CACHE, default ~/.cache/espada), then for each inner packet size and
# direction runs, in turn, ipsec-secgw (one lcore, AES-128-GCM through intel-ipsec-mb's
# crypto_aesni_gcm PMD; a net_pcap port replaying a 256-packet capture forever into a net_null
# port) and `espada bench --layout one-core` (one pinned core; crypto backend `auto` as a
# gateway on this CPU picks it, `--backend NAME` to fix one; a generator or a 256-frame ESP replay into a null port or a checking sink). It writes one
# Markdown table (and JSON) with the median of the runs, their spread, and espada ÷ ipsec-secgw.
# Needs root for apt (dpdk-doc libdpdk-dev libipsec-mb-dev pkg-config) unless they are present.
set -euo pipefail
cd "$(dirname "$0")/../.."
CACHE="${ESPADA_CACHE:-$HOME/.cache/espada}"
SRC="$CACHE/secgw-src"
BIN="$SRC/build/ipsec-secgw"

need=()
[ -d /usr/share/dpdk/examples/ipsec-secgw ] || need+=(dpdk-doc)
pkg-config --exists libdpdk 2>/dev/null || need+=(libdpdk-dev dpdk pkg-config)
[ -f /usr/include/intel-ipsec-mb.h ] || need+=(libipsec-mb-dev)
if [ ${#need[@]} -gt 0 ]; then
    echo "== installing ${need[*]} (apt)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
python3 -c 'import scapy.all' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check 'scapy==2.8.0'

if [ ! -x "$BIN" ]; then
    echo "== building ipsec-secgw from /usr/share/dpdk/examples into $SRC" >&2
    rm -rf "$SRC"; mkdir -p "$CACHE"
    cp -r /usr/share/dpdk/examples/ipsec-secgw "$SRC"
    # Virtual PMDs have no RX checksum offload: the port configuration must not ask for it.
    sed -i 's/\.offloads = RTE_ETH_RX_OFFLOAD_CHECKSUM,/.offloads = 0,/' "$SRC/ipsec-secgw.c"
    make -C "$SRC" -j"$(nproc)" >/dev/null
fi

ESPADA="${ESPADA_BIN:-target/release/espada}"
if [ -z "${ESPADA_BIN:-}" ]; then
    echo "== building espada (release, intel-ipsec-mb)" >&2
    cargo build --release --quiet --features ipsec-mb --bin espada
fi
exec python3 benches/peers/secgw_compare.py --secgw "$BIN" --espada "$ESPADA" "$@"
