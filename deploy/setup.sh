#!/usr/bin/env bash
# Install and start everything vmeter needs on one Debian 12 host, without systemd:
# RabbitMQ (vhost + permissions), PostgreSQL 15 (role + database), libvirt client libraries.
#
# Idempotent and non-interactive; run as root. Safe to re-run: it only installs what is
# missing and only starts what is not running. Measured facts behind each step:
# docs/operations.md and the comments below.
#
# Environment (all optional):
#   VMETER_DB_USER / VMETER_DB_PASS / VMETER_DB_NAME   PostgreSQL role/database (vmeter/vmeter/vmeter)
#   VMETER_MQ_VHOST                                    RabbitMQ vhost (/vmeter); user guest (loopback only)
#   WITH_LIBVIRTD=1                                    also start libvirtd + virtlogd (for qemu:///system)
#   WITH_QEMU=1                                        also unpack qemu-system-x86 into /opt/qemu
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

PG_VER=15 PG_CLUSTER=main PG_PORT=5432
DB_USER=${VMETER_DB_USER:-vmeter} DB_PASS=${VMETER_DB_PASS:-vmeter} DB_NAME=${VMETER_DB_NAME:-vmeter}
MQ_VHOST=${VMETER_MQ_VHOST:-/vmeter}

log() { printf '[setup] %s\n' "$*" >&2; }
[ "$(id -u)" = 0 ] || { log "must run as root (apt-get, pg_ctlcluster, rabbitmq-server)"; exit 1; }

# ---- 1. packages. --no-install-recommends matters: with recommends, libvirt-daemon pulls
#         qemu-system-x86 7.2, which removes a newer preinstalled qemu-utils (214 MB instead of 40).
# gcc + libc6-dev: mimalloc (the services' allocator) is C built by cargo.
PKGS="rabbitmq-server libvirt-dev libvirt-clients pkg-config gcc libc6-dev postgresql-15 postgresql-client-15 ca-certificates"
[ "${WITH_LIBVIRTD:-0}" = 1 ] && PKGS="$PKGS libvirt-daemon"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
  log "installing:$missing"
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# ---- 2. PostgreSQL 15/main (pg_ctlcluster; apt never starts services here: policy-rc.d says 101)
pg_lsclusters -h | awk '{print $1"/"$2}' | grep -qx "$PG_VER/$PG_CLUSTER" \
  || pg_createcluster "$PG_VER" "$PG_CLUSTER" -p "$PG_PORT" >/dev/null
if ! pg_lsclusters -h | awk -v v="$PG_VER" -v c="$PG_CLUSTER" '$1==v && $2==c {print $4}' | grep -q online; then
  log "starting PostgreSQL $PG_VER/$PG_CLUSTER"
  pg_ctlcluster "$PG_VER" "$PG_CLUSTER" start
fi
for _ in $(seq 1 100); do pg_isready -q -h 127.0.0.1 -p "$PG_PORT" && break; sleep 0.1; done
pg_isready -q -h 127.0.0.1 -p "$PG_PORT" || { log "PostgreSQL did not become ready"; exit 1; }
runuser -u postgres -- psql -q -p "$PG_PORT" -v ON_ERROR_STOP=1 >/dev/null <<SQL
SELECT 'CREATE ROLE $DB_USER LOGIN CREATEDB PASSWORD ''$DB_PASS'''
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '$DB_USER') \gexec
SELECT 'CREATE DATABASE $DB_NAME OWNER $DB_USER'
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = '$DB_NAME') \gexec
SQL

# ---- 3. RabbitMQ (rabbitmq-server -detached; ready after 5-11 s depending on load)
mq_running() { rabbitmq-diagnostics -q check_running >/dev/null 2>&1; }
if ! mq_running; then
  log "starting RabbitMQ"
  rabbitmq-server -detached
  # Bare `rabbitmqctl await_startup` fails before the node registers with epmd: poll instead.
  for _ in $(seq 1 180); do mq_running && break; sleep 0.5; done
  mq_running || { log "RabbitMQ did not become ready; see /var/log/rabbitmq/"; exit 1; }
fi
rabbitmqctl -q add_vhost "$MQ_VHOST" >/dev/null 2>&1 || true   # rc 0 when it exists on 3.10; guard anyway
rabbitmqctl -q set_permissions -p "$MQ_VHOST" guest '.*' '.*' '.*' >/dev/null

# ---- 4. libvirt: test:///… URIs run in-process inside libvirt.so; nothing to start.
virsh -q -c test:///default list --name >/dev/null

# ---- 5. optional libvirtd + virtlogd without systemd (for qemu:///system)
if [ "${WITH_LIBVIRTD:-0}" = 1 ]; then
  mkdir -p /run/libvirt /var/log/libvirt /var/lib/libvirt /var/cache/libvirt
  # The QEMU driver refuses to initialise without this user (libvirt-daemon-system would
  # create it, but that package upgrades systemd).
  getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
  getent passwd libvirt-qemu >/dev/null || useradd -r -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
  [ -f /etc/libvirt/qemu.conf ] && grep -q '^security_driver' /etc/libvirt/qemu.conf \
    || printf 'user = "root"\ngroup = "root"\ndynamic_ownership = 0\nsecurity_driver = "none"\n' > /etc/libvirt/qemu.conf
  { [ -S /run/libvirt/virtlogd-sock ] && pgrep -x virtlogd >/dev/null; } || virtlogd -d -p /run/libvirt/virtlogd.pid
  if ! virsh -q -c qemu:///system list --name >/dev/null 2>&1; then
    libvirtd -d -p /run/libvirt/libvirtd.pid
    for _ in $(seq 1 50); do virsh -q -c qemu:///system list --name >/dev/null 2>&1 && break; sleep 0.2; done
  fi
fi

# ---- 6. optional qemu-system-x86 7.2 in a private prefix (keeps the machine's qemu-utils)
QEMU_ROOT=${QEMU_ROOT:-/opt/qemu}
if [ "${WITH_QEMU:-0}" = 1 ] && [ ! -x "$QEMU_ROOT/usr/bin/qemu-system-x86_64" ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends libcapstone4 libfdt1 libpmem1 librdmacm1 libibverbs1 libslirp0 libvdeplug2 >/dev/null
  tmp=$(mktemp -d); (cd "$tmp" && apt-get download -qq qemu-system-x86 qemu-system-common qemu-system-data seabios ipxe-qemu)
  mkdir -p "$QEMU_ROOT"; for d in "$tmp"/*.deb; do dpkg -x "$d" "$QEMU_ROOT"; done; rm -rf "$tmp"
fi

log "ready: postgres://$DB_USER:***@127.0.0.1:$PG_PORT/$DB_NAME  amqp://guest@127.0.0.1:5672/$MQ_VHOST"
