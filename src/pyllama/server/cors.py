"""CORS as llama-server does it (tools/server/server-http.cpp, its pre-routing handler).

Installed only when ``--cors-origin``/``--cors-origins`` is given (pyllama's default is no
CORS headers at all; llama-server's is ``*``).  Then, for every request:

* ``Access-Control-Allow-Origin`` is the request's ``Origin`` when that origin is allowed:
  any origin for ``*`` (llama-server reflects it, since its credentials default to on), a
  loopback origin (``localhost``, ``127.0.0.1``, ``[::1]``, any scheme and port) for the
  keyword ``localhost``, or an origin listed literally.  A disallowed origin gets no header.
* Every ``OPTIONS`` request (a preflight) is answered here, before the API key check
  (browsers send no ``Authorization`` on a preflight): 200, an empty ``text/html`` body,
  ``Access-Control-Allow-Credentials: true``, ``Access-Control-Allow-Methods: GET, POST,
  DELETE, OPTIONS`` and ``Access-Control-Allow-Headers: *`` (llama-server's defaults).  A
  preflight from a disallowed origin gets the same 200 without the allow-origin header (the
  browser then refuses the request), not a 400.

The header names are sent in llama-server's casing (``Access-Control-Allow-Origin``): HTTP
says names are case-insensitive, but some clients (llama-server's own test suite among them)
read them case-sensitively.

Deliberate differences: a list of origins reflects the one that matches (llama-server sends
the list itself, which browsers refuse); nothing is added to a request without ``Origin``
(llama-server sends its value, or an empty one); and ``Vary: Origin`` is added when the
header is reflected, so that caches keep one answer per origin.  As in llama-server, the
actual (non-preflight) responses carry only the allow-origin header, not allow-credentials,
so a browser still does not let a page read a response to a credentialed (cookie) request.
"""

from __future__ import annotations

import re
from typing import Any, Callable, List, Optional, Sequence, Tuple

#: llama-server's --cors-methods and --cors-headers defaults.
ALLOW_METHODS = b"GET, POST, DELETE, OPTIONS"
ALLOW_HEADERS = b"*"

#: The keyword origin "localhost": the loopback hosts of llama-server's origin_is_localhost,
#: http or https, any port.  (Exact host match: "http://localhost.evil.com" is not one.)
_LOOPBACK_ORIGIN = re.compile(rb"https?://(?:localhost|127\.0\.0\.1|\[::1\])(?::[0-9]{1,5})?")

Headers = List[Tuple[bytes, bytes]]


def allowed_origin(origin: Optional[bytes], origins: Sequence[str]) -> Optional[bytes]:
    """The Access-Control-Allow-Origin value for a request's `origin` (its raw header), or
    None when the origin is not allowed (or the request has none)."""
    if not origin:
        return None
    if "*" in origins:
        return origin
    if "localhost" in origins and _LOOPBACK_ORIGIN.fullmatch(origin):
        return origin
    try:
        text = origin.decode("ascii")
    except UnicodeDecodeError:
        return None
    return origin if text in origins else None


def _header(scope: dict, name: bytes) -> Optional[bytes]:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


def _with_vary_origin(headers: Headers) -> Headers:
    """`headers` with "Origin" added to its Vary header (or a new ``Vary: Origin``)."""
    out: Headers = []
    found = False
    for key, value in headers:
        if key.lower() == b"vary" and not found:
            found = True
            if b"origin" not in value.lower():
                value = value + b", Origin" if value.strip() else b"Origin"
        out.append((key, value))
    if not found:
        out.append((b"Vary", b"Origin"))
    return out


class CORSMiddleware:
    """Pure ASGI middleware (responses stream through untouched) adding llama-server's CORS
    headers for the allowed `origins` ("*", "localhost", or literal origins)."""

    def __init__(self, app: Any, origins: Sequence[str]) -> None:
        self.app = app
        self.origins = tuple(origins)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        allow = allowed_origin(_header(scope, b"origin"), self.origins)
        if scope.get("method") == "OPTIONS":
            await self._preflight(allow, send)
            return
        if allow is None:
            await self.app(scope, receive, send)
            return

        async def send_with_cors(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ())
                           if k.lower() != b"access-control-allow-origin"]
                headers.append((b"Access-Control-Allow-Origin", allow))
                message = dict(message, headers=_with_vary_origin(headers))
            await send(message)

        await self.app(scope, receive, send_with_cors)

    @staticmethod
    async def _preflight(allow: Optional[bytes], send: Callable) -> None:
        headers: Headers = []
        if allow is not None:
            headers += [(b"Access-Control-Allow-Origin", allow), (b"Vary", b"Origin")]
        headers += [(b"Access-Control-Allow-Credentials", b"true"),
                    (b"Access-Control-Allow-Methods", ALLOW_METHODS),
                    (b"Access-Control-Allow-Headers", ALLOW_HEADERS),
                    (b"Content-Type", b"text/html"), (b"Content-Length", b"0")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
