"""``pyllama info``: a model's facts and this build's, as text or JSON (the facts
themselves come from :mod:`pyllama.info`)."""

from __future__ import annotations

import argparse
import json
from typing import Any, Optional

from pyllama.cli._args import resolve_model_arg
from pyllama.cli._common import EXIT_OK, _enable_verbose
from pyllama.info import build_summary, model_info


def add_info_parser(sub: Any) -> None:
    p = sub.add_parser("info", help="describe a model, or this pyllama build",
                       description="With MODEL: architecture, size, quantisation, context, chat template. "
                                   "Always: pyllama and llama.cpp versions, compiled-in backends and devices.")
    p.add_argument("model", metavar="MODEL", nargs="?", help="a .gguf file or a known model name")
    p.add_argument("--json", action="store_true", help="print the information as one JSON object")
    p.add_argument("--verbose", action="store_true", help="print llama.cpp's log to stderr")
    p.set_defaults(func=cmd_info)


def _human_count(n: int) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{suffix}"
    return str(n)


def _human_bytes(n: Optional[int]) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _template_preview(template: str, max_lines: int = 4, width: int = 100) -> list:
    lines = template.splitlines() or [""]
    out = [(ln if len(ln) <= width else ln[: width - 3] + "...") for ln in lines[:max_lines]]
    if len(lines) > max_lines:
        out.append(f"... ({len(lines)} lines, {len(template)} characters)")
    return out


def _print_model_info(info: dict) -> None:
    w = print
    w(f"model:          {info['path']}")
    if info.get("name"):
        w(f"name:           {info['name']}")
    w(f"architecture:   {info['architecture']}")
    w(f"parameters:     {_human_count(info['n_params'])} ({info['n_params']:,})")
    w(f"quantisation:   {info['ftype']}")
    w(f"size on disk:   {_human_bytes(info['file_size'])} ({info['file_size']:,} bytes)")
    w(f"context:        {info['n_ctx_train']} tokens (n_ctx_train)")
    w(f"n_embd:         {info['n_embd']}")
    w(f"n_layer:        {info['n_layer']}")
    w(f"n_head:         {info['n_head']} (n_head_kv {info['n_head_kv']})")
    w(f"vocabulary:     {info['vocab_type']}, {info['n_vocab']} tokens"
      + (f" (bos {info['bos']!r}, eos {info['eos']!r})" if info.get("bos") or info.get("eos") else ""))
    if info.get("license"):
        w(f"license:        {info['license']}")
    template = info["chat_template"]
    if template is None:
        fb = info.get("chat_template_fallback")
        w("chat template:  none" + (f" (pyllama chat would use llama.cpp's built-in {fb!r})" if fb else ""))
    else:
        w("chat template:")
        for ln in _template_preview(template):
            w(f"    {ln}")


def _print_build_summary(s: dict) -> None:
    w = print
    w(f"pyllama:        {s['version']} ({s['package_dir']})")
    w(f"llama.cpp:      commit {s['llama_cpp_commit']}")
    w(f"python:         {s['python']}")
    w(f"system info:    {s['system_info']}")
    w("backends:")
    for b in s["backends"]:
        devices = b.get("devices") or []
        if not devices:
            w(f"    {b['name']}: no devices")
        for d in devices:
            mem = ""
            if d.get("memory_total"):
                mem = f", {_human_bytes(d.get('memory_free'))} free of {_human_bytes(d.get('memory_total'))}"
            w(f"    {b['name']}: {d.get('name')} - {d.get('description')} ({d.get('type')}{mem})")
    w(f"gpu:            {s['gpu']}")
    w(f"features:       gpu_offload={s['gpu_offload']} mmap={s['mmap']} mlock={s['mlock']} rpc={s['rpc']}")
    ow = s.get("openmp_wait") or {}
    if ow:
        setting = ", ".join(f"{k}={ow[k]}" for k in ("spincount", "wait_policy") if ow.get(k) is not None)
        w(f"openmp wait:    {setting or 'libgomp defaults'} ({ow.get('source')})")
    build = s["build"]
    if "error" in build:
        w(f"build options:  unknown ({build['error']})")
    else:
        opts = build.get("options") or {}
        on = [k for k, v in opts.items() if str(v).upper() in ("ON", "1", "TRUE", "YES")]
        w(f"build type:     {build.get('build_type')}, portable={build.get('portable')}")
        w("build options:  " + (", ".join(on) if on else "(none on)"))
        others = {k: v for k, v in opts.items() if k not in on and str(v).upper() not in ("OFF", "0", "FALSE", "NO", "")}
        if others:
            w("                " + ", ".join(f"{k}={v}" for k, v in others.items()))
        legacy = build.get("legacy_options_mapped") or []
        w("legacy mapped:  " + (", ".join(map(str, legacy)) if legacy else "none"))
        unknown = build.get("unknown_options") or []
        w("unknown opts:   " + (", ".join(map(str, unknown)) if unknown else "none"))
    w(f"models cache:   {s['models_cache']}")
    for name, cached in s["known_models"].items():
        mark = " (default)" if name == s["default_model"] else ""
        w(f"    {name}{mark}: {'cached' if cached else 'not downloaded'}")


def cmd_info(args: argparse.Namespace) -> int:
    if args.verbose:
        _enable_verbose()
    result: dict = {}
    if args.model is not None:
        result["model"] = model_info(resolve_model_arg(args.model))
    result["build"] = build_summary()
    if args.json:
        print(json.dumps(result, indent=2))
        return EXIT_OK
    if "model" in result:
        _print_model_info(result["model"])
        print()
    _print_build_summary(result["build"])
    return EXIT_OK
