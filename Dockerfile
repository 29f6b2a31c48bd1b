# syntax=docker/dockerfile:1
# The operator image: `gpu-trainer run` as a non-root user on a distroless base.
#
# NOT BUILT IN CI: the CI machine has no Docker engine, so nothing checks this file automatically.
# Build it by hand:
#   docker build -t gpu-trainer:dev .
#   docker run --rm gpu-trainer:dev --version
#
# The binary is at /usr/local/bin/gpu-trainer; the tool registry (config/tools) is at
# /opt/gpu-trainer/config/tools, which is where the binary looks by default (`config/tools` under
# the working directory) and what GPU_TRAINER_TOOLS_DIR names. Mount other tools over it, or point
# `--tools-dir` elsewhere.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The registry and the target folder live in cache mounts that survive between builds; cache
# mounts are not part of the image, so the binary is copied out of the target folder.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin gpu-trainer \
    && install -D -m 0755 target/release/gpu-trainer /out/gpu-trainer

# glibc and libgcc, nothing else: no shell, no package manager. The `nonroot` user is 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/gpu-trainer /usr/local/bin/gpu-trainer
COPY config/tools /opt/gpu-trainer/config/tools
WORKDIR /opt/gpu-trainer
ENV GPU_TRAINER_TOOLS_DIR=/opt/gpu-trainer/config/tools
USER 65532:65532
# /healthz, /readyz and /metrics (`--metrics-addr`, default 0.0.0.0:8080).
EXPOSE 8080
ENTRYPOINT ["gpu-trainer"]
CMD ["run"]
