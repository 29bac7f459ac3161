#!/usr/bin/env bash
# Build llama-cpp-python 0.3.36 from source into benchmarks/.cache/venv-lcp (the
# "llama-cpp-python" contender of the benchmark harness). Cached: does nothing when the
# venv already imports llama_cpp at that version. About 7 minutes on 2 cores.
#
#   bash benchmarks/setup_llama_cpp_python.sh            # build (or reuse)
#   LCP_FORCE=1 bash benchmarks/setup_llama_cpp_python.sh  # rebuild
#
# Build flags: GGML_NATIVE=ON (same as pyllama's default build), Release (scikit-build-core's default), CPU only.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
VENV="${LCP_VENV:-$HERE/.cache/venv-lcp}"
VERSION="0.3.36"
SHA256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
ARCHIVE_CACHE="${PYLLAMA_ARCHIVE_DIR:-$HOME/.cache/pyllama/archives}/llama_cpp_python-$VERSION.tar.gz"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
JOBS="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"

if [[ -z "${LCP_FORCE:-}" && -x "$VENV/bin/python" && -f "$VENV/.pyllama-cmake-args" ]] && \
   [[ "$(cat "$VENV/.pyllama-cmake-args")" == "$(python3 -c "import pyllama; print(pyllama.build_info().get('amx'))" 2>/dev/null)" ]] && \
   "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
    echo "llama-cpp-python $VERSION already built in $VENV"
    exit 0
fi

echo "building llama-cpp-python $VERSION into $VENV (this takes several minutes)"
start=$(date +%s)
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip

SRC="llama-cpp-python==$VERSION"
if [[ -f "$ARCHIVE_CACHE" ]] && echo "$SHA256  $ARCHIVE_CACHE" | sha256sum -c --quiet - 2>/dev/null; then
    SRC="$ARCHIVE_CACHE"       # same archive pyllama vendors from; pip installs the file directly
    echo "using cached source archive $ARCHIVE_CACHE"
fi

# Without AMX exactly when pyllama's build is (see setup_native.sh and cmake/amx.cmake):
# llama-cpp-python's own build would otherwise crash at the first decode on AMX CPUs with GCC 12.
AMX_OFF="$(python3 -c "import pyllama; print(pyllama.build_info().get('amx') == 'OFF')" 2>/dev/null || echo False)"
AMX_ARGS=""
[[ "$AMX_OFF" == "True" ]] && AMX_ARGS="-DCMAKE_C_FLAGS=-mno-amx-tile\ -mno-amx-int8\ -mno-amx-bf16 -DCMAKE_CXX_FLAGS=-mno-amx-tile\ -mno-amx-int8\ -mno-amx-bf16"
export CMAKE_ARGS="-DGGML_NATIVE=ON $AMX_ARGS ${LCP_CMAKE_ARGS:-}"   # scikit-build-core builds Release
export CMAKE_BUILD_PARALLEL_LEVEL="$JOBS"
nice -n 19 "$VENV/bin/python" -m pip install -v --no-binary llama-cpp-python "$SRC"
"$VENV/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, 'OK')"
python3 -c "import pyllama; print(pyllama.build_info().get('amx'))" >"$VENV/.pyllama-cmake-args" 2>/dev/null || true
echo "llama-cpp-python built in $(( $(date +%s) - start )) s"
