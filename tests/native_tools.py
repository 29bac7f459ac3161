"""llama.cpp's own command-line tools, compiled against the static libraries of the build
that produced the installed pyllama, for tests that run the same input through both.

Linking the very libraries our extension links means both sides run the same kernels, so
the numbers can be compared almost bit for bit.

* ``static_libs()``           the build's static llama/ggml libraries (None: not a source build).
* ``require_static_libs()``   the same, or skip (locally) / fail (``CI`` set) when there are none.
* ``build_llama_embedding()`` examples/embedding/embedding.cpp -> ``llama-embedding``.
* ``build_mtmd_reference()``  tests/native/mtmd_reference.cpp (llama.h + mtmd.h only, no common/)
                              -> ``mtmd_reference``, linked with the build's libmtmd.a as well.

Tools that use llama.cpp's ``common`` library (argument parsing, model download, chat, ...)
compile only the common sources their run needs (``COMMON_SOURCES``), at -O1 (the numeric work
is in the already optimised static libraries), at most two at a time, through ccache when
installed.  Every other symbol the linker asks for (HTTP download, chat templates, JSON schemas, ...)
gets a generated stub that names itself and aborts: code we left out can never run silently,
and a cold build takes ~55 s of CPU (~30 s on 2 idle cores) instead of the ~5 minutes (-j2)
of all of common/ plus cpp-httplib, which a plain link pulls in.  The binary is cached under
``$XDG_CACHE_HOME/pyllama/test-native/`` (default ~/.cache), in a folder keyed by the
llama.cpp commit, the sources, the compiler and flags and the static libraries' sizes and
mtimes: local re-runs cost nothing.
"""

from __future__ import annotations

import glob
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import pyllama

ROOT = Path(__file__).resolve().parent.parent
LLAMA_DIR = ROOT / "vendor" / "llama.cpp"

CXX = os.environ.get("CXX", "g++")
COMMON_CXXFLAGS = ["-O1", "-std=c++17"]
JOBS = 2  # CI and the shared dev machine have 2 cores

# common/ sources that llama-embedding's run reaches (found by running it with everything
# else stubbed: a stub that fires names the function, whose source then belongs here).
# arg.cpp parses the command line; download.cpp runs the (empty) model download step;
# speculative.cpp and sampling.cpp are called while setting up options and the context;
# fit.cpp is --fit on (the default), json.cpp its memory report.
COMMON_SOURCES = ("common.cpp", "log.cpp", "arg.cpp", "sampling.cpp", "speculative.cpp", "download.cpp", "fit.cpp",
                  "json.cpp")


def static_libs() -> list[Path] | None:
    """The static llama.cpp libraries of the build that produced the installed module."""
    explicit = os.environ.get("PYLLAMA_BUILD_DIR")
    dirs = [Path(explicit)] if explicit else sorted(
        (Path(p).parent.parent.parent for p in glob.glob(str(ROOT / "build" / "*" / "llama.cpp" / "src" / "libllama.a"))),
        key=lambda d: (d / "llama.cpp" / "src" / "libllama.a").stat().st_mtime, reverse=True)
    sanitize = _sanitize()
    for d in dirs:
        config = d / "_build_config.py"
        if not explicit and config.exists() and f'"PYLLAMA_SANITIZE": "{sanitize}"' not in config.read_text():
            continue  # a build with another sanitizer setting than the installed module
        lib = d / "llama.cpp"
        libs = [lib / "src" / "libllama.a", lib / "ggml" / "src" / "libggml.a"]
        libs += sorted((lib / "ggml" / "src").glob("ggml-*/libggml-*.a"))
        libs += [lib / "ggml" / "src" / "libggml-cpu.a", lib / "ggml" / "src" / "libggml-base.a"]
        if all(p.exists() for p in libs):
            return libs
    return None


def require_static_libs() -> list[Path]:
    libs = static_libs()
    if libs is None:
        if os.environ.get("CI"):
            pytest.fail("no static llama.cpp libraries found under build/*/ (the source build's build dir)")
        pytest.skip("needs a source build with a persistent build dir (pip install -Cbuild-dir=build/...)")
    return libs


def _sanitize() -> str:
    return pyllama.build_info()["options"].get("PYLLAMA_SANITIZE", "")


def link_flags() -> list[str]:
    flags = ["-fopenmp", "-lpthread", "-ldl"]
    if _sanitize():  # the static libraries are instrumented: the program needs the same runtime
        flags.append(f"-fsanitize={_sanitize()}")
    return flags


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pyllama" / "test-native"


def _compiler_id() -> str:
    out = subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True).stdout
    return out.splitlines()[0] if out else CXX


def _cache_key(name: str, sources: list[Path], libs: list[Path]) -> str:
    h = hashlib.sha256()
    h.update((LLAMA_DIR / "COMMIT").read_bytes())
    for part in (name, _compiler_id(), *COMMON_CXXFLAGS, *link_flags(), *COMMON_SOURCES):
        h.update(part.encode() + b"\0")
    for src in sources:  # cheap (a few hundred KB) and catches a vendor tree changed in place
        h.update(src.read_bytes())
    h.update(Path(__file__).read_bytes())  # this builder: a change here rebuilds
    for lib in libs:
        st = lib.stat()
        h.update(f"{lib}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _run(cmd: list[str], cwd: Path) -> None:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"command failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-4000:]}")


def _compile_all(jobs: list[tuple[Path, Path]], cwd: Path) -> None:
    compiler = [CXX]
    if shutil.which("ccache"):
        compiler = ["ccache", CXX]
    inc = [f"-I{LLAMA_DIR / d}" for d in ("common", "include", "ggml/include", "vendor")]
    cmds = [[*compiler, *COMMON_CXXFLAGS, *inc, "-c", str(src), "-o", str(obj)] for src, obj in jobs]
    with ThreadPoolExecutor(max_workers=JOBS) as pool:
        for f in [pool.submit(_run, cmd, cwd) for cmd in cmds]:
            f.result()


_UNDEFINED = re.compile(r"undefined reference to `([^']+)'")


def _stub_source(symbols: list[str], tool: str) -> str:
    """C functions under the given (mangled) names that report themselves and abort."""
    lines = ["#include <stdio.h>", "#include <stdlib.h>",
             "static void missing(const char *name) {",
             f'    fprintf(stderr, "{tool} (pyllama test build): reached %s, left out of the build; "',
             '            "add its common/ source to COMMON_SOURCES in tests/native_tools.py\\n", name);',
             "    abort();", "}"]
    for i, sym in enumerate(symbols):
        lines.append(f'void stub_{i}(void) __asm__("{sym}");')
        lines.append(f'void stub_{i}(void) {{ missing("{sym}"); }}')
    return "\n".join(lines) + "\n"


def _link_with_stubs(objs: list[Path], libs: list[Path], exe: Path, work: Path) -> None:
    link = [CXX, *map(str, objs), *map(str, libs), *link_flags()]
    first = subprocess.run([*link, "-Wl,--no-demangle", "-o", str(exe)], cwd=work, capture_output=True, text=True)
    if first.returncode == 0:
        return
    symbols = sorted(set(_UNDEFINED.findall(first.stderr)))
    if not symbols:
        raise RuntimeError(f"linking {exe.name} failed:\n{first.stderr[-4000:]}")
    if any(s.startswith(("_ZTV", "_ZTI", "_ZTS", "_ZTT")) for s in symbols):  # data: a function stub won't do
        raise RuntimeError(f"{exe.name} needs data symbols from left-out sources: {symbols}")
    stubs = work / "stubs.c"
    stubs.write_text(_stub_source(symbols, exe.name))
    _run(["gcc", "-O1", "-c", str(stubs), "-o", str(work / "stubs.o")], work)
    _run([*link, str(work / "stubs.o"), "-o", str(exe)], work)


def _build_info_source() -> str:
    template = (LLAMA_DIR / "common" / "build-info.cpp.in").read_text()
    values = {"LLAMA_BUILD_NUMBER": "0", "LLAMA_BUILD_COMMIT": (LLAMA_DIR / "COMMIT").read_text().strip(),
              "BUILD_COMPILER": _compiler_id().replace('"', "'"), "BUILD_TARGET": platform.machine()}
    return re.sub(r"@(\w+)@", lambda m: values[m.group(1)], template)


KEEP_BUILDS = 4  # per tool: every rebuild of pyllama (new library mtimes) makes a new one


def _prune(name: str, keep: Path) -> None:
    """Drop all but the newest KEEP_BUILDS cached builds of `name` (never `keep`)."""
    builds = sorted((d for d in cache_root().glob("*/") if (d / name).exists() and d != keep and ".tmp-" not in d.name),
                    key=lambda d: d.stat().st_mtime, reverse=True)
    for old in builds[KEEP_BUILDS - 1:]:
        shutil.rmtree(old, ignore_errors=True)


def _cached_build(name: str, sources: list[Path], libs: list[Path], build) -> Path:
    """The binary ``name`` from the cache, or made by ``build(work_dir, exe_path)`` in a
    temporary folder that then becomes the cache entry."""
    final = cache_root() / _cache_key(name, sources, libs)
    exe = final / name
    if exe.exists():
        os.utime(final)  # recently used: the last to be pruned
        return exe
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
    try:
        build(work, work / name)
        try:
            os.rename(work, final)  # atomic: a concurrent session either wins or finds ours
        except OSError:
            if not exe.exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _prune(name, final)
    return exe


def build_common_tool(name: str, main_source: Path, libs: list[Path]) -> Path:
    """``name`` built from ``main_source`` plus llama.cpp's common/ (see the module docstring);
    returns the cached binary."""
    sources = [main_source, *(LLAMA_DIR / "common" / s for s in COMMON_SOURCES)]

    def build(work: Path, exe: Path) -> None:
        (work / "build-info.cpp").write_text(_build_info_source())
        jobs = [(src, work / f"{i}-{src.stem}.o") for i, src in enumerate([*sources, work / "build-info.cpp"])]
        _compile_all(jobs, work)
        _link_with_stubs([obj for _, obj in jobs], libs, exe, work)
        for obj in work.glob("*.o"):
            obj.unlink()

    return _cached_build(name, sources, libs, build)


def build_llama_embedding() -> Path:
    """llama.cpp's ``llama-embedding`` (examples/embedding) against our build's static libraries."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the llama.cpp tool builds use the GNU toolchain (g++, ld) of the Linux test machines")
    libs = require_static_libs()
    subprocess.run([sys.executable, str(ROOT / "scripts" / "vendor_llama_cpp.py"), "--with", "tools"], check=True,
                   capture_output=True)
    return build_common_tool("llama-embedding", LLAMA_DIR / "examples" / "embedding" / "embedding.cpp", libs)


def build_mtmd_reference() -> Path:
    """tests/native/mtmd_reference.cpp (llama.cpp's reference evaluation of a multimodal prompt through
    mtmd_helper_eval_chunks, then greedy decoding) against our build's static libraries, libmtmd.a
    included; returns the cached binary.  Skips locally / fails in CI like require_static_libs() when
    the build has no static libraries or was configured without mtmd."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the llama.cpp tool builds use the GNU toolchain (g++, ld) of the Linux test machines")
    libs = require_static_libs()
    lib_dir = libs[0].parent.parent  # build/<dir>/llama.cpp
    mtmd_libs = [lib_dir / "tools" / "mtmd" / "libmtmd.a", lib_dir / "vendor" / "hash" / "libvendor-hash.a"]
    if not all(p.exists() for p in mtmd_libs):
        msg = f"no libmtmd.a / libvendor-hash.a under {lib_dir} (a build with PYLLAMA_MTMD=OFF?)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    source = ROOT / "tests" / "native" / "mtmd_reference.cpp"
    all_libs = [*mtmd_libs, *libs]  # link order: mtmd (and its hash helper) before llama before ggml
    inc = [f"-I{LLAMA_DIR / d}" for d in ("include", "ggml/include", "tools/mtmd")]

    def build(work: Path, exe: Path) -> None:
        _run([CXX, *COMMON_CXXFLAGS, *inc, str(source), "-o", str(exe), *map(str, all_libs), *link_flags()], work)

    return _cached_build("mtmd_reference", [source], all_libs, build)
