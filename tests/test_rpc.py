"""llama.cpp's RPC backend: `pyllama rpc-server` and LLM(rpc_servers=...).

The servers run as real subprocesses of our own command on 127.0.0.1; each client
scenario runs in its own interpreter, because ggml keeps RPC registrations for the
life of a process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import pyllama

pytestmark = pytest.mark.skipif(not pyllama._core.supports_rpc(), reason="built with GGML_RPC=OFF")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"rpc-server exited early: {proc.stderr.read().decode(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"rpc-server did not listen on {port} within {timeout} s")


@pytest.fixture
def rpc_servers():
    """Start N `pyllama rpc-server` processes; they are stopped with Ctrl-C at the end."""
    procs = []

    def start(n: int) -> list:
        endpoints = []
        for _ in range(n):
            port = _free_port()
            proc = subprocess.Popen([sys.executable, "-m", "pyllama", "rpc-server", "--port", str(port), "-t", "1"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            procs.append(proc)
            _wait_for_port(port, proc)
            endpoints.append(f"127.0.0.1:{port}")
        return endpoints

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGINT)
    for proc in procs:
        try:
            rc = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("rpc-server did not stop on Ctrl-C")
        assert rc == 0, proc.stderr.read().decode(errors="replace")


CLIENT = r"""
import json, sys, pyllama
from pyllama import LLM
servers = json.loads(sys.argv[1])
kw = dict(rpc_servers=servers, n_gpu_layers=-1) if servers else {}
if len(servers) > 1:
    kw["tensor_split"] = [1.0] * len(servers)
llm = LLM(sys.argv[2], n_ctx=512, n_threads=1, temperature=0, **kw)
text = llm("The capital of France is", max_tokens=16)
rpc_devices = [d["name"] for b in pyllama.backends() if b["name"].startswith("RPC") for d in b["devices"]]
print(json.dumps({"text": text, "rpc_devices": rpc_devices}))
llm.close()
"""


def _client(model_path, servers) -> dict:
    out = subprocess.run([sys.executable, "-c", CLIENT, json.dumps(servers), str(model_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.model
def test_split_across_one_and_two_servers_matches_local(smollm2_path, rpc_servers):
    local = _client(smollm2_path, [])
    assert local["text"] and local["rpc_devices"] == []
    one = rpc_servers(1)
    via_one = _client(smollm2_path, one)
    assert len(via_one["rpc_devices"]) == 1
    assert via_one["text"] == local["text"]
    two = rpc_servers(2)
    via_two = _client(smollm2_path, two)
    assert len(via_two["rpc_devices"]) == 2
    assert via_two["text"] == local["text"]


REGISTER_TWICE = r"""
import json, sys, threading, pyllama
from pyllama import _core
ep = sys.argv[1]
results = []
threads = [threading.Thread(target=lambda: results.append(_core.rpc_add_server(ep))) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
rpc_devices = [d["name"] for b in pyllama.backends() if b["name"].startswith("RPC") for d in b["devices"]]
print(json.dumps({"first": results, "rpc_devices": rpc_devices}), flush=True)
sys.stdin.readline()   # the server is gone now: a second registration must not contact it
print(json.dumps({"again": _core.rpc_add_server(ep)}), flush=True)
"""


def test_rpc_add_server_registers_each_endpoint_once():
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "pyllama", "rpc-server", "--port", str(port), "-t", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    client = None
    try:
        _wait_for_port(port, server)
        client = subprocess.Popen([sys.executable, "-c", REGISTER_TWICE, f"127.0.0.1:{port}"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = json.loads(client.stdout.readline() or "null")
        assert first is not None, client.stderr.read()[-3000:]
        server.kill()
        server.wait(timeout=15)
        client.stdin.write("\n")
        client.stdin.flush()
        again = json.loads(client.stdout.readline() or "null")
        assert again is not None, client.stderr.read()[-3000:]
    finally:
        for proc in (client, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=15)
    names = first["first"][0]
    assert len(names) == 1 and all(r == names for r in first["first"])
    assert first["rpc_devices"] == names          # registered once, although four threads asked
    assert again["again"] == names                 # cached: no handshake with the dead server


def test_unreachable_server_fails_fast(tmp_path):
    port = _free_port()   # nothing listens there
    t0 = time.time()
    code = f"import pyllama\npyllama._core.rpc_add_server('127.0.0.1:{port}')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert time.time() - t0 < 10
    assert out.returncode == 1
    assert "ConnectionError" in out.stderr and str(port) in out.stderr


def test_unreachable_server_in_llm_is_a_clear_error(tiny_model_path):
    port = _free_port()
    code = (f"from pyllama import LLM\n"
            f"LLM({str(tiny_model_path)!r}, rpc_servers=['127.0.0.1:{port}'], n_gpu_layers=-1)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "cannot reach RPC server" in out.stderr


def test_bad_endpoint_is_a_value_error():
    with pytest.raises(ValueError, match="host:port"):
        pyllama._core.rpc_add_server("no-port-here")
    with pytest.raises(ValueError, match="port"):
        pyllama._core.rpc_add_server("127.0.0.1:99999")


def test_non_loopback_needs_allow_remote():
    out = subprocess.run([sys.executable, "-m", "pyllama", "rpc-server", "--host", "0.0.0.0", "--port", "50999"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "--allow-remote" in out.stderr and "authentication" in out.stderr
    assert "Traceback" not in out.stderr
