"""Running the app under uvicorn: what `pyllama serve` calls.

The HTTP socket opens first and the model loads in a thread (``/health`` answers 503
"Loading model" until it is ready, as llama-server does).  SIGINT/SIGTERM: uvicorn stops
accepting connections, in-flight requests get `shutdown_timeout_s` seconds to finish, the
rest are cancelled (their generations stop at the next step), the LLM is closed, and
:func:`serve` returns normally (exit status 0).  ``--host a,b`` listens on each address
(llama-server's syntax), all on the same port.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import socket
import threading
from typing import Any, Callable, Iterator, List, Optional, Sequence, Union

from pyllama._net import LOOPBACK_HOST
from pyllama.server.app import create_app

logger = logging.getLogger("pyllama.server")


def parse_hosts(host: Union[str, Sequence[str]]) -> List[str]:
    """llama-server's ``--host``: one address or several, comma-separated (blanks dropped);
    a bracketed IPv6 address (``[::1]``) is taken without its brackets."""
    parts = host.split(",") if isinstance(host, str) else list(host)
    hosts = []
    for part in parts:
        part = part.strip()
        if part.startswith("[") and part.endswith("]"):
            part = part[1:-1]
        if part:
            hosts.append(part)
    if not hosts:
        raise ValueError(f"--host needs at least one address, got {host!r}")
    for h in hosts:
        if h.endswith(".sock"):
            raise ValueError(f"--host {h}: UNIX socket paths are not supported, give an IP address or host name")
    if len(hosts) > 1 and len(set(hosts)) != len(hosts):
        raise ValueError(f"--host lists an address twice: {host!r}")
    return hosts


def bind_sockets(hosts: Sequence[str], port: int) -> List[socket.socket]:
    """One listening TCP socket per address of `hosts` on `port` (closed again if one fails).

    As llama-server does with several addresses: an IPv6 socket is IPv6-only, so ``::`` next
    to ``0.0.0.0`` does not claim the IPv4 addresses too."""
    if port == 0:
        raise ValueError("--port 0 is not supported with several --host addresses (as in llama-server)")
    socks: List[socket.socket] = []
    try:
        for host in hosts:
            socks.append(_bind_one(host, port))
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def _bind_one(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(f"could not serve on {host}:{port}: {exc.strerror or exc}") from None
    error: Optional[OSError] = None
    for family, kind, proto, _, address in infos:   # the first address of the name that binds
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        return sock
    raise OSError(f"could not serve on {host}:{port} (is the port already in use?): "
                  f"{getattr(error, 'strerror', None) or error}")


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(loader: Callable[[], Any], *, host: Union[str, Sequence[str]] = LOOPBACK_HOST, port: int = 8080,
          shutdown_timeout_s: float = 3.0, log_level: str = "warning",
          on_listening: Optional[Callable[[str], None]] = None, http: str = "auto", **settings: Any) -> int:
    """Serve the LLM `loader()` returns until SIGINT/SIGTERM; returns 0 after a clean stop.

    `host` may name several addresses (a list, or comma-separated as llama-server's --host):
    the server then listens on each, on the same `port` (which must not be 0).
    `on_listening` gets the URL(s) once the sockets listen, several joined by " and ".
    `http`: uvicorn's HTTP implementation ("auto": httptools when installed, else h11).
    httptools is the faster one but writes every response header name in lowercase; h11
    keeps the app's spelling (HTTP header names are case-insensitive; some clients read
    them case-sensitively)."""
    import uvicorn

    hosts = parse_hosts(host)
    # several addresses: bound here, before the model loads; one: uvicorn binds it (as always)
    sockets = bind_sockets(hosts, port) if len(hosts) > 1 else None
    try:
        app = create_app(loader=loader, **settings)
        max_header_bytes = app.state.pyllama.settings.max_header_bytes
        config = uvicorn.Config(app, host=hosts[0], port=port, log_level=log_level,
                                access_log=log_level == "info",
                                timeout_graceful_shutdown=max(1, int(round(shutdown_timeout_s))),
                                timeout_keep_alive=5, lifespan="on",
                                http=limited_http_protocol(max_header_bytes, implementation=http),
                                h11_max_incomplete_event_size=max_header_bytes + 4)
        server = _Server(config)
        server.on_listening = on_listening
        server.hosts = hosts
        where = ", ".join(f"{h}:{port}" for h in hosts)
        try:
            server.run(sockets=sockets)
        except SystemExit as exc:   # uvicorn exits when it cannot bind
            if exc.code not in (0, None):
                raise OSError(f"could not serve on {where} (is the port already in use?)") from None
        if not server.started:
            raise OSError(f"could not serve on {where} (is the port already in use?)")
    finally:
        for sock in sockets or ():
            sock.close()
    return 0


_TOO_LARGE_BODY = json.dumps({"error": {"message": "the request line and headers are larger than the limit",
                                       "type": "invalid_request_error", "param": None,
                                       "code": "headers_too_large"}}).encode()
_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
              b"connection: close\r\ncontent-length: " + str(len(_TOO_LARGE_BODY)).encode() + b"\r\n\r\n"
              + _TOO_LARGE_BODY)


def limited_http_protocol(max_header_bytes: int, implementation: str = "auto") -> type:
    """uvicorn's HTTP protocol (`implementation` "httptools" or "h11"; "auto": httptools when
    installed, as uvicorn picks) that answers 431 and closes the connection once a request's
    line and headers pass `max_header_bytes`, counted as the bytes arrive: httptools has no
    limit of its own and would buffer any size of headers."""
    Base: Any
    if implementation == "h11":
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base
    else:
        try:
            from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
        except ImportError:
            if implementation == "httptools":
                raise
            from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class LimitedHTTP(Base):  # type: ignore[misc, valid-type]
        _in_head = True       # reading a request line + headers (vs. a body)
        _head_bytes = 0
        _tail = b""           # the last bytes seen, for a \r\n\r\n split over two reads

        def data_received(self, data: bytes) -> None:
            if not self._in_head and self._h11_request_done():
                self._next_request()
            if self._in_head:
                end = (self._tail + data).find(b"\r\n\r\n")
                counted = len(data) if end < 0 else max(0, end + 4 - len(self._tail))
                self._head_bytes += counted
                if self._head_bytes > max_header_bytes:
                    self.transport.write(_TOO_LARGE)
                    self.transport.close()
                    return
                if end >= 0:
                    self._in_head = False
                    self._tail = b""
                else:
                    self._tail = (self._tail + data)[-3:]
            super().data_received(data)

        def _next_request(self) -> None:
            self._in_head, self._head_bytes, self._tail = True, 0, b""

        def _h11_request_done(self) -> bool:
            # h11 (keep-alive): the next request's bytes come once this one was answered
            cycle = getattr(self, "cycle", None)
            return not hasattr(Base, "on_message_complete") and cycle is not None and cycle.response_complete

        if hasattr(Base, "on_message_complete"):      # httptools: the request's body was read
            def on_message_complete(self) -> None:
                super().on_message_complete()
                self._next_request()

    return LimitedHTTP


class _Server:
    """uvicorn.Server that does not re-raise the stopping signal after a graceful shutdown
    (uvicorn does, which would turn a clean SIGTERM stop into death by signal)."""

    def __new__(cls, config: Any) -> Any:
        import uvicorn

        class Server(uvicorn.Server):
            on_listening: Optional[Callable[[str], None]] = None
            hosts: Sequence[str] = ()

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
                    port = self.config.port
                    for srv in getattr(self, "servers", ()):    # the real port when --port 0
                        for sock in getattr(srv, "sockets", ()) or ():
                            port = sock.getsockname()[1]
                    hosts = self.hosts or [self.config.host]
                    self.on_listening(" and ".join(_url(h.strip("[]"), port) for h in hosts))

        return Server(config)
