#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this one machine, beside the machine's own broker, for
# the cluster test (tests/tests/broker_cluster.rs) and to try fail-over by hand. Three hosts
# run the same way with one node each: docs/multi-host.md, "A broker cluster".
#
#   deploy/cluster.sh start          start the nodes that are down; form the cluster; the
#                                    vhost, users and permissions of deploy/setup.sh
#   deploy/cluster.sh stop           stop all three (their data stays)
#   deploy/cluster.sh kill N         kill -9 node N (1-3): what the cluster test does
#   deploy/cluster.sh start-node N   start node N again (it rejoins by itself)
#   deploy/cluster.sh urls [user]    the AMQP URLs of the three nodes for a user of
#                                    credentials.env (ADMIN, AGENT, NOTIFICATION, COLLECTOR)
#   deploy/cluster.sh status
#
# Nodes vmeter-c1..3@<short host name>, AMQP on 5681-5683 (VMETER_CLUSTER_PORT base 5680),
# Erlang distribution on 25681-25683, data under /var/lib/rabbitmq/vmeter-cluster, logs
# under /var/log/rabbitmq/vmeter-cluster. No plugins, no TLS listener (the machine's own
# node has the TLS listener; a cluster node takes the same ssl_options where it needs one).
# Run deploy/setup.sh first (packages, credentials, the Erlang cookie). Needs root.
set -euo pipefail
cd "$(dirname "$0")"
CRED=${VMETER_CREDENTIALS:-/etc/vmeter/credentials.env}
BASE=${VMETER_CLUSTER_PORT:-5680}
HOST=$(hostname -s)
DATA=/var/lib/rabbitmq/vmeter-cluster
LOGS=/var/log/rabbitmq/vmeter-cluster
log() { printf '[cluster] %s\n' "$*" >&2; }
[ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }

node() { echo "vmeter-c$1@$HOST"; }
port() { echo $((BASE + $1)); }
ctl() { local n=$1; shift; rabbitmqctl -q -n "$(node "$n")" "$@"; }
running() { rabbitmq-diagnostics -q -n "$(node "$1")" check_running >/dev/null 2>&1; }
pidfile() { echo "$DATA/c$1/pid"; }

# launch_node N: starts node N in the background if it is down (no wait).
launch_node() {
  local n=$1 dir="$DATA/c$1"
  running "$n" && return 0
  # Registered with epmd but not running: still booting (waiting for its peers); a second
  # instance would only fail and take the first one's pid file with it.
  epmd -names 2>/dev/null | grep -q "^name vmeter-c$n at" && return 0
  install -d -o rabbitmq -g rabbitmq "$dir" "$LOGS"
  printf 'listeners.tcp.default = %s\n' "$(port "$n")" > "$dir/rabbitmq.conf"
  echo '[].' > "$dir/enabled_plugins"
  chown rabbitmq:rabbitmq "$dir/rabbitmq.conf" "$dir/enabled_plugins"
  log "starting $(node "$n") on port $(port "$n")"
  # The Debian wrapper runs the node as user rabbitmq (su keeps these variables) with the
  # machine's Erlang cookie, which the cluster's nodes share.
  RABBITMQ_NODENAME=$(node "$n") RABBITMQ_NODE_PORT=$(port "$n") \
    RABBITMQ_DIST_PORT=$((20000 + $(port "$n"))) \
    RABBITMQ_CONFIG_FILE="$dir/rabbitmq" RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
    RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config" \
    RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$LOGS" \
    RABBITMQ_PID_FILE="$(pidfile "$n")" RABBITMQ_LOGS="$LOGS/c$n.log" \
    rabbitmq-server -detached >/dev/null 2>&1
}

# wait_node N: until node N runs. Bare await_startup fails before the node registers with
# epmd: poll (5-11 s, more under load).
wait_node() {
  for _ in $(seq 1 360); do running "$1" && return 0; sleep 0.5; done
  log "$(node "$1") did not start; see $LOGS/c$1.log"
  return 1
}

# start_nodes N…: launches them all, then waits for each. All at once: a cluster whose
# nodes all stopped boots only when the last one to stop is back (each node waits for its
# peers' tables), so starting them one after the other would wait for nothing.
start_nodes() {
  for n in "$@"; do launch_node "$n"; done
  for n in "$@"; do wait_node "$n"; done
}

in_cluster() {  # node N sees node 1 as a member
  rabbitmqctl -q -n "$(node "$1")" cluster_status --formatter json 2>/dev/null | grep -q "\"$(node 1)\""
}

form() {
  for n in 2 3; do
    if ! in_cluster "$n"; then
      log "joining $(node "$n") to $(node 1)"
      ctl "$n" stop_app >/dev/null 2>>"$LOGS/join.log"
      ctl "$n" reset >/dev/null 2>>"$LOGS/join.log"
      ctl "$n" join_cluster "$(node 1)" >/dev/null 2>>"$LOGS/join.log"
      ctl "$n" start_app >/dev/null 2>>"$LOGS/join.log"
    fi
  done
}

case "${1:-}" in
  start)
    [ -s "$CRED" ] || { log "no $CRED: run deploy/setup.sh first"; exit 1; }
    start_nodes 1 2 3
    form
    # The same vhost, users, passwords and permissions as the machine's own broker.
    RMQ_NODE=$(node 1) bash ./broker-grants.sh
    log "ready: $(node 1) $(node 2) $(node 3) on ports $(port 1)-$(port 3)"
    ;;
  stop)
    for n in 1 2 3; do running "$n" && ctl "$n" stop >/dev/null 2>&1 || true; done
    ;;
  kill)
    n=${2:?node 1-3}
    # The node's own word for its pid (a pid file can be stale or gone).
    pid=$(ctl "$n" eval 'os:getpid().' | tr -d '"')
    case "$pid" in ''|*[!0-9]*) log "no pid from $(node "$n"): $pid"; exit 1;; esac
    kill -9 "$pid"
    for _ in $(seq 1 40); do running "$n" || exit 0; sleep 0.25; done
    log "$(node "$n") still answers after kill -9"; exit 1
    ;;
  start-node)
    start_nodes "${2:?node 1-3}"
    ;;
  urls)
    # shellcheck disable=SC1090
    . "$CRED"
    who=${2:-ADMIN}
    user_var="MQ_${who}_USER" pass_var="MQ_${who}_PASSWORD"
    vhost=$(printf '%s' "$MQ_VHOST" | sed 's|/|%2f|g')
    for n in 1 2 3; do echo "amqp://${!user_var}:${!pass_var}@127.0.0.1:$(port "$n")/$vhost"; done
    ;;
  status)
    for n in 1 2 3; do
      if running "$n"; then echo "$(node "$n") running on $(port "$n")"; else echo "$(node "$n") down"; fi
    done
    ;;
  *)
    sed -n '2,20p' "$0" >&2; exit 2
    ;;
esac
