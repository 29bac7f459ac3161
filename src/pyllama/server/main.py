"""Running the app under uvicorn: what `pyllama serve` calls.

The HTTP socket opens first and the model loads in a thread (``/health`` answers 503
"Loading model" until it is ready, as llama-server does).  SIGINT/SIGTERM: uvicorn stops
accepting connections, in-flight requests get `shutdown_timeout_s` seconds to finish, the
rest are cancelled (their generations stop at the next step), the LLM is closed, and
:func:`serve` returns normally (exit status 0).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Any, Callable, Iterator, Optional

from pyllama.server.app import create_app

logger = logging.getLogger("pyllama.server")

_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


def is_loopback(host: str) -> bool:
    return host in _LOOPBACK or host.startswith("127.")


def serve(loader: Callable[[], Any], *, host: str = "127.0.0.1", port: int = 8080,
          shutdown_timeout_s: float = 3.0, log_level: str = "warning",
          on_listening: Optional[Callable[[str], None]] = None, **settings: Any) -> int:
    """Serve the LLM `loader()` returns until SIGINT/SIGTERM; returns 0 after a clean stop."""
    import uvicorn

    app = create_app(loader=loader, **settings)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level == "info",
                            timeout_graceful_shutdown=max(1, int(round(shutdown_timeout_s))),
                            timeout_keep_alive=5, lifespan="on")
    server = _Server(config)
    server.on_listening = on_listening
    try:
        server.run()
    except SystemExit as exc:   # uvicorn exits when it cannot bind
        if exc.code not in (0, None):
            raise OSError(f"could not serve on {host}:{port} (is the port already in use?)") from None
    if not server.started:
        raise OSError(f"could not serve on {host}:{port} (is the port already in use?)")
    return 0


class _Server:
    """uvicorn.Server that does not re-raise the stopping signal after a graceful shutdown
    (uvicorn does, which would turn a clean SIGTERM stop into death by signal)."""

    def __new__(cls, config: Any) -> Any:
        import uvicorn

        class Server(uvicorn.Server):
            on_listening: Optional[Callable[[str], None]] = None

            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return
                handled = (signal.SIGINT, signal.SIGTERM)
                original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
                try:
                    yield
                finally:
                    for sig, handler in original.items():
                        signal.signal(sig, handler)

            async def startup(self, sockets: Any = None) -> None:
                await super().startup(sockets=sockets)
                if self.started and self.on_listening is not None:
                    host, port = self.config.host, self.config.port
                    for srv in getattr(self, "servers", ()):    # the real port when --port 0
                        for sock in getattr(srv, "sockets", ()) or ():
                            port = sock.getsockname()[1]
                    if ":" in host and not host.startswith("["):
                        host = f"[{host}]"
                    self.on_listening(f"http://{host}:{port}")

        return Server(config)
