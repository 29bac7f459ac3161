#!/usr/bin/env python3
"""Check what a built pyllama wheel carries (used by scripts/build_wheel.sh and the tests).

* every native library once: no SOVERSION copies (libggml.so + libggml.so.0 + libggml.so.0.9.4
  as three files), no two files for the same library stem;
* no sources: no vendored llama.cpp, no .pyx/.pxd/.pxi/.c/.cpp/.h, no CMake files;
* the licences: llama.cpp's LICENSE in the wheel's .dist-info/licenses/;
* the extension module is there, and for a portable build the CPU variant libraries;
* the size: at most --max-size-mib (CPU wheels: 8 MiB).

Usage:  python tools/check_wheel.py WHEEL [--max-size-mib 8] [--portable]
Prints a summary (file list with sizes) and exits non-zero with the reasons when a check fails.
"""

from __future__ import annotations

import argparse
import re
import sys
import zipfile
from pathlib import Path

NATIVE = re.compile(r"\.(so(\.\d+)*|dylib|dll|pyd)$")
SOURCE = re.compile(r"(\.(pyx|pxd|pxi|c|cc|cpp|cu|h|hpp|cuh|m|metal|comp|cmake)$)|(^|/)CMakeLists\.txt$")


def library_stem(name: str) -> str:
    """'pyllama/libggml-base.so.0.9.4' -> 'libggml-base'; '_core.cpython-311-x86_64-linux-gnu.so' -> '_core'."""
    base = name.rsplit("/", 1)[-1]
    base = re.sub(r"\.(so(\.\d+)*|dylib|dll|pyd)$", "", base)
    base = re.sub(r"\.\d+(\.\d+)*$", "", base)                      # libfoo.0.9.4.dylib
    return base.split(".cpython-")[0].split(".cp3")[0].split(".abi3")[0]


def check(wheel: Path, max_size_mib: float | None, portable: bool | None) -> list[str]:
    problems: list[str] = []
    with zipfile.ZipFile(wheel) as zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
    names = [i.filename for i in infos]
    size = wheel.stat().st_size

    print(f"{wheel.name}: {size / 2**20:.2f} MiB compressed, "
          f"{sum(i.file_size for i in infos) / 2**20:.2f} MiB installed, {len(names)} files")
    for i in sorted(infos, key=lambda i: -i.file_size):
        if NATIVE.search(i.filename):
            print(f"  {i.file_size / 2**20:7.2f} MiB  {i.filename}")

    libs = [n for n in names if NATIVE.search(n)]
    seen: dict[str, str] = {}
    for n in libs:
        if re.search(r"\.so\.\d+", n) and not n.startswith("pyllama.libs/") and ".libs/" not in n:
            problems.append(f"SOVERSION-named copy of a library: {n}")
        stem = library_stem(n)
        if stem in seen:
            problems.append(f"library shipped twice: {seen[stem]} and {n}")
        seen[stem] = n
    if not any(library_stem(n) == "_core" for n in libs):
        problems.append("no pyllama._core extension module in the wheel")

    sources = [n for n in names if ".dist-info/" not in n
               and (SOURCE.search(n) or "/vendor/" in n or n.startswith("vendor/"))]
    if sources:
        problems.append(f"sources in the wheel: {sources[:10]}{' ...' if len(sources) > 10 else ''}")

    licences = [n for n in names if re.search(r"\.dist-info/licenses/", n)]
    if not any(re.search(r"LICENSE[^/]*llama", n, re.I) for n in licences):
        problems.append(f"llama.cpp's licence is missing from .dist-info/licenses/ (have: {licences})")

    variants = [n for n in libs if "ggml-cpu-" in n.rsplit("/", 1)[-1]]
    if portable is True and len(variants) < 2:
        problems.append(f"a portable wheel needs the CPU variant libraries; found {variants}")
    if portable is False and variants:
        problems.append(f"a non-portable wheel should not carry CPU variants: {variants}")

    if max_size_mib is not None and size > max_size_mib * 2**20:
        problems.append(f"wheel is {size / 2**20:.2f} MiB, over the {max_size_mib} MiB limit")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("--max-size-mib", type=float, default=None)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--portable", dest="portable", action="store_true", default=None)
    group.add_argument("--not-portable", dest="portable", action="store_false")
    args = parser.parse_args(argv)
    problems = check(args.wheel, args.max_size_mib, args.portable)
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    if not problems:
        print("wheel contents OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
