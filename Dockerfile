# syntax=docker/dockerfile:1
# iotagent-mqtt: multi-stage build. The builder compiles librdkafka (rdkafka's bundled build: bash, make, a C/C++
# compiler) and links the system OpenSSL (libssl-dev, pkg-config); the runtime image carries the binary, libssl3 and
# the CA bundle (zlib, libgcc and libc are part of debian:bookworm-slim).

FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends bash make gcc g++ libc6-dev pkg-config libssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /build

# Dependencies first, against placeholder sources: this layer is rebuilt only when Cargo.toml or Cargo.lock change.
# The manifest names the benchmarks, so they need placeholders too.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && for bench in webhooks k2v v2k; do echo 'fn main() {}' > "benches/$bench.rs"; done \
 && cargo build --release --locked --bin iotagent-mqtt \
 && rm -rf src benches

COPY src ./src
COPY benches ./benches
# COPY keeps the build context's modification times, which may be older than the placeholder build: touch, so that
# cargo rebuilds the crate itself.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin iotagent-mqtt \
 && install -D -m 0755 target/release/iotagent-mqtt /out/iotagent-mqtt

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 iotagent \
 && useradd --system --uid 10001 --gid iotagent --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin iotagent
COPY --from=build /out/iotagent-mqtt /usr/local/bin/iotagent-mqtt
# uid 10001: compose.yaml's PKI step gives this uid the service's private key (VerneMQ's is 10000).
USER 10001:10001
ENV IOTAGENT_LISTEN=0.0.0.0:8080
EXPOSE 8080
# GET /health/ready on the port of IOTAGENT_LISTEN: healthy once every configured dependency (Kafka, MQTT) is up.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 CMD ["iotagent-mqtt", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["iotagent-mqtt"]
