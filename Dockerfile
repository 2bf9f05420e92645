# Multi-stage build of the espada binary, with intel-ipsec-mb (the fastest AES-GCM backend) and
# DPDK ports built in.
#   docker build --build-arg ESPADA_GIT_HASH=$(git rev-parse --short=12 HEAD) -t espada .
#   docker run --rm espada demo
# A gateway needs its interfaces and the capabilities the ports use, and its sequence state on a
# volume (see "Nonces" in the README):
#   docker run --network host --cap-add NET_RAW --cap-add NET_ADMIN --cap-add IPC_LOCK \
#     -v espada-state:/var/lib/espada -v /etc/espada:/etc/espada:ro \
#     espada run -c /etc/espada/west.toml --state-dir /var/lib/espada
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends \
        libipsec-mb-dev libdpdk-dev pkg-config clang libclang-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# .git is not in the build context (.dockerignore): the revision comes as a build argument.
ARG ESPADA_GIT_HASH=unknown
ENV ESPADA_GIT_HASH=${ESPADA_GIT_HASH}
RUN cargo build --release --locked --bin espada --features ipsec-mb,dpdk

FROM debian:bookworm-slim
# iproute2 and ethtool: the lab and `espada pin`; libipsec-mb1 and DPDK's libraries: what the
# binary links.
RUN apt-get update && apt-get install -y --no-install-recommends \
        iproute2 ethtool ca-certificates libipsec-mb1 dpdk \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/espada /usr/local/bin/espada
COPY configs /usr/share/espada/examples
RUN mkdir -p /etc/espada && cp /usr/share/espada/examples/*.toml /etc/espada/
# Sequence-number state (see "Nonces" in the README): keep this volume across containers. A
# gateway with static keys refuses to start on an empty one unless told its keys are new:
#   docker run -v espada-state:/var/lib/espada ... espada run -c /etc/espada/west.toml --new-keys
# (the first start only; later starts resume above what the keys already sent).
VOLUME /var/lib/espada
ENTRYPOINT ["/usr/local/bin/espada"]
CMD ["demo"]
