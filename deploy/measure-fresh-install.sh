#!/usr/bin/env bash
# How long installing vmeter from its packages takes on a fresh Debian 12 userland: a
# minimal bookworm made by debootstrap in a scratch directory (nothing of this machine's
# packages in it), the packages of target/debian installed with apt, which fetches their
# dependencies from the Debian mirror. Prints the times; docs/packages.md has a run.
#
#   deploy/package.sh && deploy/measure-fresh-install.sh [scratch dir]
#
# Two installs, each in its own fresh chroot:
#   hypervisor  vmeter-agent-compute (+ libvirt0 and what it needs)
#   control     vmeter-notification, vmeter-collector, rabbitmq-server, postgresql-15
# Services are not started in the chroot (they would take this machine's ports); their
# start-up times are in the comments of deploy/setup.sh (RabbitMQ 5–11 s, PostgreSQL 2–3 s).
# Needs root and the network (about 250 MB of downloads). Not part of the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
SCRATCH=${1:-/var/tmp/vmeter-fresh}
MIRROR=${VMETER_MIRROR:-http://deb.debian.org/debian}
log() { printf '[fresh] %s\n' "$*" >&2; }
[ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }
ls target/debian/vmeter-*.deb >/dev/null || { log "no packages: run deploy/package.sh"; exit 1; }
command -v debootstrap >/dev/null || apt-get install -y -qq --no-install-recommends debootstrap >/dev/null

base="$SCRATCH/base"
if [ ! -x "$base/usr/bin/apt-get" ]; then
  log "debootstrap bookworm (minbase) into $base"
  rm -rf "$base"
  t=$(date +%s.%N)
  debootstrap --variant=minbase bookworm "$base" "$MIRROR" >/dev/null
  log "base system in $(echo "$(date +%s.%N) - $t" | bc) s"
fi

# /proc of a chroot is unmounted however the script ends (never rm -rf a mounted /proc).
unmount_all() { for m in "$SCRATCH"/*/proc; do mountpoint -q "$m" && umount "$m"; done; return 0; }
trap unmount_all EXIT
unmount_all

install_in_fresh() {  # name packages...
  local name=$1; shift
  local root="$SCRATCH/$name"
  rm -rf --one-file-system "$root"; cp -a "$base" "$root"
  printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"; chmod +x "$root/usr/sbin/policy-rc.d"
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  mkdir -p "$root/tmp/debs"; cp target/debian/vmeter-*.deb "$root/tmp/debs/"
  mount -t proc proc "$root/proc"
  local t0 t1 t2
  t0=$(date +%s.%N)
  chroot "$root" apt-get update -qq
  t1=$(date +%s.%N)
  chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  t2=$(date +%s.%N)
  umount "$root/proc"
  local size; size=$( (du -smx "$root" 2>/dev/null || true) | cut -f1)
  printf '%-11s apt-get update %5.1f s, install %5.1f s (downloads included), total %5.1f s; system %d MB\n' \
    "$name" "$(echo "$t1 - $t0" | bc)" "$(echo "$t2 - $t1" | bc)" "$(echo "$t2 - $t0" | bc)" "$size"
}

debs() { for p in "$@"; do (cd target/debian && ls "$p"_*.deb) | sed 's|^|/tmp/debs/|'; done; }
# shellcheck disable=SC2046
install_in_fresh hypervisor $(debs vmeter-agent-compute)
# shellcheck disable=SC2046
install_in_fresh control $(debs vmeter-notification vmeter-collector) rabbitmq-server postgresql-15
# Installed, runnable, and the user and state directory made by the packages' scripts.
for b in agent-compute:hypervisor notification:control collector:control; do
  bin=${b%%:*} root=$SCRATCH/${b##*:}
  chroot "$root" "/usr/bin/$bin" --help >/dev/null
  chroot "$root" id vmeter >/dev/null
  chroot "$root" test -d /var/lib/vmeter
  echo "$bin: installed and runs in $root"
done
