#!/usr/bin/env bash
# The vhost, one user per service with only the permissions it needs, and the vhost's admin,
# on a RabbitMQ node (or cluster: users and permissions are cluster-wide), with the names and
# passwords of the credentials file deploy/setup.sh made. Idempotent. Run by deploy/setup.sh
# (the machine's node) and deploy/cluster.sh (RMQ_NODE=vmeter-c1@host).
set -euo pipefail
CRED=${VMETER_CREDENTIALS:-/etc/vmeter/credentials.env}
# shellcheck disable=SC1090
. "$CRED"
rabbitmqctl() { command rabbitmqctl ${RMQ_NODE:+-n "$RMQ_NODE"} "$@"; }
rabbitmqctl -q add_vhost "$MQ_VHOST" >/dev/null 2>&1 || true   # rc 0 when it exists on 3.10; guard anyway
mq_user() {  # user password: create, or reset the password to the file's
  rabbitmqctl -q add_user "$1" "$2" >/dev/null 2>&1 || rabbitmqctl -q change_password "$1" "$2" >/dev/null
}
# Permissions: configure, write, read regexps over exchange and queue names, and topic
# permissions over the routing keys of the exchange `vmeter`. Declaring a queue needs
# configure on it, binding needs write on the queue and read on the exchange, publishing
# needs write on the exchange, consuming needs read on the queue. The names are the
# defaults of the broker.* keys.
ALL='^vmeter(\.samples\.(raw|processed)|\.dlx|\.dead)?$'
# Topic "read" covers binding keys: the services that declare the topology bind both.
KEYS='^sample\.(raw|processed)$'
mq_user "$MQ_AGENT_USER" "$MQ_AGENT_PASSWORD"
# The agent publishes raw samples and nothing else: no declare, no consume, one routing key.
rabbitmqctl -q set_permissions -p "$MQ_VHOST" "$MQ_AGENT_USER" '^$' '^vmeter$' '^$' >/dev/null
rabbitmqctl -q set_topic_permissions -p "$MQ_VHOST" "$MQ_AGENT_USER" vmeter '^sample\.raw$' '^$' >/dev/null
mq_user "$MQ_NOTIFICATION_USER" "$MQ_NOTIFICATION_PASSWORD"
# Declares the topology; consumes raw; publishes processed samples and dead letters.
rabbitmqctl -q set_permissions -p "$MQ_VHOST" "$MQ_NOTIFICATION_USER" "$ALL" "$ALL" '^vmeter(\.dlx|\.samples\.raw)?$' >/dev/null
rabbitmqctl -q set_topic_permissions -p "$MQ_VHOST" "$MQ_NOTIFICATION_USER" vmeter '^sample\.processed$' "$KEYS" >/dev/null
mq_user "$MQ_COLLECTOR_USER" "$MQ_COLLECTOR_PASSWORD"
# Declares the topology; consumes processed; publishes posted samples as raw, and dead letters.
rabbitmqctl -q set_permissions -p "$MQ_VHOST" "$MQ_COLLECTOR_USER" "$ALL" "$ALL" '^vmeter(\.dlx|\.samples\.processed)?$' >/dev/null
rabbitmqctl -q set_topic_permissions -p "$MQ_VHOST" "$MQ_COLLECTOR_USER" vmeter '^sample\.raw$' "$KEYS" >/dev/null
mq_user "$MQ_ADMIN_USER" "$MQ_ADMIN_PASSWORD"
# Operators (reading the dead-letter queue) and the test suite (its own names per test).
rabbitmqctl -q set_permissions -p "$MQ_VHOST" "$MQ_ADMIN_USER" '.*' '.*' '.*' >/dev/null
# guest (loopback only, a well-known password) has no business in the vhost.
rabbitmqctl -q clear_permissions -p "$MQ_VHOST" guest >/dev/null 2>&1 || true

