#!/usr/bin/env bash
# Sets up .venv with the test tools if needed, then runs the whole test suite.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
"$here/scripts/ensure_venv.sh" test
"$here/scripts/ensure_chromium.sh"
cd "$here"
exec .venv/bin/python -m pytest -q "$@"
