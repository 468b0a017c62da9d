#!/usr/bin/env bash
# Install the tools that check the deployment files (tests/unit/test_deploy_files.py,
# tests/integration/test_prometheus.py):
#
#   deploy/tools.sh            install what is missing (idempotent, a few seconds when done)
#   deploy/tools.sh --print    print the tools venv's path
#
# - Debian's `prometheus` package: the prometheus server and promtool (deploy/prometheus/install.sh)
# - a small virtualenv, .run/deploy-tools (kept out of the project's .venv), with
#   PyYAML, check-jsonschema (validates deploy/compose.yaml against the Compose Specification
#   schema it vendors) and kubernetes-validate (validates deploy/k8s/ against the schemas of a
#   Kubernetes release). Pinned below; the venv is rebuilt when the pins change.
#
# Needs python3.11 with venv and access to PyPI; prometheus needs apt-get (root or sudo).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
PYTHON=${PYTHON:-python3.11}
TOOLS=${STREAMREC_DEPLOY_TOOLS:-$ROOT/.run/deploy-tools}
PINS="PyYAML==6.0.3 check-jsonschema==0.39.0 kubernetes-validate==1.37.0"
PROG="deploy/tools.sh"
die() { echo "$PROG: $*" >&2; exit 1; }

if [ "${1:-}" = "--print" ]; then echo "$TOOLS"; exit 0; fi
[ $# -eq 0 ] || die "unknown argument '$1' (usage: deploy/tools.sh [--print])"

bash "$HERE/prometheus/install.sh"

stamp="$TOOLS/.pins"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$PINS" ] && [ -x "$TOOLS/bin/kubernetes-validate" ]; then
  echo "$PROG: deploy tools ready in $TOOLS"
  exit 0
fi
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (the tools venv needs it)"
mkdir -p "$ROOT/.run"
exec 9>"$ROOT/.run/deploy-tools.lock"
flock 9
rm -rf "$TOOLS"
"$PYTHON" -m venv "$TOOLS" || die "could not create $TOOLS (Debian: apt-get install python3.11-venv)"
# shellcheck disable=SC2086
"$TOOLS/bin/python" -m pip install -q --disable-pip-version-check $PINS \
  || die "pip install $PINS failed"
echo "$PINS" >"$stamp"
echo "$PROG: installed $PINS in $TOOLS"
