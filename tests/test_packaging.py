"""Packaging end to end: sdist -> wheel built offline from the sdist -> fresh venv -> smoke test.

Slow (one full compile of llama.cpp from the sdist; ccache makes a repeat quick); run with
``python -m pytest -m slow tests/test_packaging.py``.  Steps, each timed (printed, and kept as
junit properties):

1. ``python -m build --sdist`` of this checkout; its file list is asserted: the vendored
   llama.cpp build subset and its licences, no models, no upstream tools/common/examples,
   no build outputs.
2. A clean venv gets the build dependencies (scikit-build-core, cython, cmake, ninja) from
   the package index; then the wheel is built from the unpacked sdist with
   ``pip wheel --no-build-isolation`` *with the network off*: in a new network namespace
   (``unshare -rn``) when this kernel allows it, else with ``PIP_NO_INDEX=1`` and an empty
   PYLLAMA_CACHE (so the vendoring script could not fetch llama.cpp either).
3. The wheel's file list is asserted with tools/check_wheel.py: every native library once,
   no sources, llama.cpp's licence in .dist-info/licenses/, at most 8 MiB.
4. A second fresh venv installs the wheel (runtime deps from the index) and runs
   tools/test_wheel.py: import, system_info(), backends(), greedy text from a tiny model.

PYLLAMA_TEST_PORTABLE=1 makes step 2 a portable build (PYLLAMA_PORTABLE=ON; much slower:
every CPU variant is compiled) and checks the variant libraries and CPU_VARIANT instead.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENDOR = ROOT / "vendor" / "llama.cpp"
BUILD_TIMEOUT = 3600
SDIST_MAX_MIB = 8
WHEEL_MAX_MIB = 8
PORTABLE = os.environ.get("PYLLAMA_TEST_PORTABLE", "") not in ("", "0")

pytestmark = pytest.mark.slow


def _load_check_wheel():
    spec = importlib.util.spec_from_file_location("check_wheel", ROOT / "tools" / "check_wheel.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _run(cmd, *, timeout=600, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace", timeout=timeout, **kw)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-6000:]}")
    return proc


def _nice() -> list[str]:
    return ["nice", "-n", "19"] if shutil.which("nice") else []


def _netns_works() -> bool:
    """True when `unshare -rn` gives a namespace with no way out (no route to anything)."""
    if not shutil.which("unshare"):
        return False
    probe = ("import socket,sys\ntry:\n socket.create_connection(('1.1.1.1',443),timeout=3)\n"
             " sys.exit(1)\nexcept OSError:\n sys.exit(0)\n")
    try:
        return subprocess.run(["unshare", "-rn", sys.executable, "-c", probe], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class Timer:
    def __init__(self, record):
        self.record = record
        self.t0 = time.monotonic()
        self.steps: list[tuple[str, float]] = []

    def step(self, name: str) -> None:
        now = time.monotonic()
        self.steps.append((name, now - self.t0))
        self.record(f"seconds_{name}", round(now - self.t0, 1))
        print(f"[packaging] {name}: {now - self.t0:.1f} s", flush=True)
        self.t0 = now


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    if not (VENDOR / "CMakeLists.txt").exists():
        pytest.skip("vendor/llama.cpp is missing: run scripts/vendor_llama_cpp.py first")
    out = tmp_path_factory.mktemp("sdist")
    # cwd=out: run from the repository root, `python -m build` would import its build/ folder
    _run([*_nice(), sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", out, ROOT], cwd=out)
    (path,) = out.glob("pyllama-*.tar.gz")
    return path


def test_sdist_contents(sdist: Path):
    with tarfile.open(sdist) as tf:
        names = [m.name.split("/", 1)[1] for m in tf.getmembers() if m.isfile()]
    assert "vendor/llama.cpp/CMakeLists.txt" in names
    assert "vendor/llama.cpp/LICENSE" in names
    assert any(n.startswith("vendor/llama.cpp/licenses/") for n in names)
    assert any(n.startswith("vendor/llama.cpp/ggml/src/ggml-cpu/") for n in names)
    assert any(n.startswith("vendor/llama.cpp/ggml/src/ggml-cuda/") for n in names)  # GPU builds from the sdist
    assert "pyproject.toml" in names and "src/pyllama/_core.pyx" in names
    # mtmd (tools/mtmd) is built by default, so it travels; its sample media and the other tools do not.
    assert "vendor/llama.cpp/tools/mtmd/CMakeLists.txt" in names and "vendor/llama.cpp/tools/mtmd/mtmd.h" in names
    assert "vendor/llama.cpp/vendor/stb/stb_image.h" in names       # mtmd decodes images with it
    assert not [n for n in names if n.startswith("vendor/llama.cpp/tools/mtmd/test-")]
    for banned in ("vendor/llama.cpp/models/", "vendor/llama.cpp/tools/", "vendor/llama.cpp/common/",
                   "vendor/llama.cpp/examples/", "vendor/llama.cpp/pocs/", "build/", "dist/", "wheelhouse/"):
        hits = [n for n in names if n.startswith(banned) and not n.startswith("vendor/llama.cpp/tools/mtmd/")]
        assert not hits, f"{banned} must not be in the sdist: {hits[:5]}"
    assert not [n for n in names if n.endswith((".gguf", ".so", ".o", ".a", ".whl"))]
    size_mib = sdist.stat().st_size / 2**20
    print(f"[packaging] sdist {sdist.name}: {size_mib:.2f} MiB, {len(names)} files")
    assert size_mib <= SDIST_MAX_MIB, f"sdist is {size_mib:.1f} MiB"


def test_sdist_to_wheel_offline_to_fresh_venv(sdist: Path, tmp_path: Path, record_property):
    timer = Timer(record_property)
    check_wheel = _load_check_wheel()

    # 1. unpack the sdist; a clean venv with only the build dependencies
    src_root = tmp_path / "src"
    with tarfile.open(sdist) as tf:
        tf.extractall(src_root, filter="data")
    (src,) = src_root.iterdir()
    build_venv = tmp_path / "build-venv"
    _run([sys.executable, "-m", "venv", build_venv])
    bpy = _venv_python(build_venv)
    _run([bpy, "-m", "pip", "install", "--quiet", "scikit-build-core>=0.10", "cython>=3.0", "cmake>=3.21", "ninja"])
    timer.step("build_venv")

    # 2. the wheel, from the sdist, with the network off
    env = {k: v for k, v in os.environ.items() if k not in ("LLAMA_CPP_DIR", "CMAKE_ARGS", "PYTHONPATH")}
    env.update(PIP_NO_INDEX="1", PYLLAMA_CACHE=str(tmp_path / "empty-cache"),
               PATH=f"{_venv_python(build_venv).parent}{os.pathsep}{env.get('PATH', '')}")
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", "2")
    if shutil.which("ccache"):
        env.setdefault("CMAKE_C_COMPILER_LAUNCHER", "ccache")
        env.setdefault("CMAKE_CXX_COMPILER_LAUNCHER", "ccache")
        env["CCACHE_BASEDIR"] = str(src)  # relative paths: a rerun from another temp dir hits the cache
    wheels = tmp_path / "wheels"
    cmd = [*_nice(), bpy, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", wheels, src]
    if PORTABLE:
        cmd.append("-Ccmake.define.PYLLAMA_PORTABLE=ON")
    isolation = "unshare -rn (no network namespace)" if _netns_works() else "PIP_NO_INDEX=1 + empty PYLLAMA_CACHE"
    if isolation.startswith("unshare"):
        cmd = ["unshare", "-rn", *cmd]
    print(f"[packaging] offline build via {isolation}", flush=True)
    record_property("offline_build_isolation", isolation)
    proc = _run(cmd, env=env, timeout=BUILD_TIMEOUT)
    assert "vendor_llama_cpp.py" not in proc.stdout, "the build tried to vendor llama.cpp again"
    (wheel,) = wheels.glob("pyllama-*.whl")
    timer.step("offline_wheel_build")

    # 3. what the wheel carries
    problems = check_wheel.check(wheel, WHEEL_MAX_MIB, PORTABLE)
    assert not problems, "\n".join(problems)
    record_property("wheel_mib", round(wheel.stat().st_size / 2**20, 2))

    # 4. a fresh venv with the wheel (no compiler, no source tree) and the smoke test
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv])
    vpy = _venv_python(venv)
    _run([vpy, "-m", "pip", "install", "--quiet", wheel])
    timer.step("install")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(ROOT / "tools" / "test_wheel.py", run_dir / "test_wheel.py")
    smoke_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    args = ["--expect-portable"] if PORTABLE else []
    proc = _run([vpy, "test_wheel.py", *args], cwd=run_dir, env=smoke_env, timeout=300)
    print(proc.stdout)
    assert "smoke test passed" in proc.stdout
    assert str(ROOT) not in proc.stdout.split("from ", 1)[1].splitlines()[0], "tested the source tree, not the wheel"
    timer.step("smoke_test")
    print("[packaging] " + ", ".join(f"{n} {s:.0f} s" for n, s in timer.steps), flush=True)
