#!/usr/bin/env bash
# Installs what nodetune needs on a Debian/Ubuntu host, only what is missing; re-running is fast
# and changes nothing. Usage: scripts/bootstrap.sh run|test|bench   (as root)
#   run:   python3-bpfcc, python3-venv, kernel headers if the host has none, the venv + package
#   test:  run + promtool (Debian `prometheus`) + test extras + what the stock-kernel guest needs
#          (qemu, busybox, kmod, cpio, Debian's generic kernel headers; the kernel image itself is
#          downloaded and unpacked into /var/cache/nodetune-test by tests/kernel_vm.py --prepare),
#          gcc (bench/lock_storm.c, which a lockstat test runs too)
#   bench: run + bpfcc-tools (runqlat-bpfcc) + linux-perf (perf bench) + gcc (the C storms)
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-run}
VENV=${VENV:-.venv}

pkgs=(python3-bpfcc python3-venv)
case "$what" in
  run) ;;
  test)
    pkgs+=(prometheus linux-perf irqbalance qemu-system-x86 busybox-static kmod cpio gcc libc6-dev)
    # The guest kernel is Debian's generic flavour (it has 9p and kprobes; -cloud has no 9p).
    if [ "$(. /etc/os-release && echo "$ID")" = debian ] && [ "$(dpkg --print-architecture)" = amd64 ]; then
      pkgs+=(linux-headers-amd64)
    fi ;;
  bench) pkgs+=(bpfcc-tools linux-perf gcc libc6-dev) ;;
  *) echo "usage: $0 run|test|bench" >&2; exit 2 ;;
esac

have_headers() {
  local r; r=$(uname -r)
  [ -d "/lib/modules/$r/build" ] || [ -f /sys/kernel/kheaders.tar.xz ] && return 0
  compgen -G "/usr/src/linux-headers-*" >/dev/null
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
  apt-get update -q
  final=()
  for p in "${missing[@]}"; do
    if [ "$p" = HEADERS ]; then
      # Headers for the running kernel if the distribution has them, else its cloud/generic set:
      # a mismatched set is enough for our probes (tracepoint fields + BTF offsets only).
      arch=$(dpkg --print-architecture)
      for cand in "linux-headers-$(uname -r)" "linux-headers-cloud-$arch" "linux-headers-$arch" linux-headers-generic; do
        if apt-cache show "$cand" >/dev/null 2>&1; then final+=("$cand"); break; fi
      done
    else
      final+=("$p")
    fi
  done
  # --no-install-recommends keeps the image small; policy-rc.d (if present) stops daemons starting.
  apt-get install -y -q --no-install-recommends "${final[@]}"
fi

if [ ! -x "$VENV/bin/python" ]; then
  # Debian's interpreter, so that Debian's bcc module is importable from the venv.
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
extras=""
[ "$what" = test ] && extras="[test]"
stamp="$VENV/.installed-$what-$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/pip" install -q --disable-pip-version-check -e ".$extras"
  touch "$stamp"
fi
"$VENV/bin/python" -c 'import bcc' 2>/dev/null || { echo "bootstrap: bcc not importable from $VENV" >&2; exit 1; }
if [ "$what" = test ] && dpkg-query -W -f='${Status}' linux-headers-amd64 2>/dev/null | grep -q 'install ok installed'; then
  "$VENV/bin/python" -m tests.kernel_vm --prepare
fi
