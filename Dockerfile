# Multi-stage build of the espada binary.
#   docker build -t espada .
#   docker run --rm espada demo
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin espada

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends iproute2 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/espada /usr/local/bin/espada
COPY configs /etc/espada
# Sequence-number state (see "Nonces" in the README): keep this volume across containers. A
# gateway with static keys refuses to start on an empty one unless told its keys are new:
#   docker run -v espada-state:/var/lib/espada ... espada run -c /etc/espada/west.toml --new-keys
# (the first start only; later starts resume above what the keys already sent).
VOLUME /var/lib/espada
ENTRYPOINT ["/usr/local/bin/espada"]
CMD ["demo"]
