#!/usr/bin/env bash
# Builds the Dataflow worker image with the pinned Beam and the launcher's Python version.
# Usage: scripts/build_container.sh IMAGE   (e.g. europe-docker.pkg.dev/PROJECT/REPO/embeddings:1)
# then: docker push IMAGE, and run with --sdk_container_image IMAGE --sdk_location container
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
if [ $# -ne 1 ]; then
  echo "usage: $0 IMAGE" >&2
  exit 2
fi
# The launcher's interpreter (run.sh's) decides the image's Python, as Dataflow requires.
python="${PYTHON:-$here/.venv/bin/python}"
[ -x "$python" ] || "$here/scripts/ensure_venv.sh"
read -r -a build_args <<< "$("$python" "$here/pipeline/versions.py" docker-build-args)"
exec docker build "${build_args[@]}" --tag "$1" "$here"
