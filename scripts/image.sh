#!/usr/bin/env bash
# `make image`: builds localhost/nodetune:<version> and :latest without a daemon or a registry.
#   1. the base named by the Dockerfile's FROM (localhost/debian:bookworm-minbase), made by mmdebstrap
#      from Debian's packages and imported with buildah (from scratch + add + commit), only if missing;
#   2. `buildah bud --isolation chroot --pull=never --layers`: a second run reuses the base, and the
#      package layer too when the source did not change.
# Storage: containers storage with the vfs driver (what podman uses in `make e2e`).
# Prints the image's size at the end. Needs root; installs mmdebstrap and buildah (bootstrap.sh image).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${NODETUNE_SKIP_BOOTSTRAP:-}" = 1 ] || bash scripts/bootstrap.sh image >/dev/null

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' agent/__init__.py)
base=$(awk '$1 == "FROM" {print $2; exit}' Dockerfile)
image=${IMAGE:-localhost/nodetune}
B=(buildah --storage-driver vfs)

if ! "${B[@]}" inspect --type image "$base" >/dev/null 2>&1; then
  echo "image: making $base with mmdebstrap" >&2
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  # minbase: essential packages + apt. Docs, man pages and locales are left out of every later
  # install too (the dpkg options stay in the base), copyright files kept.
  mmdebstrap --quiet --variant=minbase \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --aptopt='APT::Install-Recommends "false"' \
    bookworm "$work/base.tar" \
    "deb http://deb.debian.org/debian bookworm main" \
    "deb http://deb.debian.org/debian bookworm-updates main" \
    "deb http://deb.debian.org/debian-security bookworm-security main" </dev/null
  ctr=$("${B[@]}" from scratch)
  "${B[@]}" add "$ctr" "$work/base.tar" / >/dev/null
  "${B[@]}" config --cmd /bin/bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --label org.opencontainers.image.title="debian bookworm (mmdebstrap minbase)" "$ctr"
  "${B[@]}" commit --rm --quiet "$ctr" "$base" >/dev/null
fi

# The build host's CA bundle for pip inside the build (a TLS-intercepting egress proxy); a bind
# mount of the RUN step only, nothing of it is committed.
ca=/etc/ssl/certs/ca-certificates.crt
ca_args=()
if [ -f "$ca" ]; then ca_args=(--volume "$ca:/run/build-ca.crt:ro" --build-arg PIP_CERT=/run/build-ca.crt); fi

previous=$("${B[@]}" images --quiet --no-trunc "$image:$version" 2>/dev/null | head -1 || true)
"${B[@]}" bud --quiet --isolation chroot --pull=never --layers \
  --build-arg VERSION="$version" \
  --build-arg REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
  "${ca_args[@]}" \
  -t "$image:$version" -t "$image:latest" . >/dev/null
# The image this build replaced keeps no tag: remove it (vfs stores every image whole).
current=$("${B[@]}" images --quiet --no-trunc "$image:$version" | head -1)
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
  "${B[@]}" rmi "$previous" >/dev/null 2>&1 || true
fi
size=$("${B[@]}" images --format '{{.Size}}' "$image:$version" | head -1)
echo "image: $image:$version ($image:latest), $size"
