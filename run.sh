#!/usr/bin/env bash
# Sets up .venv if needed, then runs the embedding job: ./run.sh --input ... --output ...
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
"$here/scripts/ensure_venv.sh"
exec "$here/.venv/bin/python" "$here/run_pipeline.py" "$@"
