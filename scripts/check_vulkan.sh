#!/usr/bin/env bash
# Vulkan, executed: build a pyllama wheel with -DGGML_VULKAN=on, install it into a scratch
# virtual environment and run the GPU test tier (gpu_tests/) on Mesa's llvmpipe, the software
# Vulkan device llama.cpp's own CI uses (job ubuntu-llvmpipe: GGML_VK_VISIBLE_DEVICES=0,
# GGML_VK_DISABLE_F16=1, GGML_VK_DISABLE_COOPMAT=1).  Too slow for every CI run; its last
# result is in docs/building.md.  The last line is the result.
#
#   bash scripts/check_vulkan.sh                   # the system's Mesa (Debian 12: 22.3.6)
#   bash scripts/check_vulkan.sh --backports-mesa  # Mesa 25.0.7 llvmpipe (bookworm-backports, unpacked)
#   bash scripts/check_vulkan.sh -- -k greedy      # extra pytest arguments after --
#
# Debian 12 packages: libvulkan-dev glslc spirv-headers mesa-vulkan-drivers (installed with
# apt-get when missing).  Debian 12's Vulkan headers (1.3.239) are too old for the vendored
# ggml-vulkan (VK_EXT_layer_settings, vk::LayerSettingEXT: headers >= 1.3.261), so Debian 13's
# libvulkan-dev 1.4.309 is fetched into ~/.cache/pyllama/vulkan (sha256-pinned, unpacked, never
# installed over the system's) for its headers only: the system's loader, libvulkan.so.1, is
# what the wheel links and runs.
#
# Mesa 22.3.6's llvmpipe crashes now and then in its own queue thread (SIGSEGV inside
# libvulkan_lvp.so while executing ggml's command buffers) when four sequences decode with
# separate KV streams (kv_unified=False: the batched-engine and server cases), about one run in
# five; Mesa 25.0.7 from bookworm-backports (--backports-mesa, selected with VK_ICD_FILENAMES,
# its libdrm on LD_LIBRARY_PATH) runs that workload 20 times out of 20 but, built against
# Debian 12's LLVM 15, spends more than ten minutes compiling one of Gemma 3's shaders (LLVM's
# coroutine pass).  docs/building.md has the details and the last results of both.
set -euo pipefail
cd "$(dirname "$0")/.."
backports_mesa=0
pytest_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --backports-mesa) backports_mesa=1 ;;
    --) shift; pytest_args=("$@"); break ;;
    *) echo "usage: $0 [--backports-mesa] [-- pytest args]" >&2; exit 2 ;;
  esac
  shift
done
log() { printf '\n==> %s\n' "$*" >&2; }
cache="${XDG_CACHE_HOME:-$HOME/.cache}/pyllama/vulkan"
debian="http://deb.debian.org/debian"

fetch_deb() {   # fetch_deb URL-PATH SHA256 DEST-DIR: download once, verify, unpack
  local path="$1" sha="$2" dest="$3" file
  file="$cache/debs/$(basename "$path")"
  mkdir -p "$cache/debs"
  if [ ! -e "$file" ]; then
    curl -fsSL -m 600 -o "$file.part" "$debian/$path"
    mv "$file.part" "$file"
  fi
  echo "$sha  $file" | sha256sum -c --quiet - || { rm -f "$file"; echo "check_vulkan: FAILED: $file: wrong sha256"; exit 1; }
  dpkg-deb -x "$file" "$dest"
}

need=()
for p in libvulkan-dev glslc spirv-headers mesa-vulkan-drivers; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  log "apt-get install ${need[*]}"
  sudo_="" ; [ "$(id -u)" -ne 0 ] && sudo_="sudo"
  $sudo_ apt-get update -qq && $sudo_ apt-get install -y -qq "${need[@]}"
fi

defines=(-Ccmake.define.GGML_VULKAN=on)
if ! grep -q VK_EXT_layer_settings /usr/include/vulkan/vulkan_core.h 2>/dev/null; then
  headers="$cache/headers-1.4.309"
  if [ ! -e "$headers/usr/include/vulkan/vulkan.hpp" ]; then
    log "Vulkan headers 1.4.309 (Debian 13's libvulkan-dev, headers only)"
    rm -rf "$headers"
    fetch_deb pool/main/v/vulkan-loader/libvulkan-dev_1.4.309.0-1_amd64.deb \
      8d329d465e16168afff58b1bd0dd6db46aac2cc3f56054a481b25a04e90b345a "$headers"
  fi
  defines+=("-Ccmake.define.Vulkan_INCLUDE_DIR=$headers/usr/include")
fi

export GGML_VK_VISIBLE_DEVICES=0 GGML_VK_DISABLE_F16=1 GGML_VK_DISABLE_COOPMAT=1
mesa="system Mesa $(dpkg-query -W -f='${Version}' mesa-vulkan-drivers)"
if [ "$backports_mesa" = 1 ]; then
  root="$cache/mesa-25.0.7/root"
  if [ ! -e "$root/usr/lib/x86_64-linux-gnu/libvulkan_lvp.so" ]; then
    log "Mesa 25.0.7 llvmpipe (bookworm-backports, unpacked into $cache)"
    rm -rf "$root"
    fetch_deb pool/main/m/mesa/mesa-vulkan-drivers_25.0.7-2~bpo12+1_amd64.deb \
      3899f1800424c60a05df5d6913076a526ca8fdbabec43672cd397563d1ca3263 "$root"
    fetch_deb pool/main/libd/libdrm/libdrm2_2.4.123-1~bpo12+1_amd64.deb \
      9cc2f341964286295124a32d3625edb76730500625e54a1e682761f883064d7b "$root"
    fetch_deb pool/main/libd/libdrm/libdrm-amdgpu1_2.4.123-1~bpo12+1_amd64.deb \
      334e2ae389af0e9cb607c2ccfbbf7ae9feb34131ff998550baeffeeae6cda296 "$root"
  fi
  lib="$root/usr/lib/x86_64-linux-gnu"
  printf '{"file_format_version": "1.0.0", "ICD": {"library_path": "%s", "api_version": "1.4.305"}}\n' \
    "$lib/libvulkan_lvp.so" > "$cache/lvp_icd.json"
  export VK_ICD_FILENAMES="$cache/lvp_icd.json" LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  mesa="Mesa 25.0.7 (bookworm-backports)"
fi

python scripts/vendor_llama_cpp.py >/dev/null
out="build/vulkan-check"
rm -rf "$out/dist" && mkdir -p "$out/dist"
log "pip wheel . with ${defines[*]}"
start=$SECONDS
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
  python -m pip wheel . --no-deps --no-build-isolation -w "$out/dist" "-Cbuild-dir=$out/build" "${defines[@]}" \
  > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; echo "check_vulkan: FAILED: build (log: $out/build.log)"; exit 1; }
build_s=$((SECONDS - start))
wheel="$(ls "$out"/dist/pyllama-*.whl)"
size_mb="$(python -c "import os,sys; print(f'{os.path.getsize(sys.argv[1]) / 2**20:.1f}')" "$wheel")"
log "built in ${build_s}s (incremental if $out/build existed): $wheel (${size_mb} MiB)"

log "install into a scratch environment"
rm -rf "$out/venv"
python -m venv "$out/venv"      # a clean one: this checkout's editable install must not answer
"$out/venv/bin/python" -m pip install -q "$wheel[server]" pytest httpx numpy

log "GPU test tier on llvmpipe ($mesa)"
start=$SECONDS
set +e
"$out/venv/bin/python" -m pytest -p no:cacheprovider -rA -q gpu_tests "${pytest_args[@]}" 2>&1 | tee "$out/tier.log"
rc=${PIPESTATUS[0]}
set -e
tier_s=$((SECONDS - start))
summary="$(tail -1 "$out/tier.log" | tr -d '=' | sed 's/^ *//')"
if [ "$rc" != 0 ]; then
  echo "check_vulkan: FAILED: GPU tier on llvmpipe ($mesa): $summary (log: $out/tier.log)"
  exit 1
fi
echo "check_vulkan: OK: GPU tier on llvmpipe ($mesa): $summary in ${tier_s}s; wheel ${size_mb} MiB, built in ${build_s}s on $(nproc) CPUs"
