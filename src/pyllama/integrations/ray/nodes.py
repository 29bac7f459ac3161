"""Loading a model on whichever Ray node an actor or replica landed on.

A known model name is fetched into that node's cache through :mod:`pyllama.models` (a file
lock keeps two actors on one node from downloading it twice).  A path must exist on every
node; when it does not, the error names the node, since "file not found" alone does not say
which of fifty machines lacks the shared mount.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any, Union

from pyllama.errors import ModelLoadError
from pyllama.llm import LLM
from pyllama.models import ModelFetchError, resolve_model

ModelRef = Union[str, "os.PathLike[str]"]


def node_description() -> str:
    """``"Ray node <node id> (<hostname>, <ip>)"`` inside a Ray worker or driver, else
    ``"host <hostname>"``."""
    host = socket.gethostname()
    try:
        import ray

        if ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
            ip = ray.util.get_node_ip_address()
            return f"Ray node {node_id} ({host}, {ip})"
    except Exception:  # noqa: BLE001 - a description must never fail
        pass
    return f"host {host}"


def load_llm(model: ModelRef, **llm_args: Any) -> LLM:
    """``LLM(model, **llm_args)`` on this node, with errors that name the node.

    `model` is a known name (fetched here if this node's cache lacks it) or a path that
    must exist on this node.  A relative path is resolved against this worker's current
    directory, which is not the driver's: give absolute paths.
    """
    try:
        path = resolve_model(model, progress=False)
    except FileNotFoundError as exc:
        raw = os.fspath(model)
        hint = ""
        if not os.path.isabs(os.path.expanduser(raw)):
            hint = (f" (a relative path is looked up from this worker's directory, {os.getcwd()}; "
                    f"give an absolute path)")
        raise FileNotFoundError(
            errno.ENOENT,
            f"model file not found on {node_description()}{hint}: a model given as a path must exist at that "
            f"path on every node (shared storage, or a copy on each node); a known model name such as "
            f"'smollm2' is fetched on each node instead", raw) from exc
    except ModelFetchError as exc:
        raise ModelFetchError(f"fetching model {os.fspath(model)!r} failed on {node_description()}: {exc}") from exc
    except ModelLoadError as exc:   # a directory
        raise ModelLoadError(exc.path, f"{exc.reason} (on {node_description()})") from exc
    try:
        return LLM(str(path), **llm_args)
    except ModelLoadError as exc:
        raise ModelLoadError(exc.path, f"{exc.reason} (on {node_description()})") from exc
