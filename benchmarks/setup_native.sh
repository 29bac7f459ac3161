#!/usr/bin/env bash
# Build llama.cpp's own tools (the "native" contender of the benchmark harness) from the
# SAME vendored tree pyllama builds against, with the same flags as pyllama's default
# source build: Release, GGML_NATIVE=ON, static libraries, position-independent code
# (pyllama links llama.cpp into a Python extension, so it must be PIC), GGML_RPC=ON.
#
#   bash benchmarks/setup_native.sh           # build (or reuse) benchmarks/.cache/native/bin/*
#   NATIVE_FORCE=1 bash benchmarks/setup_native.sh
#   NATIVE_BUILD_DIR=benchmarks/.cache/native-cuda NATIVE_CMAKE_ARGS="-DGGML_CUDA=on" \
#       bash benchmarks/setup_native.sh   # a GPU build in its own directory (run.py and
#                                         # server_bench.py take the tools from the same variable)
#
# NATIVE_CMAKE_ARGS: extra CMake flags (split on whitespace) after the ones below; they are part
# of the cache key, so a CUDA build never reuses a CPU build (and a changed flag set configures
# from a fresh CMakeCache.txt, so a flag dropped from it is really gone).  NATIVE_BUILD_DIR: the
# build directory (default benchmarks/.cache/native; the tools land in its bin/).  NATIVE_JOBS:
# parallel compile jobs (default 2).
#
# Targets: llama-bench, llama-batched-bench, llama-simple, llama-completion, ggml-rpc-server,
# llama-server (the server benchmark, benchmarks/server_bench.py; built without its web UI:
# LLAMA_BUILD_UI=OFF and no prebuilt-UI download), and load_time (benchmarks/native/load_time.c: the C API's model load timed around the call).
# Cached: nothing is done when every binary exists, is newer than the vendor tree's marker
# and was configured with the same pin and flags (ninja would be a no-op anyway).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
BUILD="${NATIVE_BUILD_DIR:-$HERE/.cache/native}"
[[ "$BUILD" == /* ]] || BUILD="$PWD/$BUILD"   # as run.py resolves it (from the same directory)
VENDOR="$ROOT/vendor/llama.cpp"
MARKER="$VENDOR/.pyllama-vendor.json"
PY="${PYTHON:-python3}"
JOBS="${NATIVE_JOBS:-2}"
TARGETS=(llama-bench llama-batched-bench llama-simple llama-completion ggml-rpc-server llama-server)

# ggml's AMX kernels: off exactly when pyllama's build turned them off (cmake/amx.cmake: GCC 12's
# AMX intrinsics miscompile them and the first decode crashes).  GCC lets these explicit
# -mno-amx-* flags win over the -march=native that ggml adds later.
AMX_OFF="$("$PY" -c "import pyllama; print(pyllama.build_info().get('amx') == 'OFF')" 2>/dev/null || echo False)"
AMX_CFLAGS=""
[[ "$AMX_OFF" == "True" ]] && AMX_CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"

CMAKE_FLAGS=(
    -G Ninja
    "-DCMAKE_C_FLAGS=$AMX_CFLAGS"
    "-DCMAKE_CXX_FLAGS=$AMX_CFLAGS"
    -DCMAKE_BUILD_TYPE=Release
    -DGGML_NATIVE=ON
    -DBUILD_SHARED_LIBS=OFF
    -DCMAKE_POSITION_INDEPENDENT_CODE=ON
    -DGGML_RPC=ON
    -DLLAMA_BUILD_COMMON=ON
    -DLLAMA_BUILD_TOOLS=ON
    -DLLAMA_BUILD_EXAMPLES=ON
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_SERVER=ON
    -DLLAMA_BUILD_APP=OFF
    -DLLAMA_BUILD_UI=OFF
    -DLLAMA_USE_PREBUILT_UI=OFF
    -DLLAMA_OPENSSL=OFF
    -DLLAMA_BUILD_IS_DEV=OFF
    -DLLAMA_ALL_WARNINGS=OFF
    -DGGML_ALL_WARNINGS=OFF
)
if [[ -n "${NATIVE_CMAKE_ARGS:-}" ]]; then
    read -r -a EXTRA_CMAKE_FLAGS <<<"$NATIVE_CMAKE_ARGS"
    CMAKE_FLAGS+=("${EXTRA_CMAKE_FLAGS[@]}")
fi

# benchmarks/native/load_time.c: llama_model_load_from_file timed around the call, linked
# against the same static libraries as the tools (see the comment in that file).
# The libraries are the ones CMake links llama-simple with (build.ninja), so that every backend
# of this build (CPU, RPC, CUDA, ...) and its system libraries come along; the fixed CPU + RPC
# list when that cannot be read.
build_load_time() {
    local link_libs link_path
    link_libs="$(ninja_link_var LINK_LIBRARIES)"
    link_path="$(ninja_link_var LINK_PATH)"
    if [[ -n "$link_libs" ]]; then
        local libs=() paths=()
        read -r -a libs <<<"$link_libs"
        [[ -n "$link_path" ]] && read -r -a paths <<<"$link_path"
        (cd "$BUILD" && c++ -O2 -x c "$HERE/native/load_time.c" -I"$VENDOR/include" -I"$VENDOR/ggml/include" \
            -o "$BUILD/bin/load_time" -x none "${paths[@]}" "${libs[@]}" -fopenmp -lpthread -lm -ldl)
        return
    fi
    local libs=("$BUILD/src/libllama.a" "$BUILD/ggml/src/libggml.a" "$BUILD/ggml/src/libggml-cpu.a")
    [[ -f "$BUILD/ggml/src/ggml-rpc/libggml-rpc.a" ]] && libs+=("$BUILD/ggml/src/ggml-rpc/libggml-rpc.a")
    libs+=("$BUILD/ggml/src/libggml-base.a")
    c++ -O2 -x c "$HERE/native/load_time.c" -I"$VENDOR/include" -I"$VENDOR/ggml/include" \
        -o "$BUILD/bin/load_time" -x none "${libs[@]}" -fopenmp -lpthread -lm -ldl
}

# One variable of llama-simple's link step in build.ninja (paths relative to $BUILD), or nothing.
ninja_link_var() {
    [[ -f "$BUILD/build.ninja" ]] || return 0
    awk -v var="  $1 = " '
        /^build bin\/llama-simple:/ { f = 1; next }
        f && /^build / { exit }
        f && index($0, var) == 1 { print substr($0, length(var) + 1); exit }' "$BUILD/build.ninja"
}

# 1. common/ tools/ examples/ next to the library sources (idempotent, same pinned archive).
"$PY" "$ROOT/scripts/vendor_llama_cpp.py" --with tools >/dev/null

# llama-server's CMake runs scripts/ui-assets.cmake (it embeds the web UI, here an empty table).
# Older vendoring scripts did not copy scripts/ with the 'tools' part: take that one file from
# the same pinned archive (sha256-checked) when it is missing.
if [[ ! -f "$VENDOR/scripts/ui-assets.cmake" ]]; then
    "$PY" - "$ROOT" "$VENDOR" <<'PYEOF'
import hashlib, json, os, sys, tarfile
root, vendor = sys.argv[1], sys.argv[2]
pin = json.load(open(os.path.join(root, "vendor", "llama.cpp.pin.json")))
base = os.environ.get("PYLLAMA_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pyllama")
archive = os.path.join(base, "archives", pin["archive"])
with open(archive, "rb") as f:
    if hashlib.sha256(f.read()).hexdigest() != pin["sha256"]:
        sys.exit(f"sha256 mismatch: {archive}")
with tarfile.open(archive) as tf:
    member = next(m for m in tf.getmembers() if m.name.endswith("/vendor/llama.cpp/scripts/ui-assets.cmake"))
    os.makedirs(os.path.join(vendor, "scripts"), exist_ok=True)
    with open(os.path.join(vendor, "scripts", "ui-assets.cmake"), "wb") as out:
        out.write(tf.extractfile(member).read())
PYEOF
fi

# The cache key: the vendored pin and every CMake flag (NATIVE_CMAKE_ARGS included).
stamp_want="$(sha256sum "$MARKER" | cut -d' ' -f1) ${CMAKE_FLAGS[*]}"
stamp_file="$BUILD/.pyllama-native-stamp"
flags_file="$BUILD/.pyllama-native-flags"   # the flags the CMakeCache.txt there was configured with
if [[ -z "${NATIVE_FORCE:-}" && -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp_want" ]]; then
    fresh=1
    for t in "${TARGETS[@]}"; do
        if [[ ! -x "$BUILD/bin/$t" || "$BUILD/bin/$t" -ot "$MARKER" ]]; then fresh=0; fi
    done
    if [[ $fresh == 1 && ! -x "$BUILD/bin/load_time" ]]; then
        build_load_time
    fi
    if [[ $fresh == 1 ]]; then
        echo "native llama.cpp tools up to date in $BUILD/bin"
        exit 0
    fi
fi

start=$(date +%s)
mkdir -p "$BUILD"
# Other flags than the cache there was configured with (or not known): configure from scratch, as
# CMake would keep a cached -DGGML_CUDA=on that is no longer asked for.  Objects are reused
# where their compile commands did not change.
if [[ -f "$BUILD/CMakeCache.txt" && "$(cat "$flags_file" 2>/dev/null)" != "${CMAKE_FLAGS[*]}" ]]; then
    echo "native llama.cpp tools: CMake flags changed, configuring $BUILD from scratch"
    rm -f "$BUILD/CMakeCache.txt"
fi
nice -n 19 cmake -S "$VENDOR" -B "$BUILD" "${CMAKE_FLAGS[@]}" >"$BUILD/configure.log" 2>&1 || {
    tail -40 "$BUILD/configure.log"; echo "configure failed (log: $BUILD/configure.log)"; exit 1; }
echo "${CMAKE_FLAGS[*]}" >"$flags_file"
nice -n 19 cmake --build "$BUILD" -j "$JOBS" --target "${TARGETS[@]}"
build_load_time
echo "$stamp_want" >"$stamp_file"
for t in "${TARGETS[@]}" load_time; do test -x "$BUILD/bin/$t"; done
echo "native llama.cpp tools built in $(( $(date +%s) - start )) s: $BUILD/bin"
