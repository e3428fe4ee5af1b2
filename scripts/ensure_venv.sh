#!/usr/bin/env bash
# Creates .venv in the project and installs the project into it, again only when
# setup.py or the pinned versions change. Usage: scripts/ensure_venv.sh [test]
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
fingerprint=$(cat setup.py pipeline/versions.py | sha256sum | cut -c1-16)
stamp=".venv/.installed-${fingerprint}${extra:+-$extra}"
if [ ! -f "$stamp" ]; then
  echo "Setting up .venv (first run, or dependencies changed; takes a few minutes)..." >&2
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet --editable ".${extra:+[$extra]}"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
