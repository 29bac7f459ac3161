"""A pytest plugin for running llama-server's own suite offline (``pytest -p suite_plugin``).

* ``ServerPreset.load_all`` (the suite's session-start download of every preset's model) does
  nothing: the stand-ins are local (suite_models.py).
* ``utils.download_file`` of a model the suite fetches itself (the speculative tests' draft
  model) gives the stand-in's path; any other URL fails the test at once, with the URL,
  instead of waiting for a network that is not there.
* Each test gets ``PYLLAMA_SUITE_TIMEOUT`` seconds (default 120) for its setup and call; past
  that it fails with a timeout (its servers are still stopped by the suite's teardown).
* ``PYLLAMA_SUITE_REPORT=FILE`` writes every test's outcome (passed, failed, skipped, error,
  timeout) and duration there as JSON when the session ends.
* ``PYLLAMA_SUITE_SELECT=FILE`` (test ids, one a line) runs only those tests.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite_models import URL_MODELS, stand_in_path  # noqa: E402

_results: dict = {}
_started: dict = {}


class SuiteTimeout(Exception):
    """A test of the suite ran past PYLLAMA_SUITE_TIMEOUT."""


def _timeout_s() -> float:
    return float(os.environ.get("PYLLAMA_SUITE_TIMEOUT", "120"))


def pytest_sessionstart(session: Any) -> None:
    import utils  # the suite's utils.py (its directory is on sys.path: the rootdir's conftest)

    utils.ServerPreset.load_all = staticmethod(lambda: None)

    def download_file(url: str, output_file_path: Optional[str] = None) -> str:
        name = URL_MODELS.get(url)
        if name is None:
            raise RuntimeError(f"offline: no local stand-in for {url}")
        return str(stand_in_path(name))

    utils.download_file = download_file


def pytest_collection_modifyitems(session: Any, config: Any, items: list) -> None:
    path = os.environ.get("PYLLAMA_SUITE_SELECT")
    if not path:
        return
    wanted = {line.strip() for line in Path(path).read_text().splitlines() if line.strip()}
    keep = [item for item in items if item.nodeid in wanted]
    config.hook.pytest_deselected(items=[item for item in items if item.nodeid not in wanted])
    items[:] = keep


def _on_alarm(signum: int, frame: Any) -> None:
    raise SuiteTimeout(f"the test ran past {_timeout_s():g} s (PYLLAMA_SUITE_TIMEOUT)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: Any, nextitem: Any) -> Any:
    _started[item.nodeid] = time.monotonic()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, _timeout_s())
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: Any) -> None:
    # the teardown stops the test's servers: never interrupt it
    signal.setitimer(signal.ITIMER_REAL, 0)


def pytest_runtest_logreport(report: Any) -> None:
    entry = _results.setdefault(report.nodeid, {"outcome": "passed"})
    if entry["outcome"] == "passed" and report.outcome != "passed":     # the first problem counts
        if report.skipped:
            entry["outcome"] = "skipped"
        elif "SuiteTimeout" in str(report.longrepr):
            entry["outcome"] = "timeout"
        else:
            entry["outcome"] = "failed" if report.when == "call" else "error"
    if report.when == "teardown":
        entry["seconds"] = round(time.monotonic() - _started.get(report.nodeid, time.monotonic()), 2)


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    path = os.environ.get("PYLLAMA_SUITE_REPORT")
    if path:
        Path(path).write_text(json.dumps(_results, indent=1, sort_keys=True) + "\n")
