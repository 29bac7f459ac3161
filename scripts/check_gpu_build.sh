#!/usr/bin/env bash
# CUDA, compiled here: build a pyllama wheel with -DGGML_CUDA=on on a machine that has NVIDIA's
# compiler but not necessarily a GPU, install it into a scratch virtual environment, and check
# that it imports, says "CUDA compiled in, no CUDA device found" (or names the GPU), and
# generates text (on the CPU when there is no GPU).  Prints the build time and the wheel size;
# the last line is the result.  Too slow for every CI run (tens of minutes per architecture on
# 2 cores): its last result is in docs/building.md.
#
#   bash scripts/check_gpu_build.sh                 # one architecture: 90-real (H100/H200)
#   bash scripts/check_gpu_build.sh "89-real"       # another one
#   bash scripts/check_gpu_build.sh default         # the no-GPU default list (cmake/cuda_architectures.cmake)
#
# cuBLAS: when the toolkit has no cublas_v2.h (a toolkit installed from NVIDIA's pip wheels
# has only the compiler and runtime), the matching `nvidia-cublas` wheel is downloaded from the
# package registry into ~/.cache/pyllama/cuda and built against.  The driver library (libcuda)
# is not part of any toolkit wheel: without it the build turns ggml's virtual-memory pool off
# (GGML_CUDA_NO_VMM=ON), which also keeps libcuda out of the extension's link, so it imports on
# a machine without the NVIDIA driver.
set -euo pipefail
cd "$(dirname "$0")/.."
archs="${1:-90-real}"
log() { printf '\n==> %s\n' "$*" >&2; }

# The toolkit: $CUDA_HOME, /usr/local/cuda, or the one the nvcc on PATH belongs to (an nvcc on
# PATH may be a wrapper script outside any toolkit directory).
cuda_root=""
for c in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda \
         "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /nonexistent)")")")"; do
  if [ -n "$c" ] && [ -x "$c/bin/nvcc" ] && [ -e "$c/include/cuda_runtime.h" ]; then cuda_root="$(readlink -f "$c")"; break; fi
done
[ -n "$cuda_root" ] || { echo "check_gpu_build: FAILED: no CUDA toolkit found (nvcc + cuda_runtime.h; set CUDA_HOME)"; exit 1; }
nvcc="$cuda_root/bin/nvcc"
cuda_major="$("$nvcc" --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')"
log "nvcc $nvcc (CUDA $cuda_major), toolkit $cuda_root"

defines=(-Ccmake.define.GGML_CUDA=on "-Ccmake.define.CMAKE_CUDA_COMPILER=$nvcc")
[ "$archs" != default ] && defines+=("-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=$archs")
libpath="$cuda_root/lib64:$cuda_root/lib"

if ! ls "$cuda_root"/include/cublas_v2.h "$cuda_root"/targets/*/include/cublas_v2.h >/dev/null 2>&1; then
  cache="${XDG_CACHE_HOME:-$HOME/.cache}/pyllama/cuda/cublas-$cuda_major"
  if [ ! -e "$cache/nvidia/cu$cuda_major/include/cublas_v2.h" ]; then
    log "cuBLAS from the package registry (nvidia-cublas $cuda_major.*)"
    mkdir -p "$cache"
    python -m pip download -q --no-deps -d "$cache" "nvidia-cublas==$cuda_major.0.*" 2>/dev/null \
      || python -m pip download -q --no-deps -d "$cache" "nvidia-cublas-cu$cuda_major"
    python -m zipfile -e "$cache"/nvidia_cublas*.whl "$cache"
  fi
  cublas="$cache/nvidia/cu$cuda_major"
  export CPATH="$cublas/include${CPATH:+:$CPATH}"
  defines+=("-Ccmake.define.CUDA_cublas_LIBRARY=$cublas/lib/libcublas.so.$cuda_major"
            "-Ccmake.define.CUDA_cublasLt_LIBRARY=$cublas/lib/libcublasLt.so.$cuda_major")
  libpath="$cublas/lib:$libpath"
fi
if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so' && ! ls "$cuda_root"/lib*/stubs/libcuda.so >/dev/null 2>&1; then
  log "no libcuda (NVIDIA driver) here: GGML_CUDA_NO_VMM=ON"
  defines+=(-Ccmake.define.GGML_CUDA_NO_VMM=ON)
fi

python scripts/vendor_llama_cpp.py >/dev/null
tag="$(echo "$archs" | tr -c 'A-Za-z0-9\n' '_')"
out="build/gpu-check/$tag"
rm -rf "$out/dist" && mkdir -p "$out/dist"
log "pip wheel . with ${defines[*]}"
start=$SECONDS
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
  python -m pip wheel . --no-deps --no-build-isolation -w "$out/dist" "-Cbuild-dir=$out/build" "${defines[@]}" \
  > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; echo "check_gpu_build: FAILED: build (log: $out/build.log)"; exit 1; }
build_s=$((SECONDS - start))
wheel="$(ls "$out"/dist/pyllama-*.whl)"
size_mb="$(python -c "import os,sys; print(f'{os.path.getsize(sys.argv[1]) / 2**20:.1f}')" "$wheel")"
log "built in ${build_s}s: $wheel (${size_mb} MiB)"

log "install into a scratch environment and run it"
rm -rf "$out/venv"
python -m venv "$out/venv"      # a clean one: this checkout's editable install must not answer
"$out/venv/bin/python" -m pip install -q "$wheel"
LD_LIBRARY_PATH="$libpath${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" PYLLAMA_CHECK_WHEEL="$wheel" \
  "$out/venv/bin/python" - <<'EOF' 2>&1 | tee "$out/run.log"
import subprocess, warnings
import pyllama
from pyllama import gpu
from pyllama.models import resolve_model

assert "site-packages" in pyllama.__file__, pyllama.__file__
info = pyllama.build_info()
assert info["options"]["GGML_CUDA"].upper() in ("ON", "1", "TRUE"), info["options"]
status = gpu.gpu_status()
print("backends:", [(b["name"], len(b["devices"])) for b in pyllama.backends()])
print("cuda_architectures:", info["cuda_architectures"])
print("gpu_status:", status.summary)
core = pyllama._core.__file__
print("linked:", " ".join(sorted({l.split()[0] for l in subprocess.run(["ldd", core], capture_output=True,
                                  text=True).stdout.splitlines() if "cu" in l.split()[0]})))
assert "CUDA" in status.compiled, status
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    llm = pyllama.LLM(resolve_model("smollm2"), n_gpu_layers=-1, n_ctx=512, verbose=False)
text = llm.complete("The capital of France is", max_tokens=8, temperature=0).text
print("offload:", llm.offload if hasattr(llm, "offload") else "(LLM.offload not available)")
print("text:", repr(text))
assert text.strip(), "no text generated"
if not status.available:
    assert status.summary == "CUDA compiled in, no CUDA device found", status.summary
    assert any("runs on the CPU" in str(w.message) for w in caught), [str(w.message) for w in caught]
llm.close()
print("RUN-OK")
EOF
grep -q RUN-OK "$out/run.log" || { echo "check_gpu_build: FAILED: the installed wheel did not run (see above)"; exit 1; }
echo "check_gpu_build: OK: CUDA $cuda_major, CMAKE_CUDA_ARCHITECTURES=$archs, built in ${build_s}s on $(nproc) CPUs, wheel ${size_mb} MiB, $(grep '^gpu_status:' "$out/run.log" | cut -d' ' -f2-)"
