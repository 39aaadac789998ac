#!/usr/bin/env bash
# The test command (README, .ci/run): unit tests, then real-guest tests. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
export PYTHONUNBUFFERED=1
# In CI a missing capability (no QEMU, no kernel) must fail, not skip.
[ "${CI:-}" = "true" ] && export VMSIGHT_REQUIRE_ALL=1
# A guest-agent timeout (serial line to the busybox guest) is retried once and reported as a rerun (R):
# a rare lost line on the emulated UART under heavy TCG load is not what these tests test.
exec .venv/bin/pytest -p no:cacheprovider -q -rR --reruns 1 --only-rerun GuestAgentError "$@" tests
