#!/usr/bin/env bash
# Local Apache Kafka broker for streamrec: one KRaft node (broker + controller) on 127.0.0.1.
#
#   deploy/kafka/kafka.sh [options] fetch|start|stop|status|probe
#
#   fetch    resolve the broker jars from Maven Central into deploy/kafka/lib/ (once; skipped
#            when lib/ is complete and newer than pom.xml)
#   start    fetch if needed, format the data dir the first time, start the broker in the
#            background, wait until it answers a Metadata request, write <data dir>/kafka.pid.
#            Starting a broker that already runs from the same data dir is a no-op.
#   stop     SIGTERM the broker by its pid (controlled shutdown), wait, SIGKILL if it hangs.
#            Stopping a broker that does not run is a no-op.
#   status   exit 0 when the broker of this data dir runs and answers, 1 otherwise
#   probe    exit 0 when whatever listens on 127.0.0.1:PORT answers a Kafka Metadata request
#
# Options (environment variable in brackets, default after it):
#   --port N             client listener            [KAFKA_PORT, 9092]
#   --controller-port N  KRaft controller listener  [KAFKA_CONTROLLER_PORT, port + 1]
#   --data-dir DIR       data, config, log and pid  [KAFKA_DATA_DIR, <repo>/.run/kafka]
#   --watch-pid PID      stop the broker when process PID is gone (used by test fixtures)
#                                                   [KAFKA_WATCH_PID, none]
#   --extra-config FILE  properties appended to server.properties (a later line wins: e.g.
#                        more listeners, SASL and TLS; tests/integration/secure.py)
#                                                   [KAFKA_EXTRA_CONFIG, none]
#   --add-scram SPEC     a SCRAM user created when the storage is formatted (repeatable),
#                        StorageTool's syntax: 'SCRAM-SHA-512=[name=alice,password=secret]'
#   KAFKA_HEAP_OPTS (-Xms256m -Xmx768m), KAFKA_JVM_OPTS (G1, C1 only, see below),
#   KAFKA_START_TIMEOUT (120 s), KAFKA_STOP_TIMEOUT (30 s)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
LIB="$HERE/lib"
STAMP="$LIB/.complete"
KAFKA_VERSION=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$HERE/pom.xml")

PORT=${KAFKA_PORT:-9092}
CONTROLLER_PORT=${KAFKA_CONTROLLER_PORT:-}
DATA_DIR=${KAFKA_DATA_DIR:-$ROOT/.run/kafka}
WATCH_PID=${KAFKA_WATCH_PID:-}
EXTRA_CONFIG=${KAFKA_EXTRA_CONFIG:-}
SCRAM_USERS=()
START_TIMEOUT=${KAFKA_START_TIMEOUT:-120}
STOP_TIMEOUT=${KAFKA_STOP_TIMEOUT:-30}
# 768 MiB is plenty for a dev broker and leaves most of a 24 GiB box to tests and models.
HEAP_OPTS=${KAFKA_HEAP_OPTS:--Xms256m -Xmx768m}
# C1 only (TieredStopAtLevel=1): starts faster and spends far less CPU compiling on a
# 2-core machine; steady-state throughput is lower but far above what a dev box pushes.
# Transparent huge pages for the heap (where the kernel offers them; a warning in the log
# where it does not): fewer TLB misses, the broker's CPU per event 0.91x on this VM
# (docs/architecture.md, "The broker's cleaner buffer").
JVM_OPTS=${KAFKA_JVM_OPTS:--XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -XX:TieredStopAtLevel=1 -XX:+UseTransparentHugePages -XX:-UsePerfData -Djava.awt.headless=true}

PROG="kafka.sh"
# shellcheck source=../common/daemon.sh
. "$HERE/../common/daemon.sh"

cmd=""
while [ $# -gt 0 ]; do
  case "$1" in
    --port) PORT=${2:?--port needs a value}; shift 2 ;;
    --port=*) PORT=${1#*=}; shift ;;
    --controller-port) CONTROLLER_PORT=${2:?--controller-port needs a value}; shift 2 ;;
    --controller-port=*) CONTROLLER_PORT=${1#*=}; shift ;;
    --data-dir) DATA_DIR=${2:?--data-dir needs a value}; shift 2 ;;
    --data-dir=*) DATA_DIR=${1#*=}; shift ;;
    --watch-pid) WATCH_PID=${2:?--watch-pid needs a value}; shift 2 ;;
    --watch-pid=*) WATCH_PID=${1#*=}; shift ;;
    --extra-config) EXTRA_CONFIG=${2:?--extra-config needs a file}; shift 2 ;;
    --extra-config=*) EXTRA_CONFIG=${1#*=}; shift ;;
    --add-scram) SCRAM_USERS+=("--add-scram" "${2:?--add-scram needs a value}"); shift 2 ;;
    --add-scram=*) SCRAM_USERS+=("--add-scram" "${1#*=}"); shift ;;
    -h|--help|help) usage; exit 0 ;;
    fetch|start|stop|status|probe|_watch) [ -z "$cmd" ] || die "one command at a time"; cmd=$1; shift ;;
    *) die "unknown argument '$1' (try --help)" ;;
  esac
done
[ -n "$cmd" ] || { usage >&2; exit 2; }

valid_port "$PORT" || die "--port must be a TCP port number, got '$PORT'"
CONTROLLER_PORT=${CONTROLLER_PORT:-$((PORT + 1))}
valid_port "$CONTROLLER_PORT" || die "--controller-port must be a TCP port number, got '$CONTROLLER_PORT'"
[ "$PORT" != "$CONTROLLER_PORT" ] || die "client and controller ports must differ (both $PORT)"

# absolute, without creating it: only `start` makes the data dir
case "$DATA_DIR" in /*) ;; *) DATA_DIR="$PWD/$DATA_DIR" ;; esac
DATA_DIR=$(realpath -m "$DATA_DIR")
PID_FILE="$DATA_DIR/kafka.pid"
LOG="$DATA_DIR/kafka.log"
CONF="$DATA_DIR/server.properties"
ENDPOINT_FILE="$DATA_DIR/bootstrap"

need_java() {
  command -v java >/dev/null 2>&1 \
    || die "java not found on PATH: Kafka $KAFKA_VERSION needs Java 17+ (Debian: apt-get install openjdk-17-jre-headless)"
  local v major
  v=$(java -version 2>&1 | sed -n 's/.*version "\([^"]*\)".*/\1/p' | head -n 1)
  major=${v%%.*}
  [ "$major" = "1" ] && major=$(echo "$v" | cut -d. -f2)
  [[ "$major" =~ ^[0-9]+$ ]] && [ "$major" -ge 17 ] \
    || die "java on PATH is version '${v:-unknown}': Kafka $KAFKA_VERSION needs Java 17+"
}

jars_present() { [ -f "$STAMP" ] && [ "$STAMP" -nt "$HERE/pom.xml" ]; }

fetch() {
  if jars_present; then
    say "Kafka $KAFKA_VERSION jars already in deploy/kafka/lib (mvn skipped)"
    return 0
  fi
  command -v mvn >/dev/null 2>&1 \
    || die "mvn not found on PATH: Maven 3.8+ resolves the Kafka jars (Debian: apt-get install maven)"
  need_java
  mkdir -p "$ROOT/.run"
  # one fetch at a time, even when several test sessions start together
  exec 8>"$ROOT/.run/kafka-fetch.lock"
  flock 8
  if jars_present; then flock -u 8; return 0; fi
  local tmp="$HERE/lib.tmp.$$" mvnlog="$ROOT/.run/kafka-fetch.log" t0=$SECONDS
  say "resolving Kafka $KAFKA_VERSION and its dependencies from Maven Central (once) ..."
  rm -rf "$tmp"
  if ! mvn -B -q -Dstyle.color=never -f "$HERE/pom.xml" -Dlib.dir="$tmp" package >"$mvnlog" 2>&1; then
    tail -n 25 "$mvnlog" >&2
    rm -rf "$tmp"
    die "mvn could not resolve the Kafka jars (full log: $mvnlog)"
  fi
  ls "$tmp"/kafka_2.13-*.jar >/dev/null 2>&1 || die "mvn finished but no kafka_2.13 jar in $tmp"
  touch "$tmp/.complete"
  rm -rf "$LIB"
  mv "$tmp" "$LIB"
  flock -u 8
  say "fetched $(ls "$LIB"/*.jar | wc -l) jars ($(du -sh "$LIB" | cut -f1)) into deploy/kafka/lib in $((SECONDS - t0)) s"
}

# Send a Metadata v7 request (Kafka 2.1+; still served by 4.x) to 127.0.0.1:$1 and succeed
# when the response echoes our correlation id and lists at least one broker. This is what
# clients do first, so "answers" here means "a client can use it", not merely "port open".
probe() {
  local hex
  hex=$(timeout 5 bash -c '
    exec 3<>/dev/tcp/127.0.0.1/'"$1"' || exit 1
    # size=20 | api_key=3 (Metadata) | version=7 | correlation_id=42 | client_id="probe"
    # | topics=null (all) | allow_auto_topic_creation=false
    printf "\x00\x00\x00\x14\x00\x03\x00\x07\x00\x00\x00\x2a\x00\x05probe\xff\xff\xff\xff\x00" >&3
    head -c 16 <&3 | od -An -v -tx1 | tr -d " \n"
  ' 2>/dev/null) || return 1
  # size(8 hex) correlation_id(8) throttle_time_ms(8) brokers_count(8)
  [ "${#hex}" -eq 32 ] && [ "${hex:8:8}" = "0000002a" ] && [ $((16#${hex:24:8})) -ge 1 ]
}

# The pid of the broker that runs from this data dir, if any (checked against its command line,
# so a recycled pid is never signalled).
running_pid() {
  local pid
  pid=$(pid_from_file) || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "kafka.Kafka $CONF" || return 1
  echo "$pid"
}

new_cluster_id() {
  # a Kafka Uuid: 16 random bytes, URL-safe base64 without padding; never starting with '-'
  local id
  while :; do
    id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')
    [ "${id:0:1}" != "-" ] && { echo "$id"; return; }
  done
}

render_config() {
  sed -e "s|@PORT@|$PORT|g" -e "s|@CONTROLLER_PORT@|$CONTROLLER_PORT|g" \
      -e "s|@LOG_DIRS@|$DATA_DIR/kraft-logs|g" "$HERE/server.properties" >"$CONF"
  if [ -n "$EXTRA_CONFIG" ]; then
    [ -r "$EXTRA_CONFIG" ] || die "--extra-config $EXTRA_CONFIG: no such readable file"
    { echo; echo "# appended from $EXTRA_CONFIG (--extra-config)"; cat "$EXTRA_CONFIG"; } >>"$CONF"
  fi
}

format_storage() {
  [ -f "$DATA_DIR/kraft-logs/meta.properties" ] && return 0
  local cid
  cid=$(new_cluster_id)
  say "formatting $DATA_DIR/kraft-logs (cluster id $cid)"
  # shellcheck disable=SC2086
  if ! java -Xmx256m -XX:TieredStopAtLevel=1 -XX:-UsePerfData \
      -Dlog4j2.configurationFile="$HERE/log4j2.properties" -Dkafka.root.loglevel=WARN \
      -cp "$LIB/*" kafka.tools.StorageTool format --cluster-id "$cid" --config "$CONF" "${SCRAM_USERS[@]}" \
      >"$DATA_DIR/format.log" 2>&1; then
    tail -n 20 "$DATA_DIR/format.log" >&2
    die "formatting the KRaft storage failed (log: $DATA_DIR/format.log)"
  fi
  echo "$cid" >"$DATA_DIR/cluster.id"
}

start_watcher() {
  [ -n "$WATCH_PID" ] || return 0
  [[ "$WATCH_PID" =~ ^[0-9]+$ ]] || die "--watch-pid must be a pid, got '$WATCH_PID'"
  setsid nohup bash "${BASH_SOURCE[0]}" --data-dir "$DATA_DIR" --port "$PORT" \
    --controller-port "$CONTROLLER_PORT" --watch-pid "$WATCH_PID" _watch \
    >>"$DATA_DIR/watch.log" 2>&1 </dev/null &
}

start() {
  local pid
  if pid=$(running_pid); then
    if [ "$(running_port)" != "$PORT" ]; then
      die "a broker from $DATA_DIR already runs on port $(running_port) (pid $pid), not $PORT: stop it first"
    fi
    if probe "$PORT"; then
      say "Kafka already running on 127.0.0.1:$PORT (pid $pid)"
      return 0
    fi
    say "Kafka process $pid is up but not answering yet; waiting"
  else
    rm -f "$PID_FILE"
    need_java
    for p in "$PORT" "$CONTROLLER_PORT"; do
      if port_open "$p"; then
        die "port $p on 127.0.0.1 is already in use by another process$(port_owner "$p"): choose another with KAFKA_PORT=... / KAFKA_CONTROLLER_PORT=... (or --port/--controller-port)"
      fi
    done
    fetch
    mkdir -p "$DATA_DIR"
    render_config
    format_storage
    [ -f "$LOG" ] && mv -f "$LOG" "$LOG.1"
    # setsid: the broker leaves our session, so a Ctrl-C in the terminal that ran
    # `make up` or pytest does not hit it; it is stopped by its pid.
    # shellcheck disable=SC2086
    setsid java $HEAP_OPTS $JVM_OPTS \
      -Dlog4j2.configurationFile="$HERE/log4j2.properties" -Dkafka.logs.dir="$DATA_DIR" \
      -cp "$LIB/*" kafka.Kafka "$CONF" >"$LOG" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$PID_FILE"
    echo "127.0.0.1:$PORT" >"$ENDPOINT_FILE"
  fi
  local t0=$SECONDS deadline=$((SECONDS + START_TIMEOUT))
  until probe "$PORT"; do
    if ! alive "$pid"; then
      tail -n 30 "$LOG" >&2 || true
      rm -f "$PID_FILE"
      die "the broker exited during start-up (log: $LOG)"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      tail -n 30 "$LOG" >&2 || true
      stop >/dev/null 2>&1 || true
      die "the broker did not answer on 127.0.0.1:$PORT within ${START_TIMEOUT}s (log: $LOG)"
    fi
    sleep 0.3
  done
  start_watcher
  say "Kafka $KAFKA_VERSION ready on 127.0.0.1:$PORT in $((SECONDS - t0)) s (pid $pid, data $DATA_DIR)"
}

stop() { stop_daemon Kafka; }

status() {
  local pid port
  port=$(running_port)
  if pid=$(running_pid); then
    if probe "$port"; then
      say "Kafka $KAFKA_VERSION running on 127.0.0.1:$port (pid $pid, data $DATA_DIR)"
      return 0
    fi
    say "Kafka process $pid is up but does not answer on 127.0.0.1:$port (log: $LOG)"
    return 1
  fi
  say "Kafka not running (data dir $DATA_DIR)"
  return 1
}

watch_parent() {
  while alive "$WATCH_PID" && running_pid >/dev/null; do sleep 2; done
  if running_pid >/dev/null; then
    say "watched process $WATCH_PID is gone; stopping the broker"
    stop
  fi
}

case "$cmd" in
  fetch) fetch ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  probe) probe "$PORT" || { say "nothing answers Kafka requests on 127.0.0.1:$PORT"; exit 1; } ;;
  _watch) watch_parent ;;
esac
