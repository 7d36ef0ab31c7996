#!/usr/bin/env bash
# On the broker host, as root: a broker user of its own for the agent of one hypervisor,
# allowed to publish raw samples and nothing else (no declare, no consume, one exchange,
# one routing key). Prints the broker URL for that hypervisor's
# /etc/vmeter/agent-compute.yaml (broker.url, with broker.tls_ca_file). Run it again for a
# new password; `rabbitmqctl delete_user vmeter-agent-<host>` revokes the agent.
#
#   deploy/add-agent.sh <hypervisor> [broker host name as the agents reach it]
#
# Environment: VMETER_CREDENTIALS (for MQ_VHOST), VMETER_EXCHANGE (vmeter),
# VMETER_RAW_ROUTING_KEY (sample.raw). docs/multi-host.md.
set -euo pipefail
host=${1:?usage: add-agent.sh <hypervisor> [broker host name]}
broker=${2:-$(hostname -f)}
[[ "$host" =~ ^[A-Za-z0-9._-]+$ ]] || { echo "add-agent: host name: letters, digits, '.', '_', '-'" >&2; exit 2; }
CRED=${VMETER_CREDENTIALS:-/etc/vmeter/credentials.env}
VHOST=$(sed -n 's/^MQ_VHOST=//p' "$CRED" 2>/dev/null || true)
VHOST=${VHOST:-/vmeter}
EXCHANGE=${VMETER_EXCHANGE:-vmeter}
ROUTING_KEY=${VMETER_RAW_ROUTING_KEY:-sample.raw}
user="vmeter-agent-$host"
password=$(openssl rand -hex 24)
rabbitmqctl -q add_user "$user" "$password" >/dev/null 2>&1 \
  || rabbitmqctl -q change_password "$user" "$password" >/dev/null
anchored() { printf '^%s$' "$(printf '%s' "$1" | sed 's/[.]/\\./g')"; }
rabbitmqctl -q set_permissions -p "$VHOST" "$user" '^$' "$(anchored "$EXCHANGE")" '^$' >/dev/null
rabbitmqctl -q set_topic_permissions -p "$VHOST" "$user" "$EXCHANGE" "$(anchored "$ROUTING_KEY")" '^$' >/dev/null
echo "amqps://$user:$password@$broker:5671/$(printf '%s' "$VHOST" | sed 's|/|%2f|g')"
