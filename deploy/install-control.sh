#!/usr/bin/env bash
# Installs vmeter's control host, as root (docs/multi-host.md): RabbitMQ (TLS on 5671) and
# PostgreSQL with vmeter's users, vhost and permissions (deploy/setup.sh), then the
# notification and collector packages with their own passwords from
# /etc/vmeter/credentials.env filled into their configs, checked, and started where systemd
# runs.
#
#   deploy/install-control.sh <vmeter-notification .deb> <vmeter-collector .deb>
#
# Agents are added with deploy/add-agent.sh <hypervisor>. Running it again keeps the
# passwords and any other edit of the configs.
set -euo pipefail
[ "$#" = 2 ] || { sed -n '2,11p' "$0" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "install-control: run as root" >&2; exit 1; }
here=$(dirname "$0")
bash "$here/setup.sh"
for deb in "$1" "$2"; do
  dpkg -i "$deb" >/dev/null 2>&1 || apt-get install -y -qq "$(realpath "$deb")" >/dev/null
done
umask 077   # from here on the configs get passwords: no moment readable by others
CRED=${VMETER_CREDENTIALS:-/etc/vmeter/credentials.env}
# shellcheck disable=SC1090
. "$CRED"
fill() {  # config, broker user, its password, [database password]: the PASSWORD placeholders
  awk -v user="$2" -v pw="$3" -v db="${4:-}" '
    { gsub("amqp://" user ":PASSWORD@", "amqp://" user ":" pw "@") }
    db != "" { gsub("postgres://vmeter:PASSWORD@", "postgres://vmeter:" db "@") }
    { print }
  ' "$1" > "$1.new"
  mv "$1.new" "$1"
  chown root:vmeter "$1"
  chmod 0640 "$1"
}
fill /etc/vmeter/notification.yaml "$MQ_NOTIFICATION_USER" "$MQ_NOTIFICATION_PASSWORD"
fill /etc/vmeter/collector.yaml "$MQ_COLLECTOR_USER" "$MQ_COLLECTOR_PASSWORD" "$DB_PASSWORD"
for svc in notification collector; do
  runuser -u vmeter -- "/usr/bin/$svc" --config "/etc/vmeter/$svc.yaml" check-config
done
if [ -d /run/systemd/system ]; then
  systemctl enable vmeter-notification.service vmeter-collector.service >/dev/null
  systemctl restart vmeter-notification.service vmeter-collector.service
  echo "[install-control] vmeter-notification and vmeter-collector running"
else
  echo "[install-control] installed; no systemd here: start /usr/bin/notification and /usr/bin/collector (--config /etc/vmeter/<service>.yaml) as user vmeter"
fi
