#!/usr/bin/env python3
"""Run llama-server's own pytest suite against llama-server and against `pyllama serve`.

The suite (vendor/llama.cpp/tools/server/tests) is copied into a work folder and run with
``LLAMA_SERVER_BIN_PATH`` pointing at tools/llama_server_suite/llama-server, a wrapper that
maps the suite's Hugging Face models onto local stand-ins and execs either llama.cpp's
llama-server (benchmarks/.cache/native/bin, built from the same vendored tree) or
``python -m pyllama serve``.  Each test gets a timeout; the pass/fail counts of both servers
are printed per file, side by side.

Usage::

    python scripts/llama_server_suite.py                         # both servers, every file but the excluded
    python scripts/llama_server_suite.py --server pyllama unit/test_tokenize.py
    python scripts/llama_server_suite.py --server llama -- -k props   # after --: pytest's own options

What pyllama must pass: ``--record`` (with ``--server llama``, over the whole suite) writes the
tests llama-server passes to tools/llama_server_suite/llama_passes.txt; ``--check`` runs just
those on ``pyllama serve`` and fails when one fails that tools/llama_server_suite/not_yet.json
(test id -> why) does not list (tests/test_llama_server_suite.py runs it).

Arguments that are not the runner's own go to pytest (test files are relative to the suite:
``unit/test_completion.py``, ``unit/test_completion.py::test_completion_stream``).
Results: <workdir>/results-<server>.json (every test's outcome) and <workdir>/<server>.log.
Needs the suite's requirements (vendor/llama.cpp/tools/server/tests/requirements.txt: the
``wget`` package among them), the models of ``scripts/fetch_models.py smollm2 gemma3``, and
for the llama side the native llama-server (benchmarks/setup_native.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "vendor" / "llama.cpp" / "tools" / "server" / "tests"
TOOLS = ROOT / "tools" / "llama_server_suite"
WRAPPER = TOOLS / "llama-server"
DEFAULT_WORKDIR = ROOT / "build" / "llama_server_suite"

#: Files of the suite that are not run, and why (docs/server.md lists them too).
EXCLUDED: Dict[str, str] = {
    "unit/test_router.py": "router mode (one server fronting several models, loaded on demand): "
                           "pyllama serve has one model per process",
    "unit/test_mcp_servers.py": "MCP servers (the web UI's tool servers, proxied by llama-server): not a "
                                "model-serving feature",
    "unit/test_tools_builtin.py": "llama-server's built-in tools (file, shell, web search run by the server)",
    "unit/test_sleep.py": "--sleep-idle-seconds (unloading the model when idle)",
    "unit/test_proxy.py": "the web UI's CORS proxy (/cors-proxy fetches any URL for the browser)",
    "unit/test_compat_gcp.py": "Google Cloud Vertex AI's prediction protocol (AIP_MODE)",
    "unit/test_stream.py": "router mode again (conversation streams resumed through the router, /v1/stream)",
}

OUTCOMES = ("passed", "failed", "error", "timeout", "skipped")
#: The tests llama-server passes under the mapping (--record writes it), and the ones pyllama
#: does not pass yet, each with the reason.
PASSES_FILE = TOOLS / "llama_passes.txt"
NOT_YET_FILE = TOOLS / "not_yet.json"


def suite_files() -> List[str]:
    """Every test file of the suite that is run (all of unit/ but the excluded ones)."""
    files = sorted(f"unit/{p.name}" for p in (SUITE / "unit").glob("test_*.py"))
    return [f for f in files if f not in EXCLUDED]


def _extract_templates(models_dir: Path) -> None:
    """The chat templates some tests load (../../../models/templates/*.jinja): the vendored
    subset leaves them out, the pinned archive has them (scripts/vendor_llama_cpp.py caches it)."""
    templates = models_dir / "templates"
    if templates.is_dir() and any(templates.iterdir()):
        return
    sys.path.insert(0, str(ROOT / "scripts"))
    import vendor_llama_cpp as V

    pin = V.load_pin()
    archive = V.fetch_archive(pin)
    prefix = pin["subtree"].rstrip("/") + "/models/templates/"
    templates.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if member.isfile() and member.name.startswith(prefix):
                name = member.name[len(prefix):]
                if "/" not in name:
                    with tar.extractfile(member) as src, open(templates / name, "wb") as dst:
                        shutil.copyfileobj(src, dst)


def prepare(workdir: Path) -> Path:
    """A fresh copy of the suite at <workdir>/tools/server/tests (the tests write tmp/ files
    next to themselves, and find templates at ../../../models); returns its folder."""
    tests = workdir / "tools" / "server" / "tests"
    if tests.exists():
        shutil.rmtree(tests)
    shutil.copytree(SUITE, tests, ignore=shutil.ignore_patterns("__pycache__", "tmp"))
    _extract_templates(workdir / "models")
    return tests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_suite(server: str, pytest_args: List[str], *, workdir: Path, timeout_s: float, slow: bool = False,
              llama_server: Optional[str] = None, threads: Optional[int] = 1, select: Optional[List[str]] = None,
              echo: bool = True) -> Dict[str, dict]:
    """Run the suite against `server` ("llama" or "pyllama"), only the tests `select` names
    when given; return {test id: {"outcome", "seconds"}}."""
    tests = prepare(workdir)
    report = workdir / f"results-{server}.json"
    log = workdir / f"{server}.log"
    report.unlink(missing_ok=True)
    env = dict(os.environ)
    env.update({"LLAMA_SERVER_BIN_PATH": str(WRAPPER), "PYLLAMA_SUITE_SERVER": server,
                "PYLLAMA_SUITE_REPORT": str(report), "PYLLAMA_SUITE_TIMEOUT": str(timeout_s),
                "PORT": str(_free_port()),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(TOOLS), env.get("PYTHONPATH")]))})
    if llama_server:
        env["PYLLAMA_SUITE_LLAMA_SERVER"] = llama_server
    if threads:
        env["PYLLAMA_SUITE_THREADS"] = str(threads)
    if select is not None:
        selection = workdir / "select.txt"
        selection.write_text("".join(t + "\n" for t in select))
        env["PYLLAMA_SUITE_SELECT"] = str(selection)
        slow = True         # the list decides
    if not any(a.startswith("unit/") or a.startswith("unit\\") for a in pytest_args):
        pytest_args = [*suite_files(), *pytest_args]
    command = [sys.executable, "-m", "pytest", "-p", "suite_plugin", "-p", "no:cacheprovider", "-q",
               "-o", "console_output_style=classic"]
    if not slow:
        command += ["-m", "not slow"]      # as the suite's tests.sh: the slow ones need real 1-8B models
    command += pytest_args
    started = time.monotonic()
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.run(command, cwd=tests, env=env, stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL)
    if echo:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
        print(f"[{server}] pytest exited {proc.returncode} after {time.monotonic() - started:.0f} s: "
              f"{tail[0] if tail else ''}  (log: {log})", flush=True)
    if not report.exists():
        raise SystemExit(f"[{server}] the suite wrote no report: see {log}")
    return json.loads(report.read_text())


def per_file(results: Dict[str, dict]) -> Dict[str, Counter]:
    counts: Dict[str, Counter] = defaultdict(Counter)
    for test_id, entry in results.items():
        counts[test_id.split("::", 1)[0]][entry["outcome"]] += 1
    return counts


def passed(results: Dict[str, dict]) -> set:
    return {t for t, e in results.items() if e["outcome"] == "passed"}


def table(by_server: Dict[str, Dict[str, dict]]) -> str:
    """Pass/total per file and server, side by side (markdown)."""
    servers = list(by_server)
    counts = {s: per_file(r) for s, r in by_server.items()}
    files = sorted({f for c in counts.values() for f in c})
    head = "| file | " + " | ".join(f"{s} passed / run" for s in servers)
    if len(servers) == 2:
        head += f" | {servers[0]} only | {servers[1]} only"
    lines = [head + " |", "|" + " --- |" * (head.count("|"))]
    totals = {s: Counter() for s in servers}
    only = [0, 0]
    for f in files + ["all"]:
        cells = []
        for s in servers:
            c = totals[s] if f == "all" else counts[s].get(f, Counter())
            if f != "all":
                totals[s].update(c)
            cells.append(f"{c['passed']} / {sum(c.values())}")
        row = f"| {f} | " + " | ".join(cells)
        if len(servers) == 2:
            a, b = (passed({t: e for t, e in by_server[s].items() if f == "all" or t.startswith(f + "::")})
                    for s in servers)
            row += f" | {len(a - b)} | {len(b - a)}"
        lines.append(row + " |")
    return "\n".join(lines)


def read_passes() -> List[str]:
    return [line.strip() for line in PASSES_FILE.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def read_not_yet() -> Dict[str, str]:
    return json.loads(NOT_YET_FILE.read_text())


def record(results: Dict[str, dict]) -> None:
    """Write the tests llama-server passed to PASSES_FILE."""
    commit = (ROOT / "vendor" / "llama.cpp" / "COMMIT")
    head = (f"# The tests of llama-server's own suite that llama-server passes under the stand-in models\n"
            f"# (scripts/llama_server_suite.py --server llama --record; llama.cpp "
            f"{commit.read_text().strip() if commit.exists() else '?'}).\n")
    PASSES_FILE.write_text(head + "".join(t + "\n" for t in sorted(passed(results))))
    print(f"recorded {len(passed(results))} tests in {PASSES_FILE.relative_to(ROOT)}")


def restrict_to_files(expected: List[str], not_yet: Dict[str, str], pytest_args: List[str]) -> tuple:
    """--check with test files (unit/...): only the recorded tests of those files are expected."""
    files = {a.split("::")[0].replace("\\", "/") for a in pytest_args if a.startswith(("unit/", "unit\\"))}
    if not files:
        return expected, not_yet
    return ([t for t in expected if t.split("::")[0] in files],
            {t: why for t, why in not_yet.items() if t.split("::")[0] in files})


def check(results: Dict[str, dict], expected: List[str], not_yet: Dict[str, str]) -> tuple:
    """(problems, notes) of a pyllama run of the recorded tests.  Problems: a test that did not
    pass and is not listed in not_yet, a listed one that is not recorded any more.  Notes: a
    listed one that passes now (take it off the list once it passes for good)."""
    problems, notes = [], []
    for t in expected:
        outcome = results.get(t, {}).get("outcome", "not run")
        if outcome != "passed" and t not in not_yet:
            problems.append(f"{t}: {outcome} (llama-server passes it)")
        if outcome == "passed" and t in not_yet:
            notes.append(f"{t}: passes now; remove it from {NOT_YET_FILE.name}")
    for t in sorted(set(not_yet) - set(expected)):
        problems.append(f"{t}: in {NOT_YET_FILE.name} but not among llama-server's passes")
    return problems, notes


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Other arguments (test files, -k EXPR, -x ...) go to pytest.")
    parser.add_argument("--server", choices=("llama", "pyllama", "both"), default="both",
                        help="which server to run the suite against (default both, one after the other)")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="S",
                        help="seconds per test (setup and call; default 120)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, metavar="DIR",
                        help=f"where the suite is copied and run (default {DEFAULT_WORKDIR.relative_to(ROOT)})")
    parser.add_argument("--llama-server", metavar="BIN", help="llama-server binary (default: the benchmark's build)")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="--threads of every server (default 1: on a shared 2-core machine a server that "
                             "spins on every core is many times slower; 0 = the server's default)")
    parser.add_argument("--slow", action="store_true", help="also the tests marked slow (real 1-8B models: "
                                                            "they have no stand-in and fail)")
    parser.add_argument("--excluded", action="store_true", help="list the excluded files with reasons, and exit")
    parser.add_argument("--record", action="store_true",
                        help=f"after the llama run, write the tests it passed to {PASSES_FILE.relative_to(ROOT)}")
    parser.add_argument("--check", action="store_true",
                        help="run the recorded tests on pyllama serve; exit 1 when one fails that "
                             f"{NOT_YET_FILE.relative_to(ROOT)} does not list")
    args, pytest_args = parser.parse_known_args(argv)
    if pytest_args[:1] == ["--"]:
        pytest_args = pytest_args[1:]
    if args.excluded:
        for name, why in EXCLUDED.items():
            print(f"{name}: {why}")
        return 0
    args.workdir = args.workdir.resolve()     # the suite runs in its own folder: a relative path would move
    args.workdir.mkdir(parents=True, exist_ok=True)
    if not SUITE.is_dir():
        raise SystemExit(f"{SUITE} is missing: python scripts/vendor_llama_cpp.py --with tools")
    native = Path(args.llama_server or ROOT / "benchmarks" / ".cache" / "native" / "bin" / "llama-server")
    if args.server in ("llama", "both") and not args.check and not native.is_file():
        raise SystemExit(f"no llama-server at {native}: bash benchmarks/setup_native.sh, or --llama-server BIN")
    if args.check:
        expected, not_yet = read_passes(), read_not_yet()
        expected, not_yet = restrict_to_files(expected, not_yet, pytest_args)
        results = run_suite("pyllama", pytest_args, workdir=args.workdir / "pyllama", timeout_s=args.timeout,
                            threads=args.threads, select=expected)
        print(table({"pyllama": results}))
        problems, notes = check(results, expected, not_yet)
        n_pass = len(passed(results) & set(expected))
        print(f"\npyllama passes {n_pass} of the {len(expected)} tests llama-server passes; "
              f"{len(not_yet)} listed as not yet")
        for p in problems:
            print("  FAIL " + p)
        for p in notes:
            print("  note " + p)
        return 1 if problems else 0
    servers = ["llama", "pyllama"] if args.server == "both" else [args.server]
    results = {}
    for server in servers:
        results[server] = run_suite(server, pytest_args, workdir=args.workdir / server, timeout_s=args.timeout,
                                    slow=args.slow, llama_server=args.llama_server, threads=args.threads)
    print(table(results))
    if args.record:
        if "llama" not in results:
            raise SystemExit("--record needs the llama run (--server llama or both)")
        record(results["llama"])
    if len(servers) == 2:
        missing = sorted(passed(results["llama"]) - passed(results["pyllama"]))
        if missing:
            print(f"\n{len(missing)} tests pass on llama-server but not on pyllama serve:")
            for t in missing:
                print(f"  {t}: {results['pyllama'][t]['outcome']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
