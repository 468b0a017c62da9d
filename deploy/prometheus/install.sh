#!/usr/bin/env bash
# Install Debian's Prometheus server and promtool when they are missing.
#
#   deploy/prometheus/install.sh
#
# The tests need `promtool` (check config, check rules, test rules) and the `prometheus`
# binary (tests/integration/test_prometheus.py starts one on a free loopback port).
# Debian 12 ships both in the `prometheus` package (2.42). The packaged service is kept
# from starting (it would hold :9090); the tests start their own. Running it twice is
# harmless. Log: .run/prometheus-install.log
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PROG="prometheus/install.sh"
die() { echo "$PROG: $*" >&2; exit 1; }
say() { echo "$PROG: $*"; }

have() { command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; }

if have; then
  say "prometheus already installed ($(promtool --version 2>&1 | sed -n 's/^promtool, version \([^ ]*\).*/\1/p'))"
  exit 0
fi
command -v apt-get >/dev/null 2>&1 \
  || die "prometheus/promtool are missing and apt-get is not available: install Prometheus 2.x by hand (both binaries on PATH)"
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || die "prometheus is missing: run 'apt-get install --no-install-recommends prometheus' as root"
  sudo="sudo -n"
fi
export DEBIAN_FRONTEND=noninteractive
mkdir -p "$ROOT/.run"
log="$ROOT/.run/prometheus-install.log"
exec 8>"$ROOT/.run/prometheus-install.lock"
flock 8
have && { say "installed meanwhile by another process"; exit 0; }
say "installing Debian's prometheus with apt-get (log: $log) ..."
if [ -z "$(apt-cache policy prometheus 2>/dev/null | sed -n 's/ *Candidate: //p' | grep -v none)" ]; then
  $sudo apt-get update -q >"$log" 2>&1 || { tail -n 15 "$log" >&2; die "apt-get update failed (log: $log)"; }
fi
# policy-rc.d exit 101 = "action forbidden": the packaged service must not start on :9090.
made_policy=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
  $sudo chmod 755 /usr/sbin/policy-rc.d
  made_policy=1
fi
rc=0
$sudo apt-get install -y -q --no-install-recommends prometheus >>"$log" 2>&1 || rc=$?
[ -n "$made_policy" ] && $sudo rm -f /usr/sbin/policy-rc.d
if [ "$rc" -ne 0 ]; then
  tail -n 15 "$log" >&2
  die "apt-get install prometheus failed (log: $log)"
fi
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  $sudo systemctl disable --now prometheus >>"$log" 2>&1 || true
fi
have || die "apt-get installed prometheus but prometheus/promtool are not on PATH"
say "installed $(prometheus --version 2>&1 | head -n 1)"
