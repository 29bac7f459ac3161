#!/usr/bin/env python3
"""Extract llama-cpp-python's own test files (tests/ of its registry source release) into a
cache directory outside the repository and print that directory.

tests/test_compat_upstream.py runs these files against ``pyllama.install_as_llama_cpp()``.
The archive is the very one vendor/llama.cpp comes from (vendor/llama.cpp.pin.json: same
version, same sha256), fetched and cached by scripts/vendor_llama_cpp.py's ``fetch_archive``
(``pip download --no-deps --no-binary llama-cpp-python``; ``--no-binary`` for that one package
only, so pip never builds its build backend from source) into ~/.cache/pyllama/archives.
When the archive is already cached (the vendoring or the benchmark set-up fetched it) nothing
is downloaded.  llama-cpp-python itself is never installed.

Usage::

    python scripts/fetch_llama_cpp_python_tests.py            # prints .../tests
    python scripts/fetch_llama_cpp_python_tests.py --force    # re-extract

Idempotent: a second run only checks a marker file and prints the path.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import vendor_llama_cpp  # noqa: E402  (same directory; shares the pin, the cache and the download)

MARKER = ".pyllama-upstream-tests.json"


def tests_cache_dir(pin: dict) -> Path:
    """~/.cache/pyllama/llama-cpp-python-tests/<version>: next to the archive cache, outside the repo."""
    return vendor_llama_cpp.cache_dir().parent / f"{pin['package']}-tests" / pin["version"]


@contextlib.contextmanager
def _stdout_to_stderr():
    """pip's progress goes to stderr too, so that stdout is the path alone (``$(...)`` works)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def extract_tests(force: bool = False) -> Path:
    """Return the directory holding the pinned release's tests/ (extracting it when needed)."""
    pin = vendor_llama_cpp.load_pin()
    dest = tests_cache_dir(pin)
    tests = dest / "tests"
    try:
        marker = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        marker = None
    if not force and marker and marker.get("sha256") == pin["sha256"] and tests.is_dir():
        return tests

    with _stdout_to_stderr():
        archive = vendor_llama_cpp.fetch_archive(pin)  # hash-checked; downloads only when not cached
    top = pin["subtree"].split("/", 1)[0]  # llama_cpp_python-<version>
    prefix = f"{top}/tests/"
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".tests-"))
    staging.chmod(0o755)  # mkdtemp makes it private; it becomes the cache directory
    try:
        found = 0
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if not member.name.startswith(prefix) or not member.isfile():
                    continue  # only regular files of tests/: no links, nothing else of the release
                member.name = "tests/" + member.name[len(prefix):]
                tar.extract(member, staging, filter="data")
                found += 1
        if not found:
            raise SystemExit(f"{archive} has no {prefix} directory")
        record = {"package": pin["package"], "version": pin["version"], "sha256": pin["sha256"], "files": found}
        (staging / MARKER).write_text(json.dumps(record, indent=2) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        staging.replace(dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return tests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="re-extract even when up to date")
    args = parser.parse_args(argv)
    print(extract_tests(force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
