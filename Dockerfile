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
ENTRYPOINT ["/usr/local/bin/espada"]
CMD ["demo"]
