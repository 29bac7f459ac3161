"""`pyllama serve` as a child process on a free loopback port, for tests and check scripts:
it knows its URL once the server says it listens, waits for /health with a bound, and is
stopped (process group killed if it hangs) by whoever started it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx


class ServerProcess:
    """`python -m pyllama serve ARGS --port 0`; knows its URL once it listens."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        child_env = dict(os.environ)
        child_env["PYTHONFAULTHANDLER"] = "1"
        child_env.update(env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "pyllama", "serve", "--port", "0", *args],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, encoding="utf-8", errors="replace", env=child_env,
                                     start_new_session=True)
        self.lines: list = []
        self._url: str | None = None
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(r"listening on (http://\S+)", line)
            if m and self._url is None:
                self._url = m.group(1)
                self._listening.set()
        self._listening.set()

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 180.0) -> str:
        deadline = time.monotonic() + timeout
        self._listening.wait(timeout)
        assert self._url, f"the server did not start listening:\n{self.stderr[-3000:]}"
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the server exited {self.proc.returncode}:\n{self.stderr[-3000:]}"
            try:
                if httpx.get(self._url + "/health", timeout=5).status_code == 200:
                    return self._url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"/health not 200 after {timeout}s:\n{self.stderr[-3000:]}")

    @property
    def url(self) -> str:
        assert self._url
        return self._url

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send `sig`; return the exit status (killing the process group if it hangs)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
                raise AssertionError(f"the server did not stop within {timeout}s of {sig!r}:\n{self.stderr[-3000:]}")
        self._reader.join(5)
        return self.proc.returncode
