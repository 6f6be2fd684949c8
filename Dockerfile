# nodetune agent image: Debian bookworm, BCC from Debian, the package installed by
# scripts/bootstrap.sh (the same recipe `make run` uses), a fallback kernel header set in /usr/src.
#
# Built by `make image` without a daemon or a registry (scripts/image.sh): the base named in FROM is
# made locally by mmdebstrap from Debian's packages (minbase variant) and tagged with this name.
FROM localhost/debian:bookworm-minbase

ARG VERSION=0.0.0
ARG REVISION=unknown
# Where pip finds the CA bundle during the build (make image mounts the build host's bundle there, so
# that a TLS-intercepting egress proxy works); nothing of it stays in the image.
ARG PIP_CERT=

LABEL org.opencontainers.image.title="nodetune" \
      org.opencontainers.image.description="Kubernetes node agent: eBPF latency signals per workload, node tuning, Prometheus metrics" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="localhost/debian:bookworm-minbase" \
      org.opencontainers.image.revision="${REVISION}"

COPY . /opt/nodetune/src
WORKDIR /opt/nodetune/src

# One RUN: the apt lists, pip's cache and the bytecode of the build never reach a layer.
# NODETUNE_HEADERS=files: the fallback header set as files only (no gcc, no kbuild; see bootstrap.sh).
RUN set -eu; \
    export DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_CERT="${PIP_CERT}" \
           VENV=/opt/nodetune/venv NODETUNE_HEADERS=files; \
    bash scripts/bootstrap.sh run; \
    apt-get clean; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log /root/.cache /tmp/*; \
    /opt/nodetune/venv/bin/nodetune --version

ENV PATH=/opt/nodetune/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# /tmp and the header cache are written at run time: the DaemonSet mounts an in-memory emptyDir
# (the root filesystem is read-only there).
WORKDIR /
ENTRYPOINT ["nodetune", "run"]
