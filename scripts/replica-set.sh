#!/usr/bin/env bash
# Starts a local three-member replica set (zones a, b, c) on 127.0.0.1 and shows a write
# and a read with curl. Until the playground exists, this is the quickest way to try Nimbus.
#
#   scripts/replica-set.sh up [DIR]     start (data in DIR, default .replica-set), write, read
#   scripts/replica-set.sh down [DIR]   stop what `up` started; the data stays in DIR
set -euo pipefail
cd "$(dirname "$0")/.."
cmd=${1:-up}
dir=$(realpath -m "${2:-.replica-set}")
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/nimbus/target}"
bin="$CARGO_TARGET_DIR/debug/nimbus-datanode"

down() {
  for pidfile in "$dir"/n*/pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null && grep -q nimbus-datanode "/proc/$pid/cmdline" 2>/dev/null; then
      kill "$pid"
    fi
    rm -f "$pidfile"
  done
}

case "$cmd" in
  down) down; echo "stopped; data kept in $dir"; exit 0 ;;
  up) ;;
  *) echo "usage: $0 up|down [DIR]" >&2; exit 2 ;;
esac

cargo build --quiet --bin nimbus-datanode
down
mkdir -p "$dir"
zones=(a b c)
for id in 1 2 3; do
  n="$dir/n$id"
  mkdir -p "$n"
  # Fixed ports so that a restart finds its peers at the same addresses.
  "$bin" --id "$id" --zone "${zones[$((id-1))]}" --replica-set rs0 --data-dir "$n" \
    --data-listen "127.0.0.1:$((7000+id))" --admin-listen "127.0.0.1:$((7100+id))" \
    >"$n/stdout.log" 2>"$n/stderr.log" &
  echo $! >"$n/pid"
done
for id in 1 2 3; do
  for _ in $(seq 1 100); do
    curl -sf "http://127.0.0.1:$((7100+id))/healthz" >/dev/null && break
    sleep 0.1
  done
done
members='[{"id":1,"adminAddr":"http://127.0.0.1:7101","dataAddr":"http://127.0.0.1:7001","zone":"a"},
          {"id":2,"adminAddr":"http://127.0.0.1:7102","dataAddr":"http://127.0.0.1:7002","zone":"b"},
          {"id":3,"adminAddr":"http://127.0.0.1:7103","dataAddr":"http://127.0.0.1:7003","zone":"c"}]'
curl -sf -X POST -H 'content-type: application/json' -d "{\"members\": $members}" http://127.0.0.1:7101/v1/admin/init >/dev/null
leader=""
for _ in $(seq 1 100); do
  leader=$(curl -sf http://127.0.0.1:7101/v1/status | python3 -c 'import json,sys; print(json.load(sys.stdin)["leaderId"] or "")' || true)
  [ -n "$leader" ] && break
  sleep 0.1
done
[ -n "$leader" ] || { echo "no leader elected; see $dir/n*/stderr.log" >&2; exit 1; }
data="http://127.0.0.1:$((7000+leader))"
echo "replica set rs0 is up; leader is member $leader ($data)"
echo
echo "\$ curl -X POST -H 'content-type: application/json' -d '{\"documents\": [{\"_id\": \"hello\", \"n\": 1}]}' $data/v1/databases/demo/collections/greetings/documents"
curl -s -X POST -H 'content-type: application/json' -H 'idempotency-key: readme-hello' \
  -d '{"documents": [{"_id": "hello", "n": 1}]}' "$data/v1/databases/demo/collections/greetings/documents"
echo
echo "\$ curl $data/v1/databases/demo/collections/greetings/documents/hello"
curl -s "$data/v1/databases/demo/collections/greetings/documents/hello"
echo
echo
echo "status: curl http://127.0.0.1:7101/v1/status    stop: $0 down $dir"
