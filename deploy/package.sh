#!/usr/bin/env bash
# Builds the Debian packages of the three services into target/debian/:
#   vmeter-agent-compute, vmeter-notification, vmeter-collector (<version>_<arch>.deb).
# Each holds its release binary in /usr/bin, its systemd unit (deploy/systemd), its
# commented config in /etc/vmeter (a conffile, mode 0640 root:vmeter: it holds passwords),
# and its docs. Installing one makes the `vmeter` system user (the agent's also joins the
# libvirt group), /var/lib/vmeter, and enables the unit where systemd runs (it does not
# start it: the shipped config needs its passwords first). docs/packages.md.
#
# Built with dpkg-deb from a staging tree (no cargo-deb to compile first: CI time).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
ARCH=$(dpkg --print-architecture)
OUT=target/debian
cargo build --release --locked -p agent-compute -p notification -p collector --bins
rm -rf "$OUT"
mkdir -p "$OUT"

# package <binary> <depends> <description>
package() {
  local bin=$1 depends=$2 description=$3
  local name=vmeter-$bin
  local root=$OUT/$name
  install -d "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system" "$root/etc/vmeter" \
    "$root/usr/share/doc/$name"
  install -m 0755 -s "target/release/$bin" "$root/usr/bin/$bin"
  install -m 0644 "deploy/systemd/$name.service" "$root/lib/systemd/system/$name.service"
  install -m 0640 "deploy/config/$bin.yaml" "$root/etc/vmeter/$bin.yaml"
  local conffiles="/etc/vmeter/$bin.yaml"
  if [ "$bin" = notification ]; then
    install -m 0640 pipeline.yaml "$root/etc/vmeter/pipeline.yaml"
    conffiles="$conffiles
/etc/vmeter/pipeline.yaml"
  fi
  install -m 0644 README.md "$root/usr/share/doc/$name/README.md"
  install -m 0644 docs/packages.md "$root/usr/share/doc/$name/packages.md"
  cat > "$root/usr/share/doc/$name/copyright" <<COPY
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: vmeter
License: Apache-2.0

Files: *
Copyright: the vmeter authors
License: Apache-2.0
 On Debian systems the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
COPY
  printf '%s\n' "$conffiles" > "$root/DEBIAN/conffiles"
  local size
  size=$(du -sk "$root" | cut -f1)
  cat > "$root/DEBIAN/control" <<CONTROL
Package: $name
Version: $VERSION
Architecture: $ARCH
Maintainer: vmeter developers <vmeter@localhost>
Section: admin
Priority: optional
Installed-Size: $size
Depends: $depends
Description: $description
 vmeter is a Ceilometer-style metering pipeline for KVM/libvirt clouds: agent-compute
 polls libvirt on every hypervisor, notification applies pipeline.yaml, collector stores
 the results in PostgreSQL and serves a Ceilometer v2 query API.
CONTROL
  cat > "$root/DEBIAN/postinst" <<POSTINST
#!/bin/sh
set -e
if [ "\$1" = configure ]; then
  getent group vmeter >/dev/null || addgroup --quiet --system vmeter
  getent passwd vmeter >/dev/null || adduser --quiet --system --ingroup vmeter \\
    --home /var/lib/vmeter --no-create-home --shell /usr/sbin/nologin vmeter
$( [ "$bin" = agent-compute ] && printf '%s\n' '  # The unit names the libvirt group (libvirt-daemon-system makes it on a hypervisor).' '  getent group libvirt >/dev/null || addgroup --quiet --system libvirt' '  adduser --quiet vmeter libvirt' )
  install -d -o vmeter -g vmeter -m 0750 /var/lib/vmeter
  # The configs and the telemetry secret hold secrets: readable by the service only.
  for f in /etc/vmeter/$bin.yaml $( [ "$bin" = notification ] && echo /etc/vmeter/pipeline.yaml ) /etc/vmeter/telemetry_secret; do
    if [ -e "\$f" ]; then chown root:vmeter "\$f"; chmod 0640 "\$f"; fi
  done
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable $name.service >/dev/null
    systemctl try-restart $name.service
  fi
fi
POSTINST
  cat > "$root/DEBIAN/prerm" <<PRERM
#!/bin/sh
set -e
if [ "\$1" = remove ] && [ -d /run/systemd/system ]; then
  systemctl stop $name.service || true
  systemctl disable $name.service >/dev/null || true
fi
PRERM
  cat > "$root/DEBIAN/postrm" <<POSTRM
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
POSTRM
  chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"
  dpkg-deb --root-owner-group --build "$root" "$OUT/${name}_${VERSION}_${ARCH}.deb" >/dev/null
  rm -rf "$root"
  echo "[package] $OUT/${name}_${VERSION}_${ARCH}.deb"
}

package agent-compute "adduser, libc6, libgcc-s1, libvirt0" \
  "vmeter agent: polls libvirt on a hypervisor and publishes VM samples"
package notification "adduser, libc6, libgcc-s1" \
  "vmeter notification: applies pipeline.yaml (rates, units, aggregation) to raw samples"
package collector "adduser, libc6, libgcc-s1" \
  "vmeter collector: stores samples in PostgreSQL and serves the Ceilometer v2 API"
