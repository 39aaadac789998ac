#!/usr/bin/env bash
# The test command (README, .ci/run): unit tests, then real-guest tests. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
export PYTHONUNBUFFERED=1
# In CI a missing capability (no QEMU, no kernel) must fail, not skip.
[ "${CI:-}" = "true" ] && export VMSIGHT_REQUIRE_ALL=1
exec .venv/bin/pytest -p no:cacheprovider -q "$@" tests
