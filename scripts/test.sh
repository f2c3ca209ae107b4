#!/usr/bin/env bash
# Set up (with test extras) and run the whole test suite: lint, then pytest. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
.venv/bin/ruff check .
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=25 "$@"
rc=$?
set -e
# pytest's 5 means "no tests collected": that is a failure of the suite, not a pass.
exit $rc
