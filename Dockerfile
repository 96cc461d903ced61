# imagegc: one static-ish binary on a distroless base.
# Build: docker build -t imagegc .
FROM rust:1.95-bookworm AS builder
# containerd-client and k8s-cri compile protobufs at build time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin imagegc

# distroless/cc carries glibc and libgcc, which the binary links; no shell, no package manager.
# One image for every role. Its default user is root because the node agent must open
# containerd's socket, which is root-owned (0660 root:root) on stock nodes; the chart runs the
# agent as root with every capability dropped, and the controller as UID 65532 (non-root).
FROM gcr.io/distroless/cc-debian12
COPY --from=builder /src/target/release/imagegc /usr/local/bin/imagegc
ENTRYPOINT ["/usr/local/bin/imagegc"]
