"""CORS as llama-server does it (src/pyllama/server/cors.py) and `--host` with several
addresses (src/pyllama/server/main.py).

In-process (httpx.ASGITransport, the fake LLM) for the rules: which origins are reflected,
preflights answered 200 with llama-server's headers (also for a disallowed origin, and
before the API key check), the header on actual and error responses, no CORS at all by
default.  One `pyllama serve` process on the tiny model, listening on 127.0.0.1 and ::1,
for what only the wire shows: the header names' casing and both addresses answering.
"""

from __future__ import annotations

import asyncio
import http.client
import socket

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from pyllama.server.app import create_app  # noqa: E402
from pyllama.server.cors import allowed_origin  # noqa: E402
from server_process import ServerProcess  # noqa: E402
from test_server_app import FakeLLM  # noqa: E402

PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "Authorization"}
#: llama-server's preflight headers (tools/server/server-http.cpp, its defaults), by exact name.
LLAMA_PREFLIGHT = {"Access-Control-Allow-Credentials": "true",
                   "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
                   "Access-Control-Allow-Headers": "*"}


def call(app, method, path, **kw):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await c.request(method, path, **kw)
    return asyncio.run(asyncio.wait_for(go(), 60))


def raw_headers(r) -> dict:
    """The response's headers by their exact names (httpx's own lookup ignores case)."""
    return {k.decode(): v.decode() for k, v in r.headers.raw}


def preflight(app, origin, path="/v1/chat/completions"):
    return call(app, "OPTIONS", path, headers={"Origin": origin, **PREFLIGHT})


# --------------------------------------------------------------------------- the rules, in-process


@pytest.mark.parametrize("origin,origins,want", [
    ("https://web.example", ["*"], "https://web.example"),     # "*": reflected (llama-server: credentials on)
    ("localhost", ["*"], "localhost"),                         # whatever the client sends
    ("http://localhost", ["localhost"], "http://localhost"),
    ("http://localhost:8080", ["localhost"], "http://localhost:8080"),
    ("https://127.0.0.1:3000", ["localhost"], "https://127.0.0.1:3000"),
    ("http://[::1]:3000", ["localhost"], "http://[::1]:3000"),
    ("http://localhost.evil.com", ["localhost"], None),
    ("http://127.0.0.1.evil.com", ["localhost"], None),
    ("http://notlocalhost", ["localhost"], None),
    ("ftp://localhost", ["localhost"], None),
    ("http://localhost:8080/x", ["localhost"], None),
    ("https://b.example", ["https://a.example", "https://b.example"], "https://b.example"),
    ("https://c.example", ["https://a.example", "https://b.example"], None),
    ("http://localhost", ["https://a.example"], None),         # the keyword only when given
    ("", ["*"], None),
])
def test_allowed_origin(origin, origins, want):
    got = allowed_origin(origin.encode(), origins)
    assert got == (want.encode() if want is not None else None)


def test_preflight_is_llama_servers():
    """200, an empty text/html body, the allow-origin header (reflected) and llama-server's
    three preflight headers, all in llama-server's casing; before the API key check."""
    app = create_app(FakeLLM(), cors_origins=["*"], api_keys=["secret"])
    r = preflight(app, "https://web.example")
    assert r.status_code == 200 and r.content == b""
    headers = raw_headers(r)
    assert headers["Access-Control-Allow-Origin"] == "https://web.example"
    for name, value in LLAMA_PREFLIGHT.items():
        assert headers[name] == value
    assert headers["Content-Type"].startswith("text/html") and headers["Vary"] == "Origin"
    # any path, as llama-server answers every OPTIONS itself
    assert preflight(app, "https://web.example", "/no/such/route").status_code == 200


def test_preflight_from_a_disallowed_origin_is_200_without_the_header():
    """Starlette's middleware answered 400; llama-server answers 200 and leaves the refusal
    to the browser (no Access-Control-Allow-Origin)."""
    app = create_app(FakeLLM(), cors_origins=["localhost"])
    for origin in ("http://evil.com", "http://localhost.evil.com", "http://web.mydomain.fr"):
        r = preflight(app, origin)
        assert r.status_code == 200, r.text
        headers = raw_headers(r)
        assert "access-control-allow-origin" not in {k.lower() for k in headers}
        for name, value in LLAMA_PREFLIGHT.items():
            assert headers[name] == value
    r = preflight(app, "http://127.0.0.1:5173")
    assert r.status_code == 200 and raw_headers(r)["Access-Control-Allow-Origin"] == "http://127.0.0.1:5173"


def test_actual_responses_carry_the_allow_origin_only():
    app = create_app(FakeLLM(), cors_origins=["https://ui.example"], api_keys=["secret"])
    ok = call(app, "GET", "/health", headers={"Origin": "https://ui.example"})
    assert ok.status_code == 200
    headers = raw_headers(ok)
    assert headers["Access-Control-Allow-Origin"] == "https://ui.example" and "Origin" in headers["Vary"]
    # as llama-server: no allow-credentials on the actual response (a credentialed read stays blocked)
    assert "access-control-allow-credentials" not in {k.lower() for k in headers}
    # an error answer carries it too (the page can read the 401's message)
    denied = call(app, "GET", "/v1/models", headers={"Origin": "https://ui.example"})
    assert denied.status_code == 401
    assert raw_headers(denied)["Access-Control-Allow-Origin"] == "https://ui.example"
    # another origin, or no Origin at all: nothing added
    for headers in ({"Origin": "https://evil.example"}, {}):
        r = call(app, "GET", "/health", headers=headers)
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_no_cors_unless_asked():
    """pyllama's default (llama-server's is "*"): no CORS headers, and OPTIONS is not answered."""
    app = create_app(FakeLLM())
    r = preflight(app, "https://web.example")
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
    r = call(app, "GET", "/health", headers={"Origin": "https://web.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


# --------------------------------------------------------------------------- --host a,b


def test_parse_hosts():
    from pyllama.server.main import parse_hosts

    assert parse_hosts("127.0.0.1") == ["127.0.0.1"]
    assert parse_hosts(" 127.0.0.1 , ::1 ,") == ["127.0.0.1", "::1"]
    assert parse_hosts("[::1],0.0.0.0") == ["::1", "0.0.0.0"]
    assert parse_hosts(["127.0.0.1", "::1"]) == ["127.0.0.1", "::1"]
    for bad, words in ((" , ", "at least one"), ("a.sock", "UNIX"), ("127.0.0.1,127.0.0.1", "twice")):
        with pytest.raises(ValueError, match=words):
            parse_hosts(bad)


@pytest.mark.parametrize("argv,words", [
    (["--host", "127.0.0.1,::1", "--port", "0"], "--port 0"),
    (["--host", ","], "at least one"),
    (["--host", "/tmp/x.sock"], "UNIX"),
])
def test_serve_refuses_bad_hosts(argv, words, capsys):
    """Usage errors (status 2) before any model is looked for."""
    from pyllama.cli import main

    assert main(["serve", "-m", "/nonexistent/model.gguf", *argv]) == 2
    assert words in capsys.readouterr().err


def test_bind_sockets_fails_clearly_and_closes_what_it_bound():
    from pyllama.server.main import bind_sockets

    with pytest.raises(ValueError, match="--port 0"):
        bind_sockets(["127.0.0.1", "127.0.0.2"], 0)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match=f"127.0.0.1:{port}.*in use"):
            bind_sockets(["127.0.0.2", "127.0.0.1"], port)
        # the socket bound before the failure (127.0.0.2) was closed: it binds again
        socks = bind_sockets(["127.0.0.2"], port)
        assert [s.getsockname() for s in socks] == [("127.0.0.2", port)]
        for s in socks:
            s.close()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def _free_port() -> int:
    """A port free on 127.0.0.1 and ::1 (bound on both, then released)."""
    for _ in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s4:
            s4.bind(("127.0.0.1", 0))
            port = s4.getsockname()[1]
            try:
                with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s6:
                    s6.bind(("::1", port))
            except OSError:
                continue
        return port
    raise AssertionError("no port free on both loopback addresses")


def _request(host, port, method, path, headers):
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request(method, path, headers=headers)
        r = conn.getresponse()
        r.read()
        return r.status, dict(r.getheaders())       # exact names, as sent on the wire
    finally:
        conn.close()


def test_serve_on_two_addresses_with_llama_server_header_casing(tiny_model_path):
    """`pyllama serve --host 127.0.0.1,::1` answers on both; the CORS header names come over
    the wire in llama-server's casing with --http h11 (uvicorn's httptools, the default where
    installed, lowercases them: checked too when it is installed)."""
    if not _ipv6_loopback():
        pytest.skip("IPv6 loopback is unavailable")
    port = _free_port()
    server = ServerProcess("-m", str(tiny_model_path), "-c", "256", "-np", "1", "-t", "1",
                           "--host", "127.0.0.1,::1", "--port", str(port), "--cors-origins", "localhost",
                           "--http", "h11")
    try:
        server.wait_ready()
        assert f"http://127.0.0.1:{port} and http://[::1]:{port}" in server.stderr
        for host in ("127.0.0.1", "::1"):
            status, headers = _request(host, port, "GET", "/health", {})
            assert status == 200
            status, headers = _request(host, port, "OPTIONS", "/v1/chat/completions",
                                       {"Origin": "http://localhost:8080", **PREFLIGHT})
            assert status == 200
            assert headers["Access-Control-Allow-Origin"] == "http://localhost:8080"
            for name, value in LLAMA_PREFLIGHT.items():
                assert headers[name] == value
            status, headers = _request(host, port, "OPTIONS", "/v1/chat/completions",
                                       {"Origin": "http://evil.com", **PREFLIGHT})
            assert status == 200 and "access-control-allow-origin" not in {k.lower() for k in headers}
            status, headers = _request(host, port, "GET", "/v1/models", {"Origin": "http://[::1]:3000"})
            assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://[::1]:3000"
    finally:
        assert server.stop() == 0


def test_http_implementation_flag(tiny_model_path):
    """--http picks uvicorn's implementation: the default (httptools where installed, else h11)
    sends the same CORS headers, lowercased on the wire by httptools."""
    import importlib.util

    name = "access-control-allow-origin" if importlib.util.find_spec("httptools") else "Access-Control-Allow-Origin"
    port = _free_port()
    server = ServerProcess("-m", str(tiny_model_path), "-c", "256", "-np", "1", "-t", "1",
                           "--port", str(port), "--cors-origins", "*")
    try:
        server.wait_ready()
        status, headers = _request("127.0.0.1", port, "GET", "/v1/models", {"Origin": "https://a.example"})
        assert status == 200 and headers[name] == "https://a.example"
    finally:
        assert server.stop() == 0
