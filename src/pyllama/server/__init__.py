"""pyllama's OpenAI-compatible HTTP server (the ``[server]`` extra: FastAPI, uvicorn).

    from pyllama import LLM
    from pyllama.server import create_app
    app = create_app(LLM("smollm2", n_parallel=4, kv_unified=False), api_keys=["secret"])
    # uvicorn.run(app, port=8080)    or:  pyllama serve -m smollm2 -np 4

The `LLM` does the work (its slots batch every running request into one llama_decode per
step, reuse cached prompt prefixes, compute logprobs, run `n` choices and tool calls); this
package adds HTTP, admission (slots + a bounded queue), OpenAI's request/response/error
shapes and llama-server's ops endpoints (/health, /metrics, /slots).  See docs/server.md.
"""

from __future__ import annotations

try:
    import fastapi  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"pyllama.server needs the [server] extra: pip install 'pyllama[server]' ({exc})") from exc

from pyllama.server.app import create_app
from pyllama.server.settings import ServerSettings

__all__ = ["create_app", "ServerSettings", "serve"]


def serve(*args, **kwargs):  # noqa: ANN002, ANN003
    """Run the server until SIGINT/SIGTERM (see :func:`pyllama.server.main.serve`)."""
    from pyllama.server.main import serve as _serve

    return _serve(*args, **kwargs)
