#!/usr/bin/env python3
"""Lay out built wheels as PEP 503 "simple" package indexes, one per build variant.

    python scripts/make_index.py --out index cpu=wheels/cpu cu124=wheels/cu124 vulkan=wheels/vulkan

writes (each VARIANT=DIR pair copies DIR's *.whl / *.tar.gz into its index):

    index/index.html                    the default (first) variant's root: links to pyllama/
    index/pyllama/index.html            its files, each link with #sha256=... and
                                        data-requires-python from the wheel's metadata
    index/pyllama/<files>
    index/<variant>/index.html          every other variant as its own index root
    index/<variant>/pyllama/index.html
    index/variants.html                 a human page listing the variants and the pip commands

Serve the folder statically (GitHub Pages, any web server, or `python -m http.server`) and
install with `pip install pyllama --extra-index-url https://HOST/PATH/index/<variant>/`
(plain `.../index/` for the default CPU wheels).  Each variant is a separate index because
its wheels carry the same file names as the CPU ones (same version, same platform tag).
Only the standard library is used.
"""

from __future__ import annotations

import argparse
import email.parser
import hashlib
import html
import re
import shutil
import sys
import zipfile
from pathlib import Path

PROJECT = "pyllama"


def normalize(name: str) -> str:
    """PEP 503 name normalisation."""
    return re.sub(r"[-_.]+", "-", name).lower()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def requires_python(path: Path) -> str | None:
    """Requires-Python of a wheel (from its METADATA); None for an sdist or when absent."""
    if path.suffix != ".whl":
        return None
    with zipfile.ZipFile(path) as zf:
        meta = next((n for n in zf.namelist() if n.endswith(".dist-info/METADATA")), None)
        if meta is None:
            return None
        msg = email.parser.Parser().parsestr(zf.read(meta).decode("utf-8"), headersonly=True)
    return msg.get("Requires-Python")


def page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html>\n<head><meta charset=\"utf-8\">"
            f"<meta name=\"pypi:repository-version\" content=\"1.0\"><title>{html.escape(title)}</title></head>\n"
            "<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def build_index(root: Path, files: list[Path]) -> None:
    """One PEP 503 index at root: root/index.html and root/<project>/index.html + files."""
    project_dir = root / normalize(PROJECT)
    project_dir.mkdir(parents=True, exist_ok=True)
    links = []
    for f in sorted(files, key=lambda p: p.name):
        dest = project_dir / f.name
        if dest.resolve() != f.resolve():
            shutil.copy2(f, dest)
        rp = requires_python(dest)
        attr = f' data-requires-python="{html.escape(rp, quote=True)}"' if rp else ""
        href = f"{html.escape(f.name, quote=True)}#sha256={sha256(dest)}"
        links.append(f'<a href="{href}"{attr}>{html.escape(f.name)}</a><br>')
    (project_dir / "index.html").write_text(page(f"Links for {PROJECT}", [f"<h1>Links for {PROJECT}</h1>", *links]))
    (root / "index.html").write_text(page("Simple index", [f'<a href="{normalize(PROJECT)}/">{PROJECT}</a><br>']))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="index root to (re)write")
    parser.add_argument("variants", nargs="+", metavar="VARIANT=DIR",
                        help="the first one is the default index at the root (normally cpu=...)")
    args = parser.parse_args(argv)

    rows = []
    for i, spec in enumerate(args.variants):
        variant, sep, folder = spec.partition("=")
        if not sep or not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", variant):
            parser.error(f"expected VARIANT=DIR with a lower-case variant name, got {spec!r}")
        files = sorted(p for p in Path(folder).rglob("*") if p.name.endswith((".whl", ".tar.gz")))
        if not files:
            print(f"warning: no wheels in {folder} for variant {variant}", file=sys.stderr)
        root = args.out if i == 0 else args.out / variant
        build_index(root, files)
        url = "index/" if i == 0 else f"index/{variant}/"
        rows.append(f"<li><b>{html.escape(variant)}</b>: {len(files)} files &mdash; "
                    f"<code>pip install {PROJECT} --extra-index-url https://HOST/{url}</code></li>")
        print(f"{variant}: {len(files)} files -> {root}")
    (args.out / "variants.html").write_text(page(f"{PROJECT} wheel variants", [f"<h1>{PROJECT} wheels</h1>", "<ul>", *rows, "</ul>"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
