# The one `lockstep` binary in a small non-root image (CPU training).
#   docker build -t lockstep:0.1.0 .
# CUDA variant (GPU training and NCCL): build FROM nvidia/cuda:13.0.0-devel-ubuntu24.04 with
# `cargo build --release --locked --features cuda -p lockstep`, and run FROM
# nvidia/cuda:13.0.0-runtime-ubuntu24.04 with libnccl2 installed (NCCL is loaded at run time).
# Not built in this repository's CI: there is no image registry here.

FROM rust:1.92-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p lockstep \
 && install -D -m 0755 target/release/lockstep /out/usr/local/bin/lockstep \
 && mkdir -p /out/usr/share/lockstep \
 && cp -r configs /out/usr/share/lockstep/configs

# glibc, CA certificates and a non-root user (65532), nothing else.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ /
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/lockstep"]
