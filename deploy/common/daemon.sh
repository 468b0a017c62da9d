# Shared by deploy/kafka/kafka.sh and deploy/redis/redis.sh (sourced, not run): messages,
# port checks, and the pid-file handling of a daemon started from a data dir.
# The sourcing script sets PROG, PID_FILE, ENDPOINT_FILE, PORT and STOP_TIMEOUT, and defines
# running_pid (built on pid_from_file plus its own check of the process).

die() { echo "$PROG: $*" >&2; exit 1; }
say() { echo "$PROG: $*"; }

# The calling script's header comment, as its --help.
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

valid_port() { [[ "$1" =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ] && [ "$1" -le 65535 ]; }

# Alive and not a zombie: our daemons are reparented to init, which may reap them late.
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  [ "$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null)" != "Z" ]
}

# Does something on 127.0.0.1:$1 accept a TCP connection?
port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" >/dev/null 2>&1; }

port_owner() {
  command -v ss >/dev/null 2>&1 || return 0
  ss -Hltnp "sport = :$1" 2>/dev/null | sed -n 's/.*users:((\("[^"]*",pid=[0-9]*\).*/ (held by \1)/p' | head -n 1
}

# The live pid recorded in $PID_FILE, if any; running_pid then checks it is really our daemon,
# so a recycled pid is never signalled.
pid_from_file() {
  [ -f "$PID_FILE" ] || return 1
  local pid
  pid=$(cat "$PID_FILE" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  alive "$pid" || return 1
  echo "$pid"
}

running_port() { [ -f "$ENDPOINT_FILE" ] && cut -d: -f2 "$ENDPOINT_FILE" || echo "$PORT"; }

# stop_daemon NAME: SIGTERM the daemon of this data dir, wait up to $STOP_TIMEOUT s, then
# SIGKILL; stopping one that does not run is a no-op.
stop_daemon() {
  local name=$1 pid
  if ! pid=$(running_pid); then
    rm -f "$PID_FILE"
    say "$name not running (data dir $DATA_DIR)"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + STOP_TIMEOUT))
  while alive "$pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
  if alive "$pid"; then
    say "$name pid $pid ignored SIGTERM for ${STOP_TIMEOUT}s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    while alive "$pid"; do sleep 0.1; done
  fi
  rm -f "$PID_FILE"
  say "$name stopped (pid $pid)"
}
