#!/usr/bin/env bash
# The whole detector, end to end, on this machine (`make demo`): a local Kafka broker, a model
# trained on synthetic sensor data, `detector run` consuming the test events that
# `detector produce` sends, and the alerts printed as they arrive. Nothing is simulated: these
# are the same commands a deployment runs. Everything is stopped again on exit (or Ctrl-C);
# the run's folder under .cache/demo keeps the data, the model and the daemon's log.
#
# Environment: PYTHON (default .venv/bin/python), DEMO_KEYS (devices, default 12),
# DEMO_DAYS (days of history, default 3), DEMO_EPOCHS (default 3), DEMO_RATE (events per
# second sent, default 2000).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-.venv/bin/python}
KEYS=${DEMO_KEYS:-12}
DAYS=${DEMO_DAYS:-3}
EPOCHS=${DEMO_EPOCHS:-3}
RATE=${DEMO_RATE:-2000}
TOPIC=sensor-events
ALERTS=sensor-alerts

step() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }

mkdir -p .cache/demo
WORK=$(cd "$(mktemp -d .cache/demo/run-XXXXXX)" && pwd)
read -r KAFKA_PORT CONTROLLER_PORT HTTP_PORT < <("$PYTHON" - <<'EOF'
import socket
sockets = [socket.socket() for _ in range(3)]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in sockets))
EOF
)

DAEMON_PID=""
TAIL_PID=""
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [[ -n $TAIL_PID ]]; then kill "$TAIL_PID" 2>/dev/null || true; fi
    if [[ -n $DAEMON_PID ]] && kill -0 "$DAEMON_PID" 2>/dev/null; then
        kill -TERM "$DAEMON_PID"
        wait "$DAEMON_PID" || status=$?
    fi
    "$PYTHON" deploy/kafka/local-kafka stop --dir "$WORK/kafka" >/dev/null 2>&1 || true
    echo "demo folder: $WORK (data, model.onnx, detector.log)" >&2
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The number a metric of the daemon's /metrics has now (summed over its labels).
metric() {
    "$PYTHON" - "$HTTP_PORT" "$1" <<'EOF'
import sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families
port, name = sys.argv[1], sys.argv[2]
try:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
except OSError:
    print(-1)
    raise SystemExit
print(int(sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)))
EOF
}

step "1/6 local Kafka broker"
BOOTSTRAP=$("$PYTHON" deploy/kafka/local-kafka start --port "$KAFKA_PORT" \
    --controller-port "$CONTROLLER_PORT" --dir "$WORK/kafka" --exit-with $$ | tail -n 1)
echo "broker at $BOOTSTRAP" >&2

step "2/6 synthetic sensor data ($KEYS devices, $DAYS days, faults injected)"
"$PYTHON" -m trainer synth sensors --out "$WORK/data" --keys "$KEYS" --days "$DAYS"

step "3/6 training a forecast LSTM ($EPOCHS epochs) and exporting it to ONNX"
"$PYTHON" -m trainer train --config "$WORK/data/train.toml" --data "$WORK/data/train.csv" \
    --out "$WORK/model.onnx" --epochs "$EPOCHS" --no-progress

step "4/6 input topic $TOPIC (3 partitions)"
"$PYTHON" - "$BOOTSTRAP" "$TOPIC" <<'EOF'
import sys
from kafka import KafkaAdminClient
from kafka.admin import NewTopic
admin = KafkaAdminClient(bootstrap_servers=sys.argv[1])
admin.create_topics([NewTopic(sys.argv[2], num_partitions=3, replication_factor=1)])
admin.close()
EOF

step "5/6 detector run (log: $WORK/detector.log, metrics: http://127.0.0.1:$HTTP_PORT/metrics)"
export SEQSENTINEL_KAFKA__BOOTSTRAP_SERVERS=$BOOTSTRAP
export SEQSENTINEL_KAFKA__GROUP_ID=demo-detector
export SEQSENTINEL_TOPICS__INPUT=$TOPIC
export SEQSENTINEL_TOPICS__ALERTS=$ALERTS
export SEQSENTINEL_TOPICS__DEAD_LETTERS=sensor-dead-letters
export SEQSENTINEL_MODEL__PATH=$WORK/model.onnx
export SEQSENTINEL_HTTP__HOST=127.0.0.1
export SEQSENTINEL_HTTP__PORT=$HTTP_PORT
export SEQSENTINEL_LOG__FORMAT=json
"$PYTHON" -m detector run >"$WORK/detector.log" 2>&1 &
DAEMON_PID=$!
for _ in $(seq 120); do
    if curl -fs "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null; then break; fi
    if ! kill -0 "$DAEMON_PID" 2>/dev/null; then
        tail -n 20 "$WORK/detector.log" >&2
        exit 1
    fi
    sleep 0.5
done
curl -fs "http://127.0.0.1:$HTTP_PORT/readyz" >&2 && echo >&2

step "6/6 sending the test events; alerts as they arrive:"
"$PYTHON" -m detector tail-alerts --topic "$ALERTS" --from-beginning &
TAIL_PID=$!
"$PYTHON" -m detector produce --input "$WORK/data/test.csv" --topic "$TOPIC" \
    --key-column device_id --time-column ts --rate "$RATE"
EVENTS=$(($(wc -l <"$WORK/data/test.csv") - 1))
for _ in $(seq 240); do
    [[ $(metric seqsentinel_records_total) -ge $EVENTS ]] && break
    sleep 0.5
done
sleep 1 # the last alerts reach tail-alerts
echo >&2
echo "$EVENTS events scored, $(metric seqsentinel_alerts_total) alerts; stopping" >&2
"$PYTHON" -m detector replay --model "$WORK/model.onnx" --input "$WORK/data/test.csv" \
    --alerts "$WORK/replay-alerts.jsonl" >/dev/null 2>"$WORK/replay.log"
echo "detector replay of the same file: $(wc -l <"$WORK/replay-alerts.jsonl") alerts" >&2
