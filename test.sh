#!/usr/bin/env bash
# Sets up .venv with the test tools if needed, then runs the whole test suite.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
"$here/scripts/ensure_venv.sh" test
"$here/scripts/ensure_chromium.sh"
cd "$here"
# Two test processes: the tests wait on process start-up as much as they compute, so two
# fill two cores (5.5 against 9.5 minutes on a slow day). A fixed 2, not one per core: each
# test's job starts its own worker processes, one per core.
exec .venv/bin/python -m pytest -q -n 2 "$@"
