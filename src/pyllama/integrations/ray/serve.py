"""Ray Serve: replicas of pyllama's OpenAI-compatible server.

:func:`build_app` makes a Serve application of one deployment.  Each replica loads its own
:class:`pyllama.LLM` (on the node Ray placed it) and serves the app of
:func:`pyllama.server.create_app` over it -- every route of ``pyllama serve``: chat and text
completions with SSE streaming, embeddings, ``/health``, ``/metrics``, ``/slots``.  Ray Serve's
proxy routes requests among the replicas and scales them; each replica batches its own
concurrent requests in its own context, as ``pyllama serve`` does.

Every HTTP response carries :data:`REPLICA_HEADER` (``x-pyllama-replica``), the id of the
replica that answered, so ``/health`` and ``/metrics`` (per replica, as Serve routes them) can
be told apart.

:func:`app_builder` is the same for ``serve run`` and Serve config files::

    serve run pyllama.integrations.ray:app_builder model=smollm2 num_replicas=2 n_threads=1
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any, Callable, Mapping, Optional

from pyllama.integrations.ray.nodes import ModelRef, load_llm

#: The response header naming the replica that answered.
REPLICA_HEADER = "x-pyllama-replica"

#: serve.ingress() takes a function that builds the app in each replica from this release on.
_MIN_RAY = (2, 47)


def build_app(model: ModelRef, num_replicas: Any = None, *, name: str = "pyllama",
              server_settings: Optional[Mapping[str, Any]] = None,
              ray_actor_options: Optional[Mapping[str, Any]] = None,
              deployment_options: Optional[Mapping[str, Any]] = None, **llm_args: Any) -> Any:
    """A Ray Serve application: `num_replicas` replicas of the OpenAI-compatible server, each
    with its own ``LLM(model, **llm_args)``.

    `model` is a known model name (fetched on each node through :mod:`pyllama.models`) or a
    path that exists on every node (a relative path is made absolute here, on the driver).
    `llm_args` are :class:`pyllama.LLM`'s keywords (``n_ctx``, ``n_parallel``, ``n_threads``,
    sampling defaults ...); `server_settings` are :func:`pyllama.server.create_app`'s
    (``api_keys``, ``model_alias``, ``max_queue`` ...).  `num_replicas` is 1 unless given or
    unless ``deployment_options`` has an ``autoscaling_config``; ``"auto"`` is Serve's
    default autoscaling.  Each replica reserves ``n_threads`` CPUs (1 when not given)
    unless `ray_actor_options` says otherwise.  `deployment_options` go to
    ``serve.deployment`` as they are (``autoscaling_config``, ``health_check_period_s`` ...);
    ``max_ongoing_requests`` defaults to twice ``n_parallel``: the slots, and as many requests
    again waiting in the replica to join at the next step, while further ones wait in Serve's
    router for whichever replica frees up first.

    Run it with ``serve.run(build_app(...), route_prefix="/")``.  Wrong argument names and
    settings fail here, on the driver, not later on every replica.
    """
    import ray
    from ray import serve

    if _version_tuple(ray.__version__) < _MIN_RAY:
        raise ImportError(f"build_app needs Ray >= {'.'.join(map(str, _MIN_RAY))} (serve.ingress with an app builder "
                          f"function), this is Ray {ray.__version__}: pip install -U \"pyllama[ray]\"")
    _check_llm_args(llm_args)
    settings = dict(server_settings or {})
    from pyllama.server.settings import ServerSettings

    ServerSettings.from_kwargs(**settings)   # TypeError/ValueError now, not on each replica
    model = _absolute_if_path(model)
    actor_options = dict(ray_actor_options or {})
    actor_options.setdefault("num_cpus", llm_args.get("n_threads") or 1)
    options = dict(deployment_options or {})
    # A replica takes as many requests as it has slots, and as many again waiting for a slot
    # (they join at the next step); more wait in Serve's router, free to go to another replica.
    options.setdefault("max_ongoing_requests", 2 * max(int(llm_args.get("n_parallel") or 1), 1))
    options.setdefault("name", name)
    if num_replicas is not None:
        options["num_replicas"] = num_replicas
    elif "autoscaling_config" not in options:
        options["num_replicas"] = 1
    options["ray_actor_options"] = actor_options

    def build_replica_app() -> Any:   # runs in each replica, when it starts
        return _replica_app(model, llm_args, settings)

    @serve.ingress(build_replica_app)
    class PyllamaServer:
        """One replica: one model, the OpenAI-compatible app."""

    return serve.deployment(PyllamaServer, **options).bind()


def app_builder(args: Mapping[str, Any]) -> Any:
    """:func:`build_app` for ``serve run module:app_builder key=value ...`` and the
    ``import_path`` / ``args`` of a Serve config file.

    On the command line every value arrives as a string; values that parse as JSON
    (``2``, ``0.5``, ``true``, ``["</s>"]``) are used parsed, others as text.  ``model``
    (or ``model_path``) is always text.
    """
    args = dict(args)
    model = args.pop("model", None)
    if model is None:
        model = args.pop("model_path", None)
    if model is None:
        raise TypeError("app_builder needs model=<known name or path on every node>, e.g. "
                        "serve run pyllama.integrations.ray:app_builder model=smollm2 num_replicas=2")
    return build_app(str(model), **{k: _cli_value(v) for k, v in args.items()})


# --------------------------------------------------------------------------- in each replica


def _replica_app(model: ModelRef, llm_args: Mapping[str, Any], settings: Mapping[str, Any]) -> Any:
    from pyllama.server import create_app

    llm = load_llm(model, **llm_args)
    try:
        app = create_app(llm, **settings)
    except BaseException:
        llm.close()
        raise
    return _ReplicaApp(app, llm, _replica_id())


def _replica_id() -> str:
    from ray import serve

    try:
        replica = serve.get_replica_context().replica_id
    except Exception:  # noqa: BLE001 - outside a replica (tests of the app itself)
        return f"pid-{os.getpid()}"
    return str(getattr(replica, "unique_id", None) or replica)


class _ReplicaApp:
    """ASGI wrapper around one replica's app: names the replica in every response and
    closes the replica's LLM when Serve stops it (lifespan shutdown)."""

    def __init__(self, app: Any, llm: Any, replica_id: str) -> None:
        self.app = app
        self.llm = llm
        self.replica_id = replica_id
        self._header = (REPLICA_HEADER.encode("latin-1"), replica_id.encode("latin-1"))

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            async def send_closing(message: dict) -> None:
                if message.get("type") == "lifespan.shutdown.complete":
                    self.llm.close()
                await send(message)

            await self.app(scope, receive, send_closing)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_named(message: dict) -> None:
            if message.get("type") == "http.response.start":
                message = dict(message)
                message["headers"] = [*message.get("headers", ()), self._header]
            await send(message)

        await self.app(scope, receive, send_named)


# --------------------------------------------------------------------------- arguments


def _check_llm_args(llm_args: Mapping[str, Any]) -> None:
    from pyllama.llm import LLM
    from pyllama.sampling import FIELD_NAMES, _unknown_message

    params = inspect.signature(LLM.__init__).parameters
    valid = frozenset(n for n, p in params.items()
                      if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)) - {"self", "model_path", "model"}
    valid |= FIELD_NAMES
    unknown = set(llm_args) - valid
    if unknown:
        raise TypeError("build_app(): " + _unknown_message(unknown, valid, "argument"))


def _absolute_if_path(model: ModelRef) -> str:
    """A path relative to the driver's directory would be looked up in each worker's own
    directory: make it absolute here.  Known names stay as they are."""
    raw = os.fspath(model)
    expanded = os.path.expanduser(raw)
    if os.path.exists(expanded) or os.sep in raw or raw.endswith(".gguf") or not isinstance(model, str):
        return os.path.abspath(expanded)
    return raw


def _version_tuple(version: str) -> tuple:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _cli_value(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


__all__ = ["build_app", "app_builder", "REPLICA_HEADER"]
