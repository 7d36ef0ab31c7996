#!/usr/bin/env bash
# Set up everything and run the whole pipeline on this machine: agent-compute, notification
# and collector as background processes against local RabbitMQ and PostgreSQL.
#
#   deploy/quickstart.sh                  the embedded demo libvirt node (4 fake VMs)
#   LIBVIRT_URI=qemu:///system deploy/quickstart.sh   this host's real VMs (needs libvirtd)
#
# Logs and configs go to /tmp/vmeter-quickstart (mode 0700: the configs hold credentials).
# Each service connects as its own broker user with the random passwords deploy/setup.sh
# made (/etc/vmeter/credentials.env); signing uses its telemetry secret. Ctrl-C stops
# everything.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUN=${VMETER_QUICKSTART_DIR:-/tmp/vmeter-quickstart}
URI=${LIBVIRT_URI:-demo}
INTERVAL=${POLL_INTERVAL_SECS:-10}

if [ "$(id -u)" = 0 ]; then bash deploy/setup.sh; else sudo -E bash deploy/setup.sh; fi
cargo build --workspace --bins --locked
mkdir -p "$RUN"
chmod 700 "$RUN"
umask 077
CRED=${VMETER_CREDENTIALS:-/etc/vmeter/credentials.env}
# shellcheck disable=SC1090
if [ -r "$CRED" ]; then . "$CRED"; else eval "$(sudo cat "$CRED")"; fi
VHOST=${MQ_VHOST//\//%2f}

common() {  # role: AGENT, NOTIFICATION or COLLECTOR
  local user pass
  user=$(eval echo "\$MQ_${1}_USER") pass=$(eval echo "\$MQ_${1}_PASSWORD")
  cat <<YAML
broker:
  url: "amqp://$user:$pass@127.0.0.1:5672/$VHOST"
signing:
  telemetry_secret: "$TELEMETRY_SECRET"
log:
  level: info
YAML
}
{ common AGENT; cat <<YAML
libvirt:
  uri: "$URI"
polling:
  interval_secs: $INTERVAL
  shuffle_time_secs: 2
spool:
  dir: "$RUN/agent-spool"
YAML
} > "$RUN/agent-compute.yaml"
{ common NOTIFICATION; cat <<YAML
pipeline:
  file: "$ROOT/pipeline.yaml"
  state_file: "$RUN/notification-state.json"
YAML
} > "$RUN/notification.yaml"
{ common COLLECTOR; cat <<YAML
http:
  listen: "127.0.0.1:8777"
database:
  url: "postgres://$DB_USER:$DB_PASSWORD@127.0.0.1:5432/vmeter"
YAML
} > "$RUN/collector.yaml"

pids=()
stop() { echo; echo "stopping…"; kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap stop EXIT INT TERM
for svc in collector notification agent-compute; do
  "$ROOT/target/debug/$svc" --config "$RUN/$svc.yaml" > "$RUN/$svc.log" 2>&1 &
  pids+=($!)
done

cat <<MSG

vmeter is running (libvirt: $URI, polling every ${INTERVAL}s). Logs: $RUN/*.log

  Charts:  http://127.0.0.1:8777/dashboard/ (a browser on this host, or an SSH tunnel to it)
  API:     curl -s 'http://127.0.0.1:8777/v2/meters/cpu_util?limit=5'
  SQL:     PGPASSWORD=\$(sudo sed -n 's/^DB_PASSWORD=//p' $CRED) psql -h 127.0.0.1 -U vmeter vmeter -c \\
             "select resource_metadata->>'name' as vm, timestamp, round(volume::numeric, 2) as cpu_util
                from samples where meter = 'cpu_util' order by timestamp desc limit 12"
  Metrics: curl -s http://127.0.0.1:8777/metrics

The first cpu_util points appear after two polling cycles. Ctrl-C stops everything.
MSG
wait
