#!/usr/bin/env bash
# Installs vmeter's agent on a hypervisor, as root (docs/multi-host.md):
#
#   deploy/install-hypervisor.sh <vmeter-agent-compute .deb> <broker URL[,URL…]> <CA .pem> <telemetry secret file>
#
# - the package (apt fetches libvirt0 and the rest);
# - broker.url: the amqps:// URL that deploy/add-agent.sh printed for this host on the
#   broker host (its own user: publish raw samples only); with a RabbitMQ cluster, each
#   node's URL, comma-separated: the first is broker.url, the others broker.failover_urls;
# - the CA that signed the broker's certificate, as /etc/vmeter/tls/ca.pem (broker.tls_ca_file);
# - the batches' signing secret, as /etc/vmeter/telemetry_secret (the same on every host);
# - the agent checks its config, and starts where systemd runs.
# Running it again updates all of it. Other keys of /etc/vmeter/agent-compute.yaml are kept.
set -euo pipefail
umask 077   # the configs hold passwords: no moment readable by others
[ "$#" = 4 ] || { sed -n '2,14p' "$0" >&2; exit 2; }
deb=$1 url=$2 ca=$3 secret=$4
[ "$(id -u)" = 0 ] || { echo "install-hypervisor: run as root" >&2; exit 1; }
IFS=, read -r -a urls <<< "$url"
for u in "${urls[@]}"; do
  case "$u" in amqps://*) ;; *) echo "install-hypervisor: every broker URL must be amqps:// (TLS): $u" >&2; exit 2;; esac
  case "$u" in *\"*|*\\*) echo "install-hypervisor: a quote or backslash in a URL" >&2; exit 2;; esac
done
url=${urls[0]}
failover=$(printf '"%s", ' "${urls[@]:1}"); failover="[${failover%, }]"; [ "$failover" = '[""]' ] && failover='[]'
for f in "$deb" "$ca" "$secret"; do [ -r "$f" ] || { echo "install-hypervisor: cannot read $f" >&2; exit 2; }; done

if ! dpkg -i "$deb" >/dev/null 2>&1; then
  apt-get install -y -qq "$(realpath "$deb")" >/dev/null
fi
install -d -m 0755 /etc/vmeter/tls
# (Given in place already, as on a host that is also the broker's: left as they are.)
[ "$(realpath "$ca")" = /etc/vmeter/tls/ca.pem ] || install -m 0644 "$ca" /etc/vmeter/tls/ca.pem
[ "$(realpath "$secret")" = /etc/vmeter/telemetry_secret ] \
  || install -m 0640 -o root -g vmeter "$secret" /etc/vmeter/telemetry_secret
CONF=/etc/vmeter/agent-compute.yaml
# broker.url, failover_urls and tls_ca_file, in place (awk: no python on a minimal hypervisor).
awk -v url="$url" -v failover="$failover" '
  /^  failover_urls: / { next }
  !u && /^  url: "/ { print "  url: \"" url "\""; print "  failover_urls: " failover; u = 1; next }
  !t && /^  (# )?tls_ca_file: / { print "  tls_ca_file: /etc/vmeter/tls/ca.pem"; t = 1; next }
  { print }
' "$CONF" > "$CONF.new"
mv "$CONF.new" "$CONF"
chown root:vmeter "$CONF"
chmod 0640 "$CONF"
runuser -u vmeter -- /usr/bin/agent-compute --config "$CONF" check-config
if [ -d /run/systemd/system ]; then
  systemctl enable vmeter-agent-compute.service >/dev/null
  systemctl restart vmeter-agent-compute.service
  echo "[install-hypervisor] vmeter-agent-compute running (systemctl status vmeter-agent-compute)"
else
  echo "[install-hypervisor] installed; no systemd here: start /usr/bin/agent-compute --config $CONF as user vmeter"
fi
