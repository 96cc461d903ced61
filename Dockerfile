# imagegc: one static-ish binary on a distroless base.
# Build: docker build -t imagegc .
#
# Both bases are pinned by digest (the multi-platform index), so a rebuild uses the same bytes
# until someone moves the pin on purpose. To refresh, resolve the tags where a registry is
# reachable and replace the digests below:
#   docker buildx imagetools inspect rust:1.95-bookworm            (or: crane digest rust:1.95-bookworm)
#   docker buildx imagetools inspect gcr.io/distroless/cc-debian12 (or: crane digest ...)
FROM rust:1.95-bookworm@sha256:6258907abe69656e41cd992e0b705cdcfabcbbe3db374f92ed2d47121282d4a1 AS builder
# containerd-client and k8s-cri compile protobufs at build time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin imagegc

# distroless/cc carries glibc and libgcc, which the binary links; no shell, no package manager.
# One image for every role, non-root by default (UID/GID 65532, distroless' "nonroot"): the
# controller, the CLI and `helm test` need nothing more. Only the node agent runs as root,
# because containerd's socket is root-owned (0660 root:root) on stock nodes; the chart asks for
# that explicitly (agent.runAsUser: 0) and drops every capability.
# `make image` builds the same image without Docker (a test keeps the two equal).
FROM gcr.io/distroless/cc-debian12@sha256:aa0b7af67fa8211751ea6e00baa8373ba56cc1417ffc986ec9619bd0e1556b56
COPY --from=builder /src/target/release/imagegc /usr/local/bin/imagegc
USER 65532
ENTRYPOINT ["/usr/local/bin/imagegc"]
