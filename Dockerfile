# syntax=docker/dockerfile:1
# The registry-proxy image: one binary, every role (README.md "Install on a cluster").
#  - the installer DaemonSet runs `registry-proxy node install` (privileged, as root): it copies
#    /opt/registry-proxy (the self-contained bundle: bin/ and the libraries it needs in lib/)
#    onto each host, where the daemon runs under systemd, never in a pod;
#  - the webhook Deployment runs `registry-proxy webhook` as the non-root user below.
#
#   docker build -t ghcr.io/ketches/registry-proxy:0.1.0 .
#
# The tag is the CMake project version (project(... VERSION ...) in CMakeLists.txt);
# .github/workflows/image.yml builds and publishes it for a tag v<version>.

# --- build: Debian 12 packages only, as scripts/run.sh and scripts/test.sh use -------------
FROM debian:12 AS build
ARG DEBIAN_FRONTEND=noninteractive
WORKDIR /src
# The build dependencies come from the one list the scripts use (scripts/deps.sh: with patchelf,
# which scripts/bundle.sh, run by `--target dist`, sets the bundle's RUNPATH with).
COPY scripts/deps.sh scripts/deps.sh
RUN bash -c 'source scripts/deps.sh && rp_install_deps build' && \
    rm -rf /var/lib/apt/lists/*
# Only what the build reads (tests/manifests checks that CMake configures from these alone).
COPY CMakeLists.txt ./
COPY cmake cmake
COPY config config
COPY daemon daemon
COPY packaging packaging
COPY proto proto
COPY scripts scripts
# The binary carries the systemd unit it installs on a host (compiled in from systemd/).
COPY systemd systemd
RUN cmake -S . -B /build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DRP_BUILD_TESTS=OFF -DRP_BUILD_BENCH=OFF && \
    cmake --build /build -j "$(nproc)" --target dist && \
    /build/dist/opt/registry-proxy/bin/registry-proxy version

# --- runtime ----------------------------------------------------------------------------------
FROM debian:12-slim
LABEL org.opencontainers.image.title="registry-proxy" \
      org.opencontainers.image.description="Pull public container images through mirrors: CRI shim installer and admission webhook" \
      org.opencontainers.image.source="https://github.com/ketches/registry-proxy"
COPY --from=build /build/dist/opt/registry-proxy /opt/registry-proxy
# `registry-proxy` on PATH (the uninstaller's shell and the probes call it by name). The bundle
# needs nothing from this image but glibc; util-linux (nsenter) is in the base image.
RUN ln -s /opt/registry-proxy/bin/registry-proxy /usr/local/bin/registry-proxy && \
    useradd --system --uid 65532 --user-group --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin registry-proxy && \
    registry-proxy version
# The webhook runs as this user (its Deployment also sets runAsUser 65532, runAsNonRoot); the
# installer and uninstaller DaemonSets run as root, privileged.
USER 65532:65532
ENTRYPOINT ["/opt/registry-proxy/bin/registry-proxy"]
CMD ["--help"]
