#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build pyllama with CUDA for that GPU, run the GPU test tier
# (gpu_tests/) on it, and benchmark pyllama against llama.cpp's own tools (llama-bench,
# llama-batched-bench, llama-server) with every layer on the GPU.  The last line of each phase
# is its result; logs and JSON go to build/gpu-check/device/.
#
#   bash scripts/gpu_check.sh                 # all phases
#   bash scripts/gpu_check.sh build           # one phase: build | tier | bench
#   bash scripts/gpu_check.sh tier -- -k greedy
#
# Phases, so that each fits a 10-minute command on a lent machine (builds are kept in build/):
#   build  the pyllama wheel (-DGGML_CUDA=on, CMAKE_CUDA_ARCHITECTURES = this GPU's compute
#          capability, "-real") and llama.cpp's tools from the same vendored tree with the same
#          flags (benchmarks/setup_native.sh, NATIVE_CMAKE_ARGS, in benchmarks/.cache/native-cuda);
#          installs the wheel into build/gpu-check/device/venv
#   tier   pytest gpu_tests/ with that venv (CPU reference in a subprocess with the GPU hidden)
#   bench  benchmarks/run.py pp/tg/batched --ngl 99 and benchmarks/server_bench.py --ngl 99,
#          pyllama against the native tools, interleaved, medians (benchmarks/README.md)
set -euo pipefail
cd "$(dirname "$0")/.."
phase="${1:-all}"
[ $# -gt 0 ] && shift
[ "${1:-}" = "--" ] && shift
extra=("$@")
out="build/gpu-check/device"
native_dir="$PWD/benchmarks/.cache/native-cuda"
jobs="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
log() { printf '\n==> %s\n' "$*" >&2; }
fail() { echo "gpu_check: FAILED: $*"; exit 1; }

command -v nvidia-smi >/dev/null || fail "no nvidia-smi: this script needs an NVIDIA GPU and driver"
gpu_name="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '. ')"
[ -n "$cap" ] || fail "nvidia-smi did not report a compute capability"
arch="${cap}-real"
nvcc="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)"
[ -x "$nvcc" ] || fail "no nvcc (install the CUDA toolkit or put it on PATH)"
mkdir -p "$out"
log "$gpu_name, compute capability $cap -> CMAKE_CUDA_ARCHITECTURES=$arch; nvcc $nvcc"

do_build() {
  python scripts/vendor_llama_cpp.py >/dev/null
  rm -rf "$out/dist" && mkdir -p "$out/dist"
  log "pyllama wheel with CUDA ($arch)"
  local start=$SECONDS
  CMAKE_BUILD_PARALLEL_LEVEL="$jobs" python -m pip wheel . --no-deps --no-build-isolation -w "$out/dist" \
    "-Cbuild-dir=$out/build" -Ccmake.define.GGML_CUDA=on "-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=$arch" \
    "-Ccmake.define.CMAKE_CUDA_COMPILER=$nvcc" > "$out/build.log" 2>&1 \
    || { tail -40 "$out/build.log"; fail "pyllama build (log: $out/build.log)"; }
  local wheel_s=$((SECONDS - start))
  rm -rf "$out/venv"
  python -m venv "$out/venv"
  "$out/venv/bin/python" -m pip install -q "$(ls "$out"/dist/pyllama-*.whl)[server]" pytest httpx numpy
  log "llama.cpp's tools with CUDA ($arch)"
  start=$SECONDS
  NATIVE_BUILD_DIR="$native_dir" NATIVE_JOBS="$jobs" PYTHON="$out/venv/bin/python" \
    NATIVE_CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$arch -DCMAKE_CUDA_COMPILER=$nvcc" \
    bash benchmarks/setup_native.sh > "$out/native.log" 2>&1 || { tail -40 "$out/native.log"; fail "native build"; }
  echo "gpu_check: build OK: wheel in ${wheel_s}s, native tools in $((SECONDS - start))s ($jobs jobs)"
}

do_tier() {
  [ -x "$out/venv/bin/python" ] || fail "run the build phase first"
  "$out/venv/bin/python" -c "from pyllama import gpu; s = gpu.gpu_status(); print(s.summary); assert s.available"
  set +e
  "$out/venv/bin/python" -m pytest -p no:cacheprovider -rA -q gpu_tests "${extra[@]}" 2>&1 | tee "$out/tier.log"
  local rc=${PIPESTATUS[0]}
  set -e
  [ "$rc" = 0 ] || fail "GPU tier on $gpu_name: $(tail -1 "$out/tier.log")"
  echo "gpu_check: tier OK on $gpu_name: $(tail -1 "$out/tier.log" | tr -d '=')"
}

do_bench() {
  [ -x "$out/venv/bin/python" ] || fail "run the build phase first"
  local py="$out/venv/bin/python"
  "$py" -m pyllama pull smollm2 >/dev/null 2>&1 || true
  log "pp / tg / batched, every layer on the GPU"
  NATIVE_BUILD_DIR="$native_dir" "$py" benchmarks/run.py --models smollm2,gemma3 --only pp,tg,batched \
    --ngl 99 --reps 3 --skip-lcp --no-setup --no-md --json "$out/bench.json" 2>&1 | tee "$out/bench.txt"
  log "server, every layer on the GPU"
  local model
  model="$("$py" -c "from pyllama.models import resolve_model; print(resolve_model('smollm2'))")"
  "$py" benchmarks/server_bench.py -m "$model" --clients 1 8 32 --ngl 99 --threads 4 --reps 3 \
    --servers pyllama llama-server --no-cache-test --llama-server "$native_dir/bin/llama-server" \
    --json "$out/server.json" 2>&1 | tee "$out/server.txt"
  echo "gpu_check: bench done on $gpu_name: $out/bench.txt, $out/server.txt"
}

case "$phase" in
  build) do_build ;;
  tier) do_tier ;;
  bench) do_bench ;;
  all) do_build; do_tier; do_bench ;;
  *) echo "usage: $0 [build|tier|bench|all] [-- pytest args]" >&2; exit 2 ;;
esac
