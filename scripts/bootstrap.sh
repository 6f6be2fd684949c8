#!/usr/bin/env bash
# Installs what nodetune needs on a Debian/Ubuntu host, only what is missing; re-running is fast
# and changes nothing. Usage: scripts/bootstrap.sh run|test|bench|image|e2e   (as root)
#   run:   python3-bpfcc, python3-venv, kernel headers if the host has none, the venv + package
#   test:  run + promtool (Debian `prometheus`) + test extras + what the stock-kernel guest needs
#          (qemu, busybox, kmod, cpio, Debian's generic kernel headers, ipvsadm for the kmod
#          tests there; the kernel image itself is downloaded and unpacked into
#          /var/cache/nodetune-test by tests/kernel_vm.py --prepare),
#          gcc (bench/lock_storm.c, which a lockstat test runs too), tmux (doctor's terminal test)
#   bench: run + bpfcc-tools (runqlat-bpfcc) + linux-perf (perf bench) + gcc (the C storms) +
#          redis-server/redis-tools + prometheus-node-exporter (peers) + matplotlib in the venv (plots)
#   image: run + mmdebstrap (the bookworm base from Debian's packages) + buildah (builds the
#          Dockerfile without a daemon); used by `make image`
#   e2e:   image + test extras + podman/runc/catatonit (`podman kube play` of the DaemonSet's pod template),
#          prometheus + prometheus-alertmanager (real scrape, rules and routing), iproute2, openssl
# The Dockerfile runs `run` mode with VENV=/opt/nodetune/venv NODETUNE_HEADERS=files: one recipe for
# the host and the image.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-run}
VENV=${VENV:-.venv}

pkgs=(python3-bpfcc python3-venv)
case "$what" in
  run) ;;
  test)
    pkgs+=(prometheus linux-perf irqbalance ipvsadm qemu-system-x86 busybox-static kmod cpio gcc libc6-dev)
    # tmux: tests/agent/doctor checks nodetune doctor's rendering in a real terminal (capture-pane)
    pkgs+=(tmux)
    # The guest kernel is Debian's generic flavour (it has 9p and kprobes; -cloud has no 9p).
    if [ "$(. /etc/os-release && echo "$ID")" = debian ] && [ "$(dpkg --print-architecture)" = amd64 ]; then
      pkgs+=(linux-headers-amd64)
    fi ;;
  # bench: redis (redis-benchmark against a real server), the node exporter (the peer's own CPU and
  # RSS); matplotlib for bench/report.py's plots comes from PyPI below (Debian's is built against
  # numpy 1, the venv has numpy 2)
  bench) pkgs+=(bpfcc-tools linux-perf gcc libc6-dev redis-server redis-tools prometheus-node-exporter) ;;
  image) pkgs+=(mmdebstrap buildah) ;;
  e2e) pkgs+=(mmdebstrap buildah podman runc catatonit prometheus prometheus-alertmanager iproute2 openssl) ;;
  *) echo "usage: $0 run|test|bench|image|e2e" >&2; exit 2 ;;
esac

have_headers() {
  local r; r=$(uname -r)
  # The image build looks only at its own /usr/src: the build host's kernel is not the nodes'.
  [ "${NODETUNE_HEADERS:-}" = files ] && { compgen -G "/usr/src/linux-headers-*" >/dev/null; return; }
  [ -d "/lib/modules/$r/build" ] || [ -f /sys/kernel/kheaders.tar.xz ] && return 0
  compgen -G "/usr/src/linux-headers-*" >/dev/null
}

# NODETUNE_HEADERS=files (the image build): only the header trees, unpacked under /usr/src without
# their package dependencies. A headers package depends on the kernel's compiler (gcc-12) and kbuild,
# which BCC never runs: it compiles with the libclang inside libbpfcc and reads include/ and arch/.
headers_files() {
  local pkg=$1 dep tmp
  # The metapackage (linux-headers-cloud-amd64) names the versioned set, which names its -common part.
  dep=$(apt-cache depends "$pkg" | awk '$1 == "Depends:" && $2 ~ /^linux-headers-[0-9]/ {print $2; exit}')
  [ -n "$dep" ] && pkg=$dep
  local pkgs=("$pkg")
  dep=$(apt-cache depends "$pkg" | awk '$1 == "Depends:" && $2 ~ /^linux-headers-.*-common$/ {print $2; exit}')
  [ -n "$dep" ] && pkgs+=("$dep")
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get -o DPkg::Lock::Timeout=900 download -q "${pkgs[@]}" && for deb in ./*.deb; do dpkg-deb -x "$deb" root; done)
  mkdir -p /usr/src
  cp -a "$tmp"/root/usr/src/. /usr/src/
  rm -rf "$tmp"
}

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ! have_headers; then
  missing+=(HEADERS)
fi

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "bootstrap: need root to install: ${missing[*]}" >&2; exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=900 update -q
  final=()
  for p in "${missing[@]}"; do
    if [ "$p" = HEADERS ]; then
      # Headers for the running kernel if the distribution has them, else its cloud/generic set:
      # a mismatched set is enough for our probes (tracepoint fields + BTF offsets only).
      arch=$(dpkg --print-architecture)
      for cand in "linux-headers-$(uname -r)" "linux-headers-cloud-$arch" "linux-headers-$arch" linux-headers-generic; do
        if apt-cache show "$cand" >/dev/null 2>&1; then
          if [ "${NODETUNE_HEADERS:-}" = files ]; then headers_files "$cand"; else final+=("$cand"); fi
          break
        fi
      done
    else
      final+=("$p")
    fi
  done
  # --no-install-recommends keeps the image small; policy-rc.d (if present) stops daemons starting.
  apt-get -o DPkg::Lock::Timeout=900 install -y -q --no-install-recommends "${final[@]}"
fi

if [ ! -x "$VENV/bin/python" ]; then
  # Debian's interpreter, so that Debian's bcc module is importable from the venv.
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
extras=""
case "$what" in test | e2e) extras="[test]" ;; esac
stamp="$VENV/.installed-$what-$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/pip" install -q --disable-pip-version-check -e ".$extras"
  touch "$stamp"
fi
if [ "$what" = bench ] && ! "$VENV/bin/python" -c 'import matplotlib' 2>/dev/null; then
  "$VENV/bin/pip" install -q --disable-pip-version-check "matplotlib==3.10.9"
fi
"$VENV/bin/python" -c 'import bcc' 2>/dev/null || { echo "bootstrap: bcc not importable from $VENV" >&2; exit 1; }
if [ "$what" = test ] && dpkg-query -W -f='${Status}' linux-headers-amd64 2>/dev/null | grep -q 'install ok installed'; then
  "$VENV/bin/python" -m tests.kernel_vm --prepare
fi
