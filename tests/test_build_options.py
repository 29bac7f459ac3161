"""Build options, checked through real CMake configure runs of the top-level CMakeLists.txt.

Every test here reads the result of one `cmake -S <repo> -B <tmp> -G Ninja` run (configure
and generate, no compile): the cache values in CMakeCache.txt, the messages CMake printed,
and the generated _build_config.py.  All runs happen once, two at a time, in a module-scoped
fixture; each takes 2-15 s, the whole module well under a minute.

Some backends need SDKs that no CI machine here has (Metal outside macOS, ROCm/HIP).  Their
configure fails inside upstream's backend CMakeLists *after* our legacy-name mapping ran, and
CMake writes CMakeCache.txt even when the configure fails, so the mapping (cache value +
notice) is still asserted for real; only "configure succeeded" is skipped for them.
"""

from __future__ import annotations

import glob
import os
import re
import runpy
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIGURE_TIMEOUT = 600


# ---------------------------------------------------------------------------
# Tool discovery
# ---------------------------------------------------------------------------

def _ninja() -> str | None:
    exe = shutil.which("ninja")
    if exe:
        return exe
    try:  # the `ninja` package from the registry
        import ninja  # type: ignore[import-not-found]
    except ImportError:
        return None
    cand = Path(ninja.BIN_DIR) / "ninja"
    return str(cand) if cand.exists() else None


def _cmake() -> str | None:
    exe = shutil.which("cmake")
    if exe:
        return exe
    try:
        import cmake  # type: ignore[import-not-found]
    except ImportError:
        return None
    cand = Path(cmake.CMAKE_BIN_DIR) / "cmake"
    return str(cand) if cand.exists() else None


def _nvcc() -> str | None:
    """nvcc from PATH, $CUDA_HOME/$CUDA_PATH or the usual /usr/local/cuda."""
    exe = shutil.which("nvcc")
    if exe:
        return exe
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if base and Path(base, "bin", "nvcc").exists():
            return str(Path(base, "bin", "nvcc"))
    hits = sorted(glob.glob("/usr/local/cuda-*/bin/nvcc"))
    return hits[-1] if hits else None


def _cuda_root(nvcc: str) -> Path:
    """The toolkit nvcc belongs to.  /usr/local/bin/nvcc may be a wrapper script around
    the real one (as on these machines), so prefer a real toolkit directory."""
    real = Path(nvcc).resolve()
    if (real.parent.parent / "include" / "cuda_runtime.h").exists() or (
        real.parent.parent / "targets").exists():
        return real.parent.parent
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if base and Path(base, "bin", "nvcc").exists():
            return Path(base)
    return real.parent.parent


def _find_lib(root: Path, name: str, extra: tuple[str, ...] = ()) -> str | None:
    dirs = [root / "lib64", root / "lib", *root.glob("targets/*/lib"), root / "lib64" / "stubs",
            *root.glob("targets/*/lib/stubs"), *map(Path, extra)]
    for d in dirs:
        for hit in sorted(d.glob(f"lib{name}.so*")):
            return str(hit)
    return None


def _cuda_args(tmp: Path) -> list[str]:
    """Arguments for a real CUDA configure with the nvcc installed here.

    The CUDA toolkit on these machines has nvcc and the runtime but not cuBLAS or the driver
    library (libcuda).  ggml-cuda's CMakeLists links the imported targets CUDA::cublas and
    CUDA::cuda_driver, and CMake's *generate* step rejects a link to a target that does not
    exist.  Configure and generate never open those files (they are read only when linking),
    so where the toolkit lacks them we name empty stand-ins through FindCUDAToolkit's own
    cache variables.  Everything else -- find_package(CUDAToolkit), enable_language(CUDA)
    with the real nvcc, ggml-cuda's target setup -- runs for real.
    """
    nvcc = _nvcc()
    assert nvcc is not None
    args = [f"-DCMAKE_CUDA_COMPILER={nvcc}"]
    root = _cuda_root(nvcc)
    stubs = tmp / "cuda-stubs"
    driver_dirs = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")
    for var, lib, extra in (("cublas", "cublas", ()), ("cublasLt", "cublasLt", ()),
                            ("cuda_driver", "cuda", driver_dirs)):
        if _find_lib(root, lib, extra) is None:
            stubs.mkdir(parents=True, exist_ok=True)
            stub = stubs / f"lib{lib}.so"
            stub.touch()
            args.append(f"-DCUDA_{var}_LIBRARY={stub}")
    return args


def _have_openblas() -> bool:
    # pkg-config knows where Debian's libopenblas-dev put it; the globs cover other layouts.
    # (No recursive globs over /usr: they can follow symlink loops for minutes.)
    if shutil.which("pkg-config"):
        if subprocess.run(["pkg-config", "--exists", "openblas"]).returncode == 0:
            return True
    headers = (glob.glob("/usr/include/*/openblas*/cblas.h") + glob.glob("/usr/include/openblas/cblas.h")
               + glob.glob("/usr/local/include/cblas.h") + glob.glob("/opt/homebrew/opt/openblas/include/cblas.h"))
    libs = (glob.glob("/usr/lib/*/libopenblas.so") + glob.glob("/usr/lib*/libopenblas.so")
            + glob.glob("/usr/local/lib/libopenblas.*") + glob.glob("/opt/homebrew/opt/openblas/lib/libopenblas.*"))
    return bool(headers) and bool(libs)


def _have_vulkan_sdk() -> bool:
    # ggml-vulkan needs the loader + headers (libvulkan-dev), glslc and SPIRV-Headers' CMake package.
    return (shutil.which("glslc") is not None and Path("/usr/include/vulkan/vulkan.h").exists()
            and bool(glob.glob("/usr/share/cmake*/SPIRV-Headers/SPIRV-HeadersConfig.cmake")
                     + glob.glob("/usr/lib/*/cmake/SPIRV-Headers/SPIRV-HeadersConfig.cmake")))


def _have_rocm() -> bool:
    return shutil.which("hipconfig") is not None or Path("/opt/rocm/bin/hipconfig").exists()


CMAKE = _cmake()
NINJA = _ninja()
NVCC = _nvcc()

pytestmark = pytest.mark.skipif(CMAKE is None or NINJA is None, reason="needs cmake and ninja")


# ---------------------------------------------------------------------------
# Running configures
# ---------------------------------------------------------------------------

@dataclass
class Configure:
    name: str
    build_dir: Path
    args: list[str]
    returncode: int = -1
    output: str = ""
    seconds: float = 0.0
    cache: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def value(self, var: str) -> str | None:
        entry = self.cache.get(var)
        return None if entry is None else entry[1]

    def build_config(self) -> dict:
        path = self.build_dir / "_build_config.py"
        assert path.exists(), f"{path} was not generated\n{self.tail()}"
        return runpy.run_path(str(path))

    def tail(self, n: int = 60) -> str:
        return f"--- cmake {' '.join(self.args)} (exit {self.returncode}) ---\n" + "\n".join(
            self.output.splitlines()[-n:])


def _read_cache(path: Path) -> dict[str, tuple[str, str]]:
    cache: dict[str, tuple[str, str]] = {}
    if not path.exists():
        return cache
    for line in path.read_text(errors="replace").splitlines():
        m = re.match(r"^([^#/][^:=]*):([A-Z]+)=(.*)$", line)
        if m:
            cache[m.group(1)] = (m.group(2), m.group(3))
    return cache


def _base_env() -> dict[str, str]:
    env = dict(os.environ)
    # What the tests set themselves must not leak in from the caller's shell.
    for var in ("LLAMA_CPP_DIR", "FORCE_CMAKE", "CMAKE_GENERATOR", "CMAKE_TOOLCHAIN_FILE"):
        env.pop(var, None)
    return env


def _run(cfg: Configure, env_extra: dict[str, str]) -> Configure:
    env = _base_env()
    env.update(env_extra)
    cmd = [CMAKE, "-S", str(ROOT), "-B", str(cfg.build_dir), "-G", "Ninja",
           f"-DCMAKE_MAKE_PROGRAM={NINJA}", f"-DPython_EXECUTABLE={sys.executable}", *cfg.args]
    if shutil.which("nice"):
        cmd = ["nice", "-n", "19", *cmd]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace", timeout=CONFIGURE_TIMEOUT)
    cfg.seconds = time.monotonic() - start
    cfg.returncode = proc.returncode
    # CMake prints long messages wrapped over several lines; join them so that a
    # phrase can be searched for wherever the line breaks fell.
    cfg.output = proc.stdout
    cfg.cache = _read_cache(cfg.build_dir / "CMakeCache.txt")
    return cfg


def flat(text: str) -> str:
    """CMake output with wrapped message lines joined by single spaces."""
    return re.sub(r"\s+", " ", text)


@pytest.fixture(scope="module")
def configures(tmp_path_factory) -> dict[str, Configure]:
    # Populate vendor/llama.cpp once, before parallel configures could race to do it.
    vendor = subprocess.run([sys.executable, str(ROOT / "scripts" / "vendor_llama_cpp.py")],
                            capture_output=True, text=True)
    if vendor.returncode != 0:
        pytest.skip(f"vendor/llama.cpp could not be populated: {vendor.stderr[-2000:]}")

    tmp = tmp_path_factory.mktemp("configure")
    bogus = tmp / "not-llama-cpp"
    bogus.mkdir()
    (bogus / "README").write_text("an empty directory with no CMakeLists.txt\n")
    cuda = _cuda_args(tmp) if NVCC else []

    # name -> (cmake args, extra environment)
    runs: dict[str, tuple[list[str], dict[str, str]]] = {
        "default": ([], {}),
        "LLAMA_CUBLAS": (["-DLLAMA_CUBLAS=on", *cuda], {}),
        "LLAMA_CUDA": (["-DLLAMA_CUDA=on", *cuda], {}),
        "LLAMA_METAL": (["-DLLAMA_METAL=on"], {}),
        "LLAMA_BLAS": (["-DLLAMA_BLAS=on", "-DLLAMA_BLAS_VENDOR=OpenBLAS"], {}),
        "LLAMA_VULKAN": (["-DLLAMA_VULKAN=on"], {}),
        "LLAMA_HIPBLAS": (["-DLLAMA_HIPBLAS=on"], {}),
        # RPC is on by default, so map `off` to show the legacy name really reaches GGML_RPC.
        "LLAMA_RPC": (["-DLLAMA_RPC=off"], {}),
        "LLAMA_CLBLAST": (["-DLLAMA_CLBLAST=on"], {}),
        # What old llama-cpp-python instructions print: harmless here.
        "harmless": (["-DLLAMA_CLBLAST=off"], {"FORCE_CMAKE": "1"}),
        "unknown": (["-DGGML_CUDDA=on"], {}),
        "bogus_dir_arg": ([f"-DLLAMA_CPP_DIR={bogus}"], {}),
        "bogus_dir_env": ([], {"LLAMA_CPP_DIR": str(tmp / "does-not-exist")}),
        "amx_on": (["-DPYLLAMA_AMX=ON"], {}),
        "amx_off": (["-DPYLLAMA_AMX=off"], {}),
        "amx_bogus": (["-DPYLLAMA_AMX=maybe"], {}),
        "mtmd_off": (["-DPYLLAMA_MTMD=OFF"], {}),
    }
    results: dict[str, Configure] = {}
    # Slow ones first so that the two workers finish together.
    order = sorted(runs, key=lambda n: n not in ("LLAMA_CUBLAS", "LLAMA_CUDA", "LLAMA_VULKAN"))
    with ThreadPoolExecutor(2) as pool:
        futures = {}
        for name in order:
            args, env_extra = runs[name]
            cfg = Configure(name=name, build_dir=tmp / name, args=args)
            futures[name] = pool.submit(_run, cfg, env_extra)
        for name, fut in futures.items():
            results[name] = fut.result()
    return results


def _notice(old: str, new: str, value: str) -> str:
    return f"pyllama: legacy option {old}={value} mapped to {new}={value}"


# ---------------------------------------------------------------------------
# Defaults
# ---------------------------------------------------------------------------

def test_default_configure(configures):
    cfg = configures["default"]
    assert cfg.ok, cfg.tail()
    assert cfg.value("GGML_NATIVE") == "ON"
    assert cfg.value("GGML_RPC") == "ON"
    assert cfg.value("BUILD_SHARED_LIBS") == "OFF"
    assert cfg.value("LLAMA_BUILD_TOOLS") == "OFF"
    for off in ("LLAMA_BUILD_TESTS", "LLAMA_BUILD_EXAMPLES", "LLAMA_BUILD_SERVER", "LLAMA_BUILD_COMMON"):
        assert cfg.value(off) == "OFF", off
    assert cfg.value("GGML_CUDA") == "OFF"
    assert "legacy option" not in cfg.output
    assert "have no effect" not in flat(cfg.output)


def test_default_build_config(configures):
    cfg = configures["default"]
    info = cfg.build_config()
    commit = (ROOT / "vendor" / "llama.cpp" / "COMMIT").read_text().strip()
    assert info["llama_cpp_commit"] == commit
    assert Path(info["llama_cpp_dir"]).resolve() == (ROOT / "vendor" / "llama.cpp").resolve()
    assert info["options"]["GGML_NATIVE"] == "ON"
    assert info["options"]["GGML_RPC"] == "ON"
    assert info["portable"] is False
    assert info["unknown_options"] == []
    assert info["legacy_options_mapped"] == []


def test_mtmd_is_built_in_by_default_and_can_be_left_out(configures):
    on, off = configures["default"], configures["mtmd_off"]
    assert on.ok and off.ok, off.tail()
    assert on.value("LLAMA_BUILD_MTMD") == "ON" and on.value("MTMD_VIDEO") == "OFF"
    assert off.value("LLAMA_BUILD_MTMD") == "OFF"
    assert on.build_config()["mtmd"] is True and off.build_config()["mtmd"] is False
    ninja_on = (on.build_dir / "build.ninja").read_text()
    ninja_off = (off.build_dir / "build.ninja").read_text()
    assert "libmtmd.a" in ninja_on and "-DPYLLAMA_HAS_MTMD=1" in ninja_on
    assert "libmtmd.a" not in ninja_off and "-DPYLLAMA_HAS_MTMD=0" in ninja_off


# ---------------------------------------------------------------------------
# Legacy names
# ---------------------------------------------------------------------------

def _check_mapping(cfg: Configure, old: str, new: str, value: str) -> None:
    assert _notice(old, new, value) in cfg.output, cfg.tail()
    assert cfg.value(new) == value, f"{new} in CMakeCache.txt: {cfg.value(new)!r}\n{cfg.tail()}"
    # The legacy variable is consumed: upstream never sees it (for LLAMA_CUBLAS upstream
    # would stop with a fatal error), and it is not reported as an unknown option.
    assert old not in cfg.cache
    assert "have no effect" not in flat(cfg.output), cfg.tail()


@pytest.mark.parametrize("old", ["LLAMA_CUBLAS", "LLAMA_CUDA"])
def test_legacy_cuda(configures, old):
    cfg = configures[old]
    _check_mapping(cfg, old, "GGML_CUDA", "on")
    if NVCC is None:
        pytest.skip("no nvcc here: mapping checked, CUDA configure not attempted")
    # A real CUDA configure with the nvcc found on this machine.
    assert cfg.ok, cfg.tail()
    assert "Including CUDA backend" in cfg.output
    assert cfg.build_config()["legacy_options_mapped"] == [f"{old}->GGML_CUDA"]
    assert cfg.build_config()["options"]["GGML_CUDA"] == "on"
    # No GPU here: GGML_NATIVE cannot pick the architectures, so the documented default
    # list is used (cmake/cuda_architectures.cmake), said in the output and in build_info.
    if shutil.which("nvidia-smi") is None:
        default = "75-virtual;80-virtual;86-real;89-real;90-virtual"
        assert cfg.value("CMAKE_CUDA_ARCHITECTURES") == default
        assert "no CUDA GPU visible at build time" in flat(cfg.output)
        assert cfg.build_config()["cuda_architectures"] == f"{default} (default: no GPU visible at build time)"


def test_legacy_metal(configures):
    cfg = configures["LLAMA_METAL"]
    _check_mapping(cfg, "LLAMA_METAL", "GGML_METAL", "on")
    if sys.platform == "darwin":
        assert cfg.ok, cfg.tail()
    # Elsewhere ggml-metal's CMakeLists stops at find_library(Foundation): GGML_METAL has
    # no meaning off Apple platforms.  The mapping above ran (and was cached) before that.


def test_legacy_blas(configures):
    cfg = configures["LLAMA_BLAS"]
    _check_mapping(cfg, "LLAMA_BLAS", "GGML_BLAS", "on")
    _check_mapping(cfg, "LLAMA_BLAS_VENDOR", "GGML_BLAS_VENDOR", "OpenBLAS")
    if not _have_openblas():
        pytest.skip("libopenblas-dev is not installed: mapping checked, BLAS configure not")
    assert cfg.ok, cfg.tail()
    assert "Including BLAS backend" in cfg.output
    assert cfg.build_config()["options"]["GGML_BLAS_VENDOR"] == "OpenBLAS"


def test_legacy_vulkan(configures):
    cfg = configures["LLAMA_VULKAN"]
    _check_mapping(cfg, "LLAMA_VULKAN", "GGML_VULKAN", "on")
    if not _have_vulkan_sdk():
        pytest.skip("Vulkan SDK (libvulkan-dev glslc spirv-headers) missing: mapping checked only")
    if _vulkan_headers() < (1, 3, 261):
        # Debian 12's 1.3.239: refused at configure time, with the way out, instead of a
        # compile error in ggml-vulkan.cpp minutes later (cmake/vulkan_headers.cmake).
        assert not cfg.ok
        assert "needs Vulkan headers 1.3.261 or newer" in flat(cfg.output), cfg.tail()
        assert "-DVulkan_INCLUDE_DIR=" in flat(cfg.output)
        return
    assert cfg.ok, cfg.tail()
    assert "Including Vulkan backend" in cfg.output


def _vulkan_headers() -> tuple:
    """The system Vulkan headers' version, as (1, 3, 239)."""
    text = Path("/usr/include/vulkan/vulkan_core.h").read_text(errors="replace")
    patch = re.search(r"^#define VK_HEADER_VERSION (\d+)", text, re.M)
    major_minor = re.search(r"^#define VK_HEADER_VERSION_COMPLETE VK_MAKE_API_VERSION\(0, *(\d+), *(\d+),", text, re.M)
    return (int(major_minor.group(1)), int(major_minor.group(2)), int(patch.group(1)))


def test_legacy_hipblas(configures):
    cfg = configures["LLAMA_HIPBLAS"]
    _check_mapping(cfg, "LLAMA_HIPBLAS", "GGML_HIP", "on")
    if _have_rocm():
        assert cfg.ok, cfg.tail()
    else:
        # Without ROCm, enable_language(HIP) in ggml-hip's CMakeLists fails ("Failed to find
        # HIP root directory").  That is upstream reacting to GGML_HIP=on, which is exactly
        # what the legacy name should lead to; the mapping itself is asserted above from the
        # CMakeCache.txt that CMake writes even for a failed configure.
        assert not cfg.ok
        assert "HIP" in cfg.output


def test_legacy_rpc(configures):
    cfg = configures["LLAMA_RPC"]
    _check_mapping(cfg, "LLAMA_RPC", "GGML_RPC", "off")
    assert cfg.ok, cfg.tail()
    assert "Including RPC backend" not in cfg.output
    assert cfg.build_config()["options"]["GGML_RPC"].upper() == "OFF"


def test_legacy_clblast_stops(configures):
    cfg = configures["LLAMA_CLBLAST"]
    assert not cfg.ok
    text = flat(cfg.output)
    assert "CLBlast was removed from llama.cpp" in text, cfg.tail()
    for replacement in ("-DGGML_VULKAN=on", "-DGGML_OPENCL=on", "-DGGML_BLAS=on"):
        assert replacement in text, (replacement, cfg.tail())
    # It stops at once: llama.cpp's own CMakeLists was never entered.
    assert "Including CPU backend" not in cfg.output


def test_force_cmake_and_clblast_off_are_harmless(configures):
    cfg = configures["harmless"]
    assert cfg.ok, cfg.tail()
    assert "FORCE_CMAKE=1 noted" in cfg.output
    assert "LLAMA_CLBLAST" not in cfg.cache
    assert "have no effect" not in flat(cfg.output)
    assert cfg.value("GGML_NATIVE") == "ON"


# ---------------------------------------------------------------------------
# Unknown options and a bad LLAMA_CPP_DIR
# ---------------------------------------------------------------------------

def test_unknown_option_warns(configures):
    cfg = configures["unknown"]
    assert cfg.ok, cfg.tail()
    text = flat(cfg.output)
    assert "CMake Warning" in cfg.output
    assert re.search(r"not used by llama\.cpp \S+ and have no effect: GGML_CUDDA=on", text), cfg.tail()
    assert cfg.build_config()["unknown_options"] == ["GGML_CUDDA=on"]


@pytest.mark.parametrize("how", ["bogus_dir_arg", "bogus_dir_env"])
def test_bogus_llama_cpp_dir(configures, how):
    cfg = configures[how]
    assert not cfg.ok
    text = flat(cfg.output)
    assert "CMake Error" in cfg.output
    assert re.search(r"pyllama: LLAMA_CPP_DIR=\S+ holds no llama\.cpp CMakeLists\.txt", text), cfg.tail()
    # The vendored tree is not silently used instead.
    assert "Including CPU backend" not in cfg.output


def test_configure_times(configures):
    """Not a benchmark: a guard that configure stays quick (the module relies on it)."""
    slow = {n: round(c.seconds, 1) for n, c in configures.items() if c.seconds > 240}
    assert not slow, slow


# ---------------------------------------------------------------------------
# ggml's AMX kernels (cmake/amx.cmake)
# ---------------------------------------------------------------------------

_AMX_FLAGS = ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16", "-U__AMX_INT8__")
_IS_X86 = os.uname().machine in ("x86_64", "AMD64", "amd64") if hasattr(os, "uname") else True


def _ggml_cpu_compile_lines(cfg: Configure) -> list[str]:
    """The FLAGS lines of the ggml-cpu objects in the generated build.ninja files."""
    lines = []
    for ninja_file in cfg.build_dir.rglob("*.ninja"):
        current = None
        for line in ninja_file.read_text(errors="replace").splitlines():
            if line.startswith("build ") and "ggml-cpu" in line and line.split(":")[0].endswith(".o"):
                current = line
            elif current and line.strip().startswith("FLAGS ="):
                lines.append(line)
                current = None
    return lines


def _gcc_loadconfig_drops_stores() -> bool | None:
    """Independent look at the compiler's _tile_loadconfig: does the byte stored into the
    configuration survive to the assembly?  None when the compiler cannot target AMX."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        return None
    src = "#include <immintrin.h>\nvoid f(void){alignas(64) unsigned char c[64]={0}; c[0]=1; c[48]=0x5a; _tile_loadconfig(c);}\n"
    proc = subprocess.run([cxx, "-O2", "-mamx-tile", "-x", "c++", "-S", "-o", "-", "-"], input=src,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    body = "\n".join(ln for ln in proc.stdout.splitlines() if not ln.lstrip().startswith("#"))
    return re.search(r"[$\s,]90\b", body) is None


@pytest.mark.skipif(not _IS_X86, reason="AMX exists on x86-64 only")
def test_amx_off_is_applied_to_ggml_cpu(configures):
    cfg = configures["amx_off"]
    assert cfg.ok, cfg.tail()
    assert "AMX kernels are off (PYLLAMA_AMX=OFF)" in flat(cfg.output)
    info = cfg.build_config()
    assert info["amx"] == "OFF" and info["amx_disabled_reason"] == "PYLLAMA_AMX=OFF"
    lines = _ggml_cpu_compile_lines(cfg)
    assert lines, "no ggml-cpu compile lines found in build.ninja"
    for flags in lines:
        for f in _AMX_FLAGS:
            assert f in flags, (f, flags)
        # after -march=native, so nothing ggml adds turns AMX back on
        if "-march=native" in flags:
            assert flags.index("-mno-amx-int8") > flags.index("-march=native")


@pytest.mark.skipif(not _IS_X86, reason="AMX exists on x86-64 only")
def test_amx_on_keeps_upstream_flags(configures):
    cfg = configures["amx_on"]
    assert cfg.ok, cfg.tail()
    assert cfg.build_config()["amx"] == "ON"
    lines = _ggml_cpu_compile_lines(cfg)
    assert lines and not any("-mno-amx" in flags for flags in lines), lines


def test_amx_bad_value_stops(configures):
    cfg = configures["amx_bogus"]
    assert not cfg.ok
    assert "PYLLAMA_AMX must be AUTO, ON or OFF, not 'maybe'" in flat(cfg.output)


@pytest.mark.skipif(not _IS_X86, reason="AMX exists on x86-64 only")
def test_amx_auto_follows_the_compiler(configures):
    """AUTO turns AMX off exactly when the compiler's _tile_loadconfig drops the stores
    (GCC <= 12: ggml's AMX kernels then crash with SIGSEGV at the first decode)."""
    cfg = configures["default"]
    assert cfg.ok, cfg.tail()
    info = cfg.build_config()
    ident = re.search(r"The CXX compiler identification is (\S+)", cfg.output)
    broken = ident is not None and ident.group(1) == "GNU" and bool(_gcc_loadconfig_drops_stores())
    if broken:
        assert info["amx"] == "OFF", info
        assert "_tile_loadconfig drops the tile configuration" in info["amx_disabled_reason"]
        lines = _ggml_cpu_compile_lines(cfg)
        assert lines and all("-mno-amx-int8" in flags for flags in lines), lines
    else:
        assert info["amx"] == "AUTO" and info["amx_disabled_reason"] == "", info


def test_core_compiles_without_mtmd(configures):
    """-DPYLLAMA_MTMD=OFF: _core.cpp (the same Cython output) compiles against the stand-ins in
    src/cxx/pyllama_mtmd.h, without tools/mtmd on the include path.  Syntax and types only
    (-fsyntax-only): about a minute instead of a full build of llama.cpp."""
    import shlex

    off = configures["mtmd_off"]
    assert off.ok, off.tail()
    cython = subprocess.run([NINJA, "-C", str(off.build_dir), "_core.cpp"], capture_output=True, text=True,
                            timeout=300)
    assert cython.returncode == 0, cython.stdout[-3000:] + cython.stderr[-3000:]
    listing = subprocess.run([NINJA, "-C", str(off.build_dir), "-t", "commands", "_core"], capture_output=True,
                             text=True, timeout=60).stdout
    (line,) = [ln for ln in listing.splitlines() if "-c " in ln and ln.rstrip().endswith("_core.cpp")]
    argv = shlex.split(line)
    if os.path.basename(argv[0]) == "ccache":
        argv = argv[1:]
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("-o", "-MT", "-MF"):
            skip = True
            continue
        if a in ("-c", "-MD"):
            continue
        out.append(a)
    assert "-DPYLLAMA_HAS_MTMD=0" in out and not any("tools/mtmd" in a for a in out), line
    proc = subprocess.run([*out, "-fsyntax-only"], cwd=off.build_dir, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
