# imagegate container image.
#
#   docker build -t imagegate .
#   docker run --rm -p 8080:8080 -p 9090:9090 \
#     -v "$PWD/imagegate.toml:/etc/imagegate/imagegate.toml:ro" \
#     -v imagegate-data:/var/lib/imagegate \
#     -e PRIMARY_KEY_1=... -e IMAGEGATE_ADMIN_TOKEN=... \
#     imagegate
#
# Config: mount your TOML file at /etc/imagegate/imagegate.toml (start from
# config/imagegate.example.toml, also in the image at /usr/share/imagegate/). In it set
#   [storage]
#   path = "/var/lib/imagegate/imagegate.db"
# so the SQLite file lives on the /var/lib/imagegate volume and survives the container.
# Secrets (upstream keys, the admin token) never go in the file or the image: pass the env
# vars the config names (`-e`, or an env file), or mount files and use the config's `file`
# keys (e.g. /run/secrets/...).
#
# Listening: inside a container the gateway must listen on 0.0.0.0, not the config's
# loopback default. This image sets IMAGEGATE__SERVER__LISTEN=0.0.0.0:8080 and
# IMAGEGATE__SERVER__ADMIN_LISTEN=0.0.0.0:9090, which override the file's [server] listen
# and admin_listen; pass other values with `-e` to change them. Publish the admin port
# (health: GET /readyz, metrics: GET /metrics, dashboard: /admin/ on 9090) only to your
# orchestrator and monitoring, never to the internet. deploy/ has compose and Kubernetes files.
#
# Check a config without serving:  docker run --rm -v ...:/etc/imagegate/imagegate.toml:ro \
#   imagegate check-config --config /etc/imagegate/imagegate.toml
# Try it with no config or network:  docker run --rm -p 8080:8080 -p 9090:9090 imagegate \
#   demo --listen 0.0.0.0:8080 --admin-listen 0.0.0.0:9090

# ---- build -------------------------------------------------------------------------------
FROM rust:1-slim-bookworm AS builder
WORKDIR /src

# Dependencies first, in their own layer: it is rebuilt only when Cargo.toml or Cargo.lock
# change. Stub targets stand in for the crate's lib and bin (add a stub here for any target
# Cargo.toml declares explicitly, e.g. a [[bench]] or a build.rs).
COPY Cargo.toml Cargo.lock ./
RUN mkdir src benches \
    && echo '// dependency-caching stub' > src/lib.rs \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > benches/hot_path.rs \
    && cargo build --release --locked \
    && rm -rf src

# The crate itself. Drop the stubs' artifacts so cargo cannot take them as up to date.
COPY src ./src
COPY config ./config
RUN touch src/lib.rs src/main.rs \
    && rm -rf target/release/.fingerprint/imagegate-* target/release/deps/imagegate-* \
       target/release/deps/libimagegate-* \
    && cargo build --release --locked \
    && cp target/release/imagegate /usr/local/bin/imagegate

# ---- runtime -----------------------------------------------------------------------------
FROM debian:bookworm-slim

# ca-certificates: TLS to the upstream providers (rustls reads the system roots).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 imagegate \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/imagegate \
       --no-create-home --shell /usr/sbin/nologin imagegate \
    && mkdir -p /etc/imagegate /var/lib/imagegate /usr/share/imagegate \
    && chown imagegate:imagegate /var/lib/imagegate

COPY --from=builder /usr/local/bin/imagegate /usr/local/bin/imagegate
COPY config/imagegate.example.toml /usr/share/imagegate/imagegate.example.toml

# State (the SQLite file) lives here; the config's storage.path should point into it. It is
# also the working directory, so a relative storage.path lands on the volume too.
VOLUME ["/var/lib/imagegate"]
WORKDIR /var/lib/imagegate

ENV IMAGEGATE__SERVER__LISTEN=0.0.0.0:8080 \
    IMAGEGATE__SERVER__ADMIN_LISTEN=0.0.0.0:9090

USER 10001:10001
# 8080: the OpenAI-compatible API. 9090: admin (/healthz, /readyz, /metrics, /admin); keep it private.
EXPOSE 8080 9090
# SIGTERM (docker stop) makes /readyz answer 503 and drains in-flight requests for
# server.shutdown_grace_secs: give `docker stop -t` at least that long.
STOPSIGNAL SIGTERM

ENTRYPOINT ["imagegate"]
CMD ["serve", "--config", "/etc/imagegate/imagegate.toml"]
