"""``pyllama rpc-server``: ggml's RPC server, sharing this machine's devices."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from pyllama._net import LOOPBACK_HOST, is_loopback
from pyllama.cli._args import _int
from pyllama.cli._common import EXIT_OK, UsageError, _enable_verbose, _say


def add_rpc_server_parser(sub: Any) -> None:
    p = sub.add_parser(
        "rpc-server", help="share this machine's devices with other pyllama/llama.cpp processes (ggml RPC)",
        description="Run ggml's RPC server from pyllama's own extension, so that LLM(rpc_servers=[...]) "
                    "(or llama.cpp's --rpc) elsewhere can place model layers on this machine. The protocol has "
                    "NO authentication: bind to loopback unless every host that can reach the port is trusted.")
    p.add_argument("--host", default=LOOPBACK_HOST, help=f"address to bind (default {LOOPBACK_HOST})")
    p.add_argument("--port", type=_int(1, "--port"), default=50052, help="TCP port (default 50052)")
    p.add_argument("-t", "--threads", type=_int(1, "--threads"), default=None, help="CPU threads for computing")
    p.add_argument("--device", action="append", default=None, metavar="NAME",
                   help="device to serve (repeatable; see 'pyllama info'); default: the GPUs, else the CPU")
    p.add_argument("--cache", action="store_true",
                   help="keep received tensors in a local cache (~/.cache/pyllama/rpc) so reloads are faster")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow binding to a non-loopback address (the protocol is unauthenticated)")
    p.add_argument("--verbose", action="store_true", help="print llama.cpp's log")
    p.set_defaults(func=cmd_rpc_server)


def cmd_rpc_server(args: argparse.Namespace) -> int:
    import threading

    from pyllama import _core
    from pyllama.models import cache_dir

    if args.verbose:
        _enable_verbose()
    if not _core.supports_rpc():
        raise UsageError("this pyllama was built without the RPC backend (rebuild without -DGGML_RPC=off)")
    host = args.host
    if not is_loopback(host):
        if not args.allow_remote:
            raise UsageError(f"refusing to bind to {host}: the RPC protocol has no authentication, so anyone "
                             "who can reach the port can run code on this machine's devices; pass "
                             "--allow-remote if every host on that network is trusted")
        _say(f"WARNING: serving on {host}:{args.port} without authentication; only trusted hosts must be able "
             "to reach this port")
    endpoint = f"{host}:{args.port}"
    cache = os.path.join(str(cache_dir()), "rpc") if args.cache else None
    if cache:
        os.makedirs(cache, exist_ok=True)
    failure: list = []

    def serve() -> None:
        try:
            _core.rpc_start_server(endpoint, threads=args.threads or 0, cache_dir=cache, devices=args.device)
        except BaseException as exc:  # reported by the main thread
            failure.append(exc)

    server = threading.Thread(target=serve, name="pyllama-rpc-server", daemon=True)
    server.start()
    try:
        while server.is_alive():
            server.join(0.2)
    except KeyboardInterrupt:
        _say("rpc-server stopped")
        sys.stdout.flush()
        sys.stderr.flush()
        # The server thread is inside ggml's accept loop, which has no stop call: end the
        # process here rather than wait for it.
        os._exit(EXIT_OK)
    if failure:
        raise failure[0]
    raise RuntimeError(f"the RPC server on {endpoint} stopped (is the port already in use?)")
