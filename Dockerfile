# syntax=docker/dockerfile:1
# leasehold server image.
#   docker build -t leasehold .
#   docker run --rm -p 50051:50051 -v "$PWD/certs:/certs:ro" \
#     -e DATABASE_URL=postgres://... -e LEASEHOLD_AUTH=required \
#     -e LEASEHOLD_TLS_CERT=/certs/server.pem -e LEASEHOLD_TLS_KEY=/certs/server.key leasehold
# It listens on all interfaces, so it refuses to start without TLS and
# tokens unless told LEASEHOLD_INSECURE=true (a trial on a private network).
# (docker-compose.yml runs it the secure way together with PostgreSQL.)

# --- build -------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src
# build.rs compiles the protos with protox, so no protoc is needed; the
# migrations are embedded into the binary at compile time.
COPY . .
# The cache mounts keep the crate registry and target/ between builds; the
# binary is copied out of target/ within the same step because a cache mount
# is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
 && install -D -m 0755 target/release/leasehold /out/leasehold

# --- runtime -----------------------------------------------------------------
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 leasehold \
 && useradd --system --uid 10001 --gid leasehold --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin leasehold
COPY --from=builder /out/leasehold /usr/local/bin/leasehold
USER 10001:10001
ENV LEASEHOLD_LISTEN=0.0.0.0:50051
EXPOSE 50051 9187
ENTRYPOINT ["leasehold"]
CMD ["serve"]
