#!/usr/bin/env bash
# Fast development loop: incremental editable build in build/dev (ccache + a persistent
# build dir make a .pyx edit a ~20 s rebuild).  A lock keeps two builds from racing.
set -euo pipefail
cd "$(dirname "$0")/.."
exec flock /tmp/pyllama-dev-build.lock \
  python -m pip install --no-build-isolation --no-deps -Cbuild-dir=build/dev -e . "$@"
