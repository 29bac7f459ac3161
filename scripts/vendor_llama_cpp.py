#!/usr/bin/env python3
"""Populate vendor/llama.cpp with the pinned upstream llama.cpp tree.

The pin (registry archive, its sha256 and the upstream commit) lives in
vendor/llama.cpp.pin.json; bumping llama.cpp means editing that one file.

The archive is the source release of llama-cpp-python on the package registry,
fetched with the ordinary ``pip download`` client (or, when pip cannot run, from
the registry's JSON API), checked against the pinned hash and cached outside
the repository.  Only the ``vendor/llama.cpp`` subtree is used, and only the
parts our build needs:

* ``build``  - what compiles libllama and ggml (always extracted);
* ``vocab``  - models/ggml-vocab-*.gguf and their tokenizer test vectors;
* ``tools``  - common/, tools/, examples/ for the benchmark's native binaries.

The script is idempotent: when vendor/llama.cpp already holds the pinned tree
with the requested parts it returns at once.

Usage::

    python scripts/vendor_llama_cpp.py [--with vocab] [--with tools] [--dest DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIN_FILE = ROOT / "vendor" / "llama.cpp.pin.json"
DEFAULT_DEST = ROOT / "vendor" / "llama.cpp"
MARKER = ".pyllama-vendor.json"

# Paths inside the upstream tree, per part.  Directories are taken whole.
PARTS: dict[str, tuple[str, ...]] = {
    # tools/mtmd: the multimodal library, built into _core by default (PYLLAMA_MTMD).
    "build": ("CMakeLists.txt", "LICENSE", "AUTHORS", "licenses", "cmake", "ggml", "src", "include", "vendor",
              "tools/mtmd"),
    "vocab": ("models/ggml-vocab-",),
    # scripts/ui-assets.cmake: llama-server's CMake (benchmarks); the JSON-schema test cases: tests.
    "tools": ("common", "tools", "examples", "pocs", "scripts/ui-assets.cmake",
              "tests/test-json-schema-to-grammar.cpp"),
}
# Never needed by any part, even inside the directories above (saves space in the sdist).
EXCLUDE_SUFFIXES = (".md", ".png", ".jpg", ".svg")


def log(msg: str) -> None:
    print(f"[vendor_llama_cpp] {msg}", file=sys.stderr, flush=True)


def load_pin() -> dict:
    return json.loads(PIN_FILE.read_text())


def cache_dir() -> Path:
    base = os.environ.get("PYLLAMA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pyllama"
    )
    path = Path(base) / "archives"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip_download(pin: dict, dest: Path) -> bool:
    """Fetch the sdist with pip; returns False when no pip is usable here."""
    spec = f"{pin['package']}=={pin['version']}"
    # --no-binary for this one package only: build dependencies of its metadata step
    # still come as wheels, which takes seconds instead of minutes.
    args = ["download", "--no-deps", "--no-binary", pin["package"], "-d", str(dest), spec]
    candidates = [[sys.executable, "-m", "pip"]]
    for name in ("pip3", "pip"):
        exe = shutil.which(name)
        if exe:
            candidates.append([exe])
    for cmd in candidates:
        try:
            probe = subprocess.run(cmd + ["--version"], capture_output=True, text=True)
        except OSError:
            continue
        if probe.returncode != 0:
            continue
        log(f"downloading {spec} with: {' '.join(cmd)} download")
        result = subprocess.run(cmd + args)
        if result.returncode == 0:
            return True
        log(f"pip download failed (exit {result.returncode})")
    return False


def _registry_download(pin: dict, dest: Path) -> None:
    """Fallback without pip: the registry's JSON API names the file and its URL."""
    index = os.environ.get("PYLLAMA_PYPI_JSON", "https://pypi.org/pypi")
    url = f"{index}/{pin['package']}/{pin['version']}/json"
    log(f"pip unavailable; asking {url}")
    with urllib.request.urlopen(url, timeout=60) as resp:
        info = json.load(resp)
    for entry in info["urls"]:
        if entry["filename"] == pin["archive"]:
            target = dest / pin["archive"]
            with urllib.request.urlopen(entry["url"], timeout=300) as resp, target.open("wb") as out:
                shutil.copyfileobj(resp, out)
            return
    raise SystemExit(f"{pin['archive']} is not listed for {pin['package']} {pin['version']}")


def fetch_archive(pin: dict) -> Path:
    cached = cache_dir() / pin["archive"]
    if cached.exists() and sha256_of(cached) == pin["sha256"]:
        return cached
    with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
        tmp_path = Path(tmp)
        if not _pip_download(pin, tmp_path):
            _registry_download(pin, tmp_path)
        got = tmp_path / pin["archive"]
        if not got.exists():
            raise SystemExit(f"download did not produce {pin['archive']} (got {os.listdir(tmp)})")
        actual = sha256_of(got)
        if actual != pin["sha256"]:
            raise SystemExit(
                f"sha256 mismatch for {pin['archive']}: expected {pin['sha256']}, got {actual}. "
                "Refusing to use it."
            )
        os.replace(got, cached)
    return cached


def _wanted(rel: str, parts: list[str]) -> bool:
    if rel.endswith(EXCLUDE_SUFFIXES) and not rel.startswith("licenses"):
        return False
    for part in parts:
        for prefix in PARTS[part]:
            if rel == prefix or rel.startswith(prefix + "/") or (prefix.endswith("-") and rel.startswith(prefix)):
                return True
    return False


def read_marker(dest: Path) -> dict | None:
    try:
        return json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return None


def vendor(dest: Path, parts: list[str], force: bool = False) -> Path:
    pin = load_pin()
    parts = sorted(set(["build", *parts]))
    marker = read_marker(dest)
    if not force and marker and marker.get("sha256") == pin["sha256"] and set(parts) <= set(marker.get("parts", [])):
        return dest
    if dest.exists() and marker is None and any(dest.iterdir()):
        raise SystemExit(f"{dest} exists but was not made by this script; remove it or pass --dest elsewhere")

    archive = fetch_archive(pin)
    have = set(marker.get("parts", [])) if marker and marker.get("sha256") == pin["sha256"] else set()
    todo = [p for p in parts if p not in have] if not force else parts
    log(f"extracting {', '.join(todo)} of {pin['upstream']}@{pin['commit']} into {dest}")
    prefix = pin["subtree"].rstrip("/") + "/"
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".llama.cpp-"))
    try:
        if have and not force:
            staging.rmdir()
            shutil.copytree(dest, staging, symlinks=True)
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if not member.name.startswith(prefix):
                    continue
                rel = member.name[len(prefix):]
                if not rel or not _wanted(rel, todo):
                    continue
                if not (member.isfile() or member.isdir()):
                    continue  # no links or devices from an archive
                member.name = rel
                tar.extract(member, staging, filter="data")
        record = {
            "upstream": pin["upstream"],
            "commit": pin["commit"],
            "archive": pin["archive"],
            "sha256": pin["sha256"],
            "parts": sorted(have | set(todo)),
        }
        (staging / MARKER).write_text(json.dumps(record, indent=2) + "\n")
        (staging / "COMMIT").write_text(pin["commit"] + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--with", dest="parts", action="append", default=[], choices=sorted(PARTS),
                        help="extra part to extract (repeatable); 'build' is always extracted")
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    parser.add_argument("--force", action="store_true", help="re-extract even when up to date")
    parser.add_argument("--print-commit", action="store_true", help="print the pinned commit and exit")
    args = parser.parse_args(argv)
    if args.print_commit:
        print(load_pin()["commit"])
        return 0
    dest = vendor(args.dest.resolve(), args.parts, force=args.force)
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
