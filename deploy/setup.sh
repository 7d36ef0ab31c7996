#!/usr/bin/env bash
# Install and start everything vmeter needs on one Debian 12 host, without systemd:
# RabbitMQ (vhost, users, permissions), PostgreSQL 15 (role + database), libvirt client
# libraries.
#
# Idempotent and non-interactive; run as root. Safe to re-run: it only installs what is
# missing and only starts what is not running. Measured facts behind each step: the
# comments below.
#
# Credentials are random, made on the first run and kept in $VMETER_CREDENTIALS
# (/etc/vmeter/credentials.env, mode 0600): the PostgreSQL role's password, one RabbitMQ
# user per service with only the permissions it needs, an admin user of the vhost
# (operators, the test suite) and the telemetry secret (also alone in
# /etc/vmeter/telemetry_secret, which the shipped configs read). RabbitMQ's guest gets no
# access to the vhost. docs/security.md says who may do what.
#
# Environment (all optional):
#   VMETER_CREDENTIALS        where the credentials live (/etc/vmeter/credentials.env)
#   VMETER_DB_NAME            PostgreSQL database (vmeter; the role is vmeter)
#   VMETER_MQ_VHOST           RabbitMQ vhost (/vmeter)
#   WITH_LIBVIRTD=1           also start libvirtd + virtlogd (for qemu:///system)
#   WITH_QEMU=1               also unpack qemu-system-x86 into /opt/qemu
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

PG_VER=15 PG_CLUSTER=main PG_PORT=5432
DB_USER=vmeter DB_NAME=${VMETER_DB_NAME:-vmeter}
MQ_VHOST=${VMETER_MQ_VHOST:-/vmeter}
CRED=${VMETER_CREDENTIALS:-/etc/vmeter/credentials.env}

log() { printf '[setup] %s\n' "$*" >&2; }
[ "$(id -u)" = 0 ] || { log "must run as root (apt-get, pg_ctlcluster, rabbitmq-server)"; exit 1; }

# ---- 0. credentials: made once, random, private (never a fixed password)
mkdir -p "$(dirname "$CRED")"
if [ ! -s "$CRED" ]; then
  gen() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
  (umask 077; cat > "$CRED" <<EOF
# vmeter credentials, made by deploy/setup.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ). Keep private (mode 0600).
DB_USER=$DB_USER
DB_PASSWORD=$(gen)
MQ_VHOST=$MQ_VHOST
MQ_AGENT_USER=vmeter-agent
MQ_AGENT_PASSWORD=$(gen)
MQ_NOTIFICATION_USER=vmeter-notification
MQ_NOTIFICATION_PASSWORD=$(gen)
MQ_COLLECTOR_USER=vmeter-collector
MQ_COLLECTOR_PASSWORD=$(gen)
MQ_ADMIN_USER=vmeter-admin
MQ_ADMIN_PASSWORD=$(gen)
TELEMETRY_SECRET=$(gen)
EOF
  )
  log "credentials made: $CRED"
fi
chmod 600 "$CRED"
# shellcheck disable=SC1090
. "$CRED"
(umask 077; printf '%s' "$TELEMETRY_SECRET" > "$(dirname "$CRED")/telemetry_secret")

# ---- 1. packages. --no-install-recommends matters: with recommends, libvirt-daemon pulls
#         qemu-system-x86 7.2, which removes a newer preinstalled qemu-utils (214 MB instead of 40).
# gcc + libc6-dev: mimalloc (the services' allocator) is C built by cargo.
PKGS="rabbitmq-server libvirt-dev libvirt-clients pkg-config gcc libc6-dev postgresql-15 postgresql-client-15 ca-certificates openssl"
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
SELECT 'CREATE ROLE $DB_USER LOGIN CREATEDB'
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '$DB_USER') \gexec
ALTER ROLE $DB_USER PASSWORD '$DB_PASSWORD';
SELECT 'CREATE DATABASE $DB_NAME OWNER $DB_USER'
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = '$DB_NAME') \gexec
SQL

# ---- 3. RabbitMQ (rabbitmq-server -detached; ready after 5-11 s depending on load)
# AMQP over TLS on 5671 besides plain AMQP on 5672 (loopback tests, the services on this
# host). The CA is made here, for the demo and the tests (docs/multi-host.md: use your own):
# /etc/vmeter/tls/ca.pem is what clients trust (broker.tls_ca_file), the broker's
# certificate is for localhost and 127.0.0.1.
TLS_DIR=/etc/vmeter/tls
install -d -m 0755 "$TLS_DIR"
if [ ! -s "$TLS_DIR/ca.pem" ]; then
  log "making the demo CA ($TLS_DIR)"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=vmeter demo CA" \
    -keyout "$TLS_DIR/ca.key" -out "$TLS_DIR/ca.pem" 2>/dev/null
  chmod 0600 "$TLS_DIR/ca.key"
  chmod 0644 "$TLS_DIR/ca.pem"
fi
# server_cert NAME: $TLS_DIR/NAME.pem and NAME.key, a server certificate for localhost and
# 127.0.0.1 from the demo CA (one per server: the broker, PostgreSQL, the collector's API).
server_cert() {
  [ -s "$TLS_DIR/$1.pem" ] && [ -s "$TLS_DIR/$1.key" ] && return 0
  [ -s "$TLS_DIR/ca.key" ] || { log "no $TLS_DIR/ca.key to sign a certificate for $1: put your own $1.pem and $1.key there"; exit 1; }
  log "making the TLS certificate of $1 ($TLS_DIR/$1.pem)"
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$TLS_DIR/$1.key" -out "$TLS_DIR/$1.csr" 2>/dev/null
  printf '%s\n' 'subjectAltName=DNS:localhost,IP:127.0.0.1' 'basicConstraints=CA:FALSE' \
    'keyUsage=digitalSignature,keyEncipherment' 'extendedKeyUsage=serverAuth' > "$TLS_DIR/$1.ext"
  openssl x509 -req -in "$TLS_DIR/$1.csr" -CA "$TLS_DIR/ca.pem" -CAkey "$TLS_DIR/ca.key" \
    -CAcreateserial -days 825 -extfile "$TLS_DIR/$1.ext" -out "$TLS_DIR/$1.pem" 2>/dev/null
  rm -f "$TLS_DIR/$1.csr" "$TLS_DIR/$1.ext"
  chmod 0644 "$TLS_DIR/$1.pem"
  chmod 0600 "$TLS_DIR/$1.key"
}
server_cert broker
chown rabbitmq:rabbitmq "$TLS_DIR/broker.key"
chmod 0600 "$TLS_DIR/broker.key"
MQ_CONF=/etc/rabbitmq/rabbitmq.conf
MQ_TLS_CONF="listeners.ssl.default = 5671
ssl_options.cacertfile = $TLS_DIR/ca.pem
ssl_options.certfile = $TLS_DIR/broker.pem
ssl_options.keyfile = $TLS_DIR/broker.key
ssl_options.verify = verify_none
ssl_options.fail_if_no_peer_cert = false
ssl_options.versions.1 = tlsv1.3
ssl_options.versions.2 = tlsv1.2"
mq_running() { rabbitmq-diagnostics -q check_running >/dev/null 2>&1; }
if [ "$(cat "$MQ_CONF" 2>/dev/null)" != "$MQ_TLS_CONF" ]; then
  printf '%s\n' "$MQ_TLS_CONF" > "$MQ_CONF"
  if mq_running; then
    log "restarting RabbitMQ for its TLS listener"
    rabbitmqctl -q stop >/dev/null 2>&1 || true
    for _ in $(seq 1 60); do mq_running || break; sleep 0.5; done
  fi
fi
if ! mq_running; then
  log "starting RabbitMQ"
  rabbitmq-server -detached
  # Bare `rabbitmqctl await_startup` fails before the node registers with epmd: poll instead.
  for _ in $(seq 1 180); do mq_running && break; sleep 0.5; done
  mq_running || { log "RabbitMQ did not become ready; see /var/log/rabbitmq/"; exit 1; }
fi
# The vhost, one user per service and their permissions (also run by deploy/cluster.sh).
bash "$(dirname "$0")/broker-grants.sh"

# ---- 3b. TLS for PostgreSQL and the collector's API, from the same demo CA. PostgreSQL
# takes TLS next to plain connections (ssl = on; a collector on another host connects with
# sslmode=verify-full&sslrootcert=/etc/vmeter/tls/ca.pem and a hostssl line: docs/multi-host.md).
# The collector's API certificate is for http.tls_cert_file/tls_key_file, readable by the
# services' group vmeter when the packages made it.
server_cert postgres
chown postgres:postgres "$TLS_DIR/postgres.key"
runuser -u postgres -- psql -q -p "$PG_PORT" -v ON_ERROR_STOP=1 >/dev/null <<SQL
ALTER SYSTEM SET ssl = on;
ALTER SYSTEM SET ssl_cert_file = '$TLS_DIR/postgres.pem';
ALTER SYSTEM SET ssl_key_file = '$TLS_DIR/postgres.key';
ALTER SYSTEM SET ssl_min_protocol_version = 'TLSv1.2';
SELECT pg_reload_conf();
SQL
for _ in $(seq 1 50); do
  [ "$(runuser -u postgres -- psql -tAq -p "$PG_PORT" -c 'show ssl')" = on ] && break; sleep 0.1
done
[ "$(runuser -u postgres -- psql -tAq -p "$PG_PORT" -c 'show ssl')" = on ] \
  || { log "PostgreSQL did not take its TLS certificate; see its log"; exit 1; }
server_cert collector
if getent group vmeter >/dev/null; then
  chgrp vmeter "$TLS_DIR/collector.key"; chmod 0640 "$TLS_DIR/collector.key"
fi

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

log "ready: postgres://$DB_USER:***@127.0.0.1:$PG_PORT/$DB_NAME, amqp://<user>:***@127.0.0.1:5672/$MQ_VHOST (users, passwords: $CRED)"
