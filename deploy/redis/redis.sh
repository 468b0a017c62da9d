#!/usr/bin/env bash
# Local Redis server for streamrec: Debian's redis-server, our own config, on 127.0.0.1.
#
#   deploy/redis/redis.sh [options] install|start|stop|status
#
#   install  apt-get install redis-server when it is missing (non-interactive; runs
#            apt-get update first when the package lists do not know it). Debian's own
#            service instance is kept from starting, so it never holds our port.
#   start    install if needed, start redis-server with deploy/redis/redis.conf on the
#            chosen port (daemonized, AOF on, data under the data dir), wait until PING
#            answers. Starting a server that already runs from the same data dir is a no-op.
#   stop     SIGTERM by its pid (Redis saves and exits), wait, SIGKILL if it hangs.
#            Stopping a server that does not run is a no-op.
#   status   exit 0 when the server of this data dir runs and answers PING, 1 otherwise
#
# Options (environment variable in brackets, default after it):
#   --port N         [REDIS_PORT, 6379]
#   --data-dir DIR   AOF/RDB files, log and pid [REDIS_DATA_DIR, <repo>/.run/redis]
#   REDIS_START_TIMEOUT (30 s), REDIS_STOP_TIMEOUT (30 s)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CONF="$HERE/redis.conf"

PORT=${REDIS_PORT:-6379}
DATA_DIR=${REDIS_DATA_DIR:-$ROOT/.run/redis}
START_TIMEOUT=${REDIS_START_TIMEOUT:-30}
STOP_TIMEOUT=${REDIS_STOP_TIMEOUT:-30}

PROG="redis.sh"
# shellcheck source=../common/daemon.sh
. "$HERE/../common/daemon.sh"

cmd=""
while [ $# -gt 0 ]; do
  case "$1" in
    --port) PORT=${2:?--port needs a value}; shift 2 ;;
    --port=*) PORT=${1#*=}; shift ;;
    --data-dir) DATA_DIR=${2:?--data-dir needs a value}; shift 2 ;;
    --data-dir=*) DATA_DIR=${1#*=}; shift ;;
    -h|--help|help) usage; exit 0 ;;
    install|start|stop|status) [ -z "$cmd" ] || die "one command at a time"; cmd=$1; shift ;;
    *) die "unknown argument '$1' (try --help)" ;;
  esac
done
[ -n "$cmd" ] || { usage >&2; exit 2; }
valid_port "$PORT" || die "--port must be a TCP port number, got '$PORT'"

REDIS_SERVER=$(command -v redis-server || true)
[ -n "$REDIS_SERVER" ] || { [ -x /usr/bin/redis-server ] && REDIS_SERVER=/usr/bin/redis-server; } || true

install() {
  if [ -n "$REDIS_SERVER" ] && command -v redis-cli >/dev/null 2>&1; then
    say "redis-server already installed ($("$REDIS_SERVER" --version | sed -n 's/.*v=\([^ ]*\).*/\1/p'))"
    return 0
  fi
  command -v apt-get >/dev/null 2>&1 \
    || die "redis-server is missing and apt-get is not available: install Redis 7 (redis-server, redis-cli) by hand"
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "redis-server is missing: run 'apt-get install redis-server' as root"
    sudo="sudo -n"
  fi
  export DEBIAN_FRONTEND=noninteractive
  mkdir -p "$ROOT/.run"
  local log="$ROOT/.run/redis-install.log"
  # One install at a time (dpkg has its own lock, but a clear wait is nicer than its error).
  exec 8>"$ROOT/.run/redis-install.lock"
  flock 8
  say "installing Debian's redis-server with apt-get (log: $log) ..."
  if ! apt-cache show redis-server >/dev/null 2>&1 || [ -z "$(apt-cache policy redis-server | sed -n 's/ *Candidate: //p' | grep -v none)" ]; then
    $sudo apt-get update -q >"$log" 2>&1 || { tail -n 15 "$log" >&2; die "apt-get update failed (log: $log)"; }
  fi
  # Keep Debian's packaged service (redis-server on 6379) from being started by the install:
  # policy-rc.d exit 101 = "action forbidden" for invoke-rc.d. Ours is started by this script.
  local made_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
    $sudo chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  local rc=0
  $sudo apt-get install -y -q --no-install-recommends redis-server >>"$log" 2>&1 || rc=$?
  [ -n "$made_policy" ] && $sudo rm -f /usr/sbin/policy-rc.d
  if [ "$rc" -ne 0 ]; then
    tail -n 15 "$log" >&2
    die "apt-get install redis-server failed (log: $log)"
  fi
  # Where systemd runs, the unit may still be enabled or started: disable it (we never use it).
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    $sudo systemctl disable --now redis-server >>"$log" 2>&1 || true
  fi
  flock -u 8
  REDIS_SERVER=$(command -v redis-server || echo /usr/bin/redis-server)
  say "installed redis-server $("$REDIS_SERVER" --version | sed -n 's/.*v=\([^ ]*\).*/\1/p')"
}

# absolute, without creating it: only `start` makes the data dir
case "$DATA_DIR" in /*) ;; *) DATA_DIR="$PWD/$DATA_DIR" ;; esac
DATA_DIR=$(realpath -m "$DATA_DIR")
PID_FILE="$DATA_DIR/redis.pid"
LOG="$DATA_DIR/redis.log"
ENDPOINT_FILE="$DATA_DIR/endpoint"

ping() { [ "$(timeout 3 redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null)" = "PONG" ]; }

# The pid of the server that runs from this data dir, if any (checked against the process, so
# a recycled pid is never signalled; redis rewrites its title, so check the executable and
# the working directory, which is its `dir`).
running_pid() {
  local pid
  pid=$(pid_from_file) || return 1
  [ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" = "$DATA_DIR" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'redis-server' || return 1
  echo "$pid"
}

start() {
  local pid
  if pid=$(running_pid); then
    [ "$(running_port)" = "$PORT" ] \
      || die "a Redis from $DATA_DIR already runs on port $(running_port) (pid $pid), not $PORT: stop it first"
    if ping "$PORT"; then
      say "Redis already running on 127.0.0.1:$PORT (pid $pid)"
      return 0
    fi
  else
    rm -f "$PID_FILE"
    if port_open "$PORT"; then
      die "port $PORT on 127.0.0.1 is already in use by another process$(port_owner "$PORT"): choose another with REDIS_PORT=... (or --port)"
    fi
    [ -n "$REDIS_SERVER" ] && command -v redis-cli >/dev/null 2>&1 || install
    mkdir -p "$DATA_DIR"
    [ -f "$LOG" ] && mv -f "$LOG" "$LOG.1"
    # daemonize yes (redis.conf): redis-server forks, writes the pid file and returns
    if ! "$REDIS_SERVER" "$CONF" --port "$PORT" --dir "$DATA_DIR" \
        --pidfile "$PID_FILE" --logfile "$LOG" >"$DATA_DIR/start.out" 2>&1; then
      cat "$DATA_DIR/start.out" >&2
      tail -n 15 "$LOG" >&2 2>/dev/null || true
      die "redis-server did not start (log: $LOG)"
    fi
    echo "127.0.0.1:$PORT" >"$ENDPOINT_FILE"
  fi
  local t0=$SECONDS deadline=$((SECONDS + START_TIMEOUT))
  until ping "$PORT"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      tail -n 15 "$LOG" >&2 || true
      stop >/dev/null 2>&1 || true
      die "Redis did not answer PING on 127.0.0.1:$PORT within ${START_TIMEOUT}s (log: $LOG)"
    fi
    sleep 0.1
  done
  pid=$(running_pid) || { tail -n 15 "$LOG" >&2 || true; die "Redis answers on $PORT but wrote no pid file in $DATA_DIR (log: $LOG)"; }
  say "Redis $("$REDIS_SERVER" --version | sed -n 's/.*v=\([^ ]*\).*/\1/p') ready on 127.0.0.1:$PORT in $((SECONDS - t0)) s (pid $pid, data $DATA_DIR)"
}

stop() { stop_daemon Redis; }

status() {
  local pid port
  port=$(running_port)
  if pid=$(running_pid); then
    if ping "$port"; then
      say "Redis running on 127.0.0.1:$port (pid $pid, data $DATA_DIR)"
      return 0
    fi
    say "Redis process $pid is up but does not answer PING on 127.0.0.1:$port (log: $LOG)"
    return 1
  fi
  say "Redis not running (data dir $DATA_DIR)"
  return 1
}

case "$cmd" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
esac
