#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build pyllama with CUDA for that GPU, run the GPU test tier
# (gpu_tests/) on it, and benchmark pyllama against llama.cpp's own tools (llama-bench,
# llama-batched-bench, llama-server) with every layer on the GPU.  The last line of each phase
# is its result; logs and JSON go to build/gpu-check/device/.
#
#   bash scripts/gpu_check.sh                 # build, tier, bench
#   bash scripts/gpu_check.sh build           # one phase: pack | build | tier | bench
#   bash scripts/gpu_check.sh tier -- -k greedy
#
# Phases, so that each fits a 10-minute command on a lent machine (builds are kept in build/):
#   pack   (run HERE, where the package registry is reachable) what a lent GPU machine cannot
#          fetch, in build/device-pack, under 64 MiB (the most that travels with the tree: name
#          it in the device tool's `carry`): the vendored llama.cpp (build and tools parts,
#          tar.xz), two tiny random-weight llama models standing in for the test models (the
#          real ones are 98 and 253 MB), and cp312 wheels of the server's dependencies that the
#          machine's image lacks (fastapi, starlette, uvicorn, pydantic).
#   build  the pyllama wheel (-DGGML_CUDA=on, CMAKE_CUDA_ARCHITECTURES = this GPU's compute
#          capability, "-real") and llama.cpp's tools from the same vendored tree with the same
#          flags (benchmarks/setup_native.sh, NATIVE_CMAKE_ARGS, in benchmarks/.cache/native-cuda);
#          installs the wheel (into a venv where pip can fetch; offline, with --target into
#          build/gpu-check/device/site, beside the image's own packages)
#   tier   pytest gpu_tests/ (CPU reference in a subprocess with the GPU hidden); with a device
#          pack, on the tiny stand-in models (PYLLAMA_GPU_TIER_MODELS)
#   bench  benchmarks/run.py pp/tg/batched --ngl 99 and benchmarks/server_bench.py --ngl 99,
#          pyllama against the native tools, interleaved, medians (benchmarks/README.md); needs
#          the real test models (cached, or fetchable)
#
# On a lent machine: `bash scripts/gpu_check.sh pack` here, then one device call with
# carry=["build/device-pack"] running `bash scripts/gpu_check.sh build && bash scripts/gpu_check.sh tier`.
set -euo pipefail
cd "$(dirname "$0")/.."
phase="${1:-all}"
[ $# -gt 0 ] && shift
[ "${1:-}" = "--" ] && shift
extra=("$@")
out="build/gpu-check/device"
pack="build/device-pack"
native_dir="$PWD/benchmarks/.cache/native-cuda"
jobs="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
py="$(command -v python3 || command -v python)"
log() { printf '\n==> %s\n' "$*" >&2; }
fail() { echo "gpu_check: FAILED: $*"; exit 1; }

do_pack() {
  rm -rf "$pack" && mkdir -p "$pack/models" "$pack/wheels"
  "$py" scripts/vendor_llama_cpp.py --with tools --with vocab >/dev/null
  log "vendored llama.cpp (build + tools parts) -> $pack/vendor-llama.cpp.tar.xz"
  tar -C vendor -cJf "$pack/vendor-llama.cpp.tar.xz" --exclude='llama.cpp/models' llama.cpp
  log "tiny stand-in models"
  "$py" scripts/make_tier_models.py "$pack/models"
  log "cp312 wheels the machine's image lacks (the server's)"
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$pack/wheels" fastapi starlette uvicorn pydantic pydantic-core annotated-types typing-inspection
  local size
  size="$(du -sm "$pack" | cut -f1)"
  [ "$size" -lt 60 ] || fail "the pack is ${size} MiB: more than travels (64 MiB with the tree)"
  echo "gpu_check: pack OK: $pack, ${size} MiB (device tool: carry=[\"$pack\"])"
}

if [ "$phase" = pack ]; then
  do_pack
  exit 0
fi

# A device pack travelled here: unpack what the offline machine needs.
offline=0
if [ -d "$pack" ]; then
  offline=1
  if [ ! -e vendor/llama.cpp/CMakeLists.txt ]; then
    log "vendored llama.cpp from $pack"
    mkdir -p vendor && tar -C vendor -xJf "$pack/vendor-llama.cpp.tar.xz"
  fi
  export PYLLAMA_GPU_TIER_MODELS="$PWD/$pack/models"
fi

command -v nvidia-smi >/dev/null || fail "no nvidia-smi: this script needs an NVIDIA GPU and driver"
gpu_name="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '. ')"
[ -n "$cap" ] || fail "nvidia-smi did not report a compute capability"
arch="${cap}-real"
nvcc="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)"
[ -x "$nvcc" ] || fail "no nvcc (install the CUDA toolkit or put it on PATH)"
mkdir -p "$out"
log "$gpu_name, compute capability $cap -> CMAKE_CUDA_ARCHITECTURES=$arch; nvcc $nvcc; python $py"

run_py() {   # the interpreter (and packages) the tier and the benchmarks use
  if [ -x "$out/venv/bin/python" ]; then "$out/venv/bin/python" "$@"; else PYTHONPATH="$PWD/$out/site" "$py" "$@"; fi
}

do_build() {
  [ "$offline" = 1 ] || "$py" scripts/vendor_llama_cpp.py >/dev/null
  rm -rf "$out/dist" && mkdir -p "$out/dist"
  log "pyllama wheel with CUDA ($arch)"
  local start=$SECONDS
  CMAKE_BUILD_PARALLEL_LEVEL="$jobs" "$py" -m pip wheel . --no-deps --no-build-isolation -w "$out/dist" \
    "-Cbuild-dir=$out/build" -Ccmake.define.GGML_CUDA=on "-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=$arch" \
    "-Ccmake.define.CMAKE_CUDA_COMPILER=$nvcc" > "$out/build.log" 2>&1 \
    || { tail -40 "$out/build.log"; fail "pyllama build (log: $out/build.log)"; }
  local wheel_s=$((SECONDS - start))
  rm -rf "$out/venv" "$out/site"
  if [ "$offline" = 1 ]; then
    # Nothing can be fetched: the image's packages (numpy, jinja2, pytest, httpx ...) plus the
    # pack's wheels and pyllama's, installed into one folder that run_py puts on PYTHONPATH.
    "$py" -m pip install -q --no-index --no-deps --no-compile --target "$out/site" "$pack"/wheels/*.whl \
      "$(ls "$out"/dist/pyllama-*.whl)"
  else
    "$py" -m venv "$out/venv"
    "$out/venv/bin/python" -m pip install -q "$(ls "$out"/dist/pyllama-*.whl)[server]" pytest httpx numpy
  fi
  if [ "$offline" = 1 ]; then
    # The benchmarks need the real models, which a device pack cannot carry: no native tools.
    echo "gpu_check: build OK: wheel in ${wheel_s}s (device pack: native tools skipped, no bench here)"
    return
  fi
  log "llama.cpp's tools with CUDA ($arch)"
  start=$SECONDS
  NATIVE_BUILD_DIR="$native_dir" NATIVE_JOBS="$jobs" PYTHON="$py" \
    NATIVE_CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$arch -DCMAKE_CUDA_COMPILER=$nvcc" \
    bash benchmarks/setup_native.sh > "$out/native.log" 2>&1 || { tail -40 "$out/native.log"; fail "native build"; }
  echo "gpu_check: build OK: wheel in ${wheel_s}s, native tools in $((SECONDS - start))s ($jobs jobs)"
}

do_tier() {
  [ -x "$out/venv/bin/python" ] || [ -d "$out/site" ] || fail "run the build phase first"
  run_py -c "from pyllama import gpu; s = gpu.gpu_status(); print(s.summary); assert s.available"
  set +e
  run_py -m pytest -p no:cacheprovider -rA -q gpu_tests "${extra[@]}" 2>&1 | tee "$out/tier.log"
  local rc=${PIPESTATUS[0]}
  set -e
  [ "$rc" = 0 ] || fail "GPU tier on $gpu_name: $(tail -1 "$out/tier.log")"
  echo "gpu_check: tier OK on $gpu_name: $(tail -1 "$out/tier.log" | tr -d '=')"
}

do_bench() {
  [ -x "$out/venv/bin/python" ] || [ -d "$out/site" ] || fail "run the build phase first"
  run_py -c "from pyllama.models import resolve_model as r; r('smollm2'); r('gemma3')" \
    || fail "the benchmarks need the real test models (cached in ~/.cache/pyllama/models, or fetchable)"
  log "pp / tg / batched, every layer on the GPU"
  NATIVE_BUILD_DIR="$native_dir" run_py benchmarks/run.py --models smollm2,gemma3 --only pp,tg,batched \
    --ngl 99 --reps 3 --skip-lcp --no-setup --no-md --json "$out/bench.json" 2>&1 | tee "$out/bench.txt"
  log "server, every layer on the GPU"
  local model
  model="$(run_py -c "from pyllama.models import resolve_model; print(resolve_model('smollm2'))")"
  run_py benchmarks/server_bench.py -m "$model" --clients 1 8 32 --ngl 99 --threads 4 --reps 3 \
    --servers pyllama llama-server --no-cache-test --llama-server "$native_dir/bin/llama-server" \
    --json "$out/server.json" 2>&1 | tee "$out/server.txt"
  echo "gpu_check: bench done on $gpu_name: $out/bench.txt, $out/server.txt"
}

case "$phase" in
  build) do_build ;;
  tier) do_tier ;;
  bench) do_bench ;;
  all) do_build; do_tier; do_bench ;;
  *) echo "usage: $0 [pack|build|tier|bench|all] [-- pytest args]" >&2; exit 2 ;;
esac
