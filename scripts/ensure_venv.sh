#!/usr/bin/env bash
# Creates .venv in the project and installs the project into it, again only when
# setup.py or the pinned versions change. Usage: scripts/ensure_venv.sh [test]
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
fingerprint=$(cat setup.py pipeline/versions.py | sha256sum | cut -c1-16)
stamp=".venv/.installed-${fingerprint}${extra:+-$extra}"
# The test install holds everything the plain one does: ./run.sh after ./test.sh (or the
# other way round) must not install again.
if [ -f "$stamp" ] || { [ -z "$extra" ] && [ -f ".venv/.installed-${fingerprint}-test" ]; }; then
  exit 0
fi
echo "Setting up .venv (first run, or dependencies changed; takes a few minutes)..." >&2
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet --editable ".${extra:+[$extra]}"
# Stamps of other fingerprints are stale; the other install of this one still holds.
for old in .venv/.installed-*; do
  case "$old" in
    ".venv/.installed-${fingerprint}"|".venv/.installed-${fingerprint}-"*) ;;
    *) rm -f "$old" ;;
  esac
done
touch "$stamp"
