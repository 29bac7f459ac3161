"""llama-server's own pytest suite against `pyllama serve`: every test llama-server passes under
the stand-in models (tools/llama_server_suite/llama_passes.txt) passes on pyllama too, except
those in tools/llama_server_suite/not_yet.json, each listed with its reason
(test_pyllama_passes_what_llama_server_passes: CI runs every file but three, about 8 minutes
on a 2-core EPYC; PYLLAMA_SERVER_SUITE=full runs them all).

The rest checks the tooling (tools/llama_server_suite/, scripts/llama_server_suite.py): the model
mapping, the wrapper's translation of the suite's command lines, the pytest plugin (offline
presets, per-test timeout, selection, the JSON report), the runner's lists and table, and
docs/server.md's list of excluded files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools" / "llama_server_suite"
WRAPPER = TOOLS / "llama-server"
sys.path.insert(0, str(TOOLS))
sys.path.insert(0, str(ROOT / "scripts"))

import llama_server_suite as runner  # noqa: E402
import suite_models  # noqa: E402


def test_model_names_map_to_stand_ins():
    assert suite_models.stand_in_for("ggml-org/models", "tinyllamas/stories260K.gguf") == "smollm2"
    assert suite_models.stand_in_for("ggml-org/test-model-stories260K", None) == "smollm2"
    assert suite_models.stand_in_for("ggml-org/tinygemma3-GGUF:Q8_0", None) == "gemma3"
    assert suite_models.stand_in_for("ggml-org/models", "bert-bge-small/ggml-model-f16.gguf") == "tiny-bert"
    assert suite_models.stand_in_for("ggml-org/models", "jina-reranker-v1-tiny-en/ggml-model-f16.gguf") == \
        "tiny-reranker"
    with pytest.raises(suite_models.UnknownModel, match="bartowski"):
        suite_models.stand_in_for("bartowski/Phi-3.5-mini-instruct-GGUF:Q4_K_M", None)
    with pytest.raises(suite_models.UnknownModel):
        suite_models.stand_in_for("ggml-org/models", "some/other.gguf")


def test_tiny_bert_stand_ins_are_generated(tmp_path, monkeypatch):
    monkeypatch.setenv("PYLLAMA_CACHE", str(tmp_path))
    bert = suite_models.stand_in_path("tiny-bert")
    reranker = suite_models.stand_in_path("tiny-reranker")
    assert bert.parent == tmp_path / "llama_server_suite" and bert.stat().st_size > 0
    assert reranker.stat().st_size > 0
    from pyllama import Model

    with Model(str(reranker), vocab_only=True) as m:
        assert str(m.meta("bert.pooling_type")) == "4"          # rank


def _wrapper(argv, env_extra, tmp_path):
    """Run the wrapper with `argv`, where the server it would exec is a script that prints its own
    command line (so nothing real starts)."""
    fake = tmp_path / "fake-server"
    fake.write_text("#!/bin/sh\necho \"$0 $*\"\n")
    fake.chmod(0o755)
    env = dict(os.environ, PYLLAMA_SUITE_LLAMA_SERVER=str(fake), **env_extra)
    return subprocess.run([sys.executable, str(WRAPPER), *argv], capture_output=True, text=True, env=env,
                          timeout=60)


def test_wrapper_replaces_hub_names_and_keeps_the_rest(tmp_path):
    r = _wrapper(["--port", "8080", "--offline", "--hf-repo", "ggml-org/models", "--hf-file",
                  "tinyllamas/stories260K.gguf", "--temp", "0.8", "--no-slots"],
                 {"PYLLAMA_SUITE_SERVER": "llama"}, tmp_path)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert line.startswith(str(tmp_path / "fake-server"))
    args = line.split()[1:]
    assert args[0] == "--model" and args[1].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert args[2:] == ["--port", "8080", "--temp", "0.8", "--no-slots"]


def test_wrapper_refuses_what_it_cannot_map(tmp_path):
    r = _wrapper(["--hf-repo", "bartowski/Meta-Llama-3.1-8B-Instruct-GGUF"], {"PYLLAMA_SUITE_SERVER": "llama"},
                 tmp_path)
    assert r.returncode == 2 and "no local stand-in for --hf-repo bartowski" in r.stderr
    r = _wrapper(["--port", "1"], {"PYLLAMA_SUITE_SERVER": "lama"}, tmp_path)
    assert r.returncode == 2 and "PYLLAMA_SUITE_SERVER" in r.stderr


def test_wrapper_runs_pyllama_serve_with_the_same_flags(tmp_path):
    r = _wrapper(["--hf-repo", "ggml-org/models", "--hf-file", "tinyllamas/stories260K.gguf", "--help"],
                 {"PYLLAMA_SUITE_SERVER": "pyllama"}, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "usage: pyllama serve" in r.stdout
    assert "-m pyllama serve --model" in r.stderr


def test_plugin_reports_outcomes_and_times_out(tmp_path):
    """A miniature suite with the plugin: presets are not downloaded, download_file maps
    known URLs, a hanging test fails as 'timeout' after PYLLAMA_SUITE_TIMEOUT."""
    (tmp_path / "utils.py").write_text(textwrap.dedent("""
        class ServerPreset:
            @staticmethod
            def load_all():
                raise RuntimeError("would download every model")
        def download_file(url, output_file_path=None):
            raise RuntimeError("would download " + url)
    """))
    (tmp_path / "conftest.py").write_text(textwrap.dedent("""
        import pytest
        from utils import *
        @pytest.fixture(scope="session", autouse=True)
        def load_server_presets():
            ServerPreset.load_all()
    """))
    url = next(iter(suite_models.URL_MODELS))
    (tmp_path / "test_mini.py").write_text(textwrap.dedent(f"""
        import time, pytest
        from utils import *
        def test_pass():
            assert download_file({url!r}).endswith(".gguf")
        def test_fail():
            assert False
        def test_offline():
            download_file("https://example.com/x.png")
        @pytest.mark.skip(reason="no")
        def test_skip():
            pass
        def test_hang():
            time.sleep(30)
    """))
    report = tmp_path / "report.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TOOLS), os.environ.get("PYTHONPATH", "")]),
               PYLLAMA_SUITE_REPORT=str(report), PYLLAMA_SUITE_TIMEOUT="2")
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "suite_plugin", "-p", "no:cacheprovider", "-q",
                        "test_mini.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    got = {k.split("::")[1]: v["outcome"] for k, v in json.loads(report.read_text()).items()}
    assert got == {"test_pass": "passed", "test_fail": "failed", "test_offline": "failed",
                   "test_skip": "skipped", "test_hang": "timeout"}
    assert "offline: no local stand-in for https://example.com/x.png" in r.stdout


def test_runner_files_table_and_docs():
    files = runner.suite_files()
    assert files and all(f.startswith("unit/test_") for f in files)
    for name in runner.EXCLUDED:
        assert (runner.SUITE / name).is_file(), name
        assert name not in files
    docs = (ROOT / "docs" / "server.md").read_text()
    for name in runner.EXCLUDED:
        assert f"`{Path(name).name}`" in docs, f"docs/server.md does not list the excluded {name}"
    results = {
        "llama": {"unit/a.py::t1": {"outcome": "passed"}, "unit/a.py::t2": {"outcome": "passed"},
                  "unit/b.py::t3": {"outcome": "failed"}},
        "pyllama": {"unit/a.py::t1": {"outcome": "passed"}, "unit/a.py::t2": {"outcome": "timeout"},
                    "unit/b.py::t3": {"outcome": "passed"}},
    }
    table = runner.table(results).splitlines()
    assert table[2] == "| unit/a.py | 2 / 2 | 1 / 2 | 1 | 0 |"
    assert table[3] == "| unit/b.py | 0 / 1 | 1 / 1 | 0 | 1 |"
    assert table[4] == "| all | 2 / 3 | 2 / 3 | 1 | 1 |"


def test_recorded_lists_are_consistent():
    passes = runner.read_passes()
    not_yet = runner.read_not_yet()
    assert len(passes) > 200 and len(set(passes)) == len(passes)
    assert not any(p.startswith(tuple(runner.EXCLUDED)) for p in passes)
    for test_id, reason in not_yet.items():
        assert test_id in passes, f"{test_id} is listed as not yet but llama-server does not pass it"
        assert isinstance(reason, str) and len(reason) > 10, test_id
    assert runner.check({t: {"outcome": "passed"} for t in passes}, passes, {}) == ([], [])
    results = {passes[0]: {"outcome": "timeout"}, passes[1]: {"outcome": "passed"}}
    problems, notes = runner.check(results, passes[:3], {passes[1]: "listed, yet it passes",
                                                         "unit/x.py::y": "gone"})
    assert problems == [f"{passes[0]}: timeout (llama-server passes it)",
                        f"{passes[2]}: not run (llama-server passes it)",
                        "unit/x.py::y: in not_yet.json but not among llama-server's passes"]
    assert notes == [f"{passes[1]}: passes now; remove it from not_yet.json"]


#: The suite's files CI runs (about 8 of the full check's 12 minutes on a 2-core EPYC): every
#: endpoint but the three files that re-check what pyllama's own tests cover at length (chat
#: template rendering, embeddings, speculation: 3.4 minutes together).  PYLLAMA_SERVER_SUITE=full
#: runs every file, as `python scripts/llama_server_suite.py --check` does (docs/server.md has its
#: last result).
CI_LEFT_OUT = ("unit/test_template.py", "unit/test_embedding.py", "unit/test_speculative.py")
CI_FILES = [f for f in runner.suite_files() if f not in CI_LEFT_OUT]


def test_ci_subset_names_real_files():
    assert set(CI_LEFT_OUT) <= set(runner.suite_files())
    assert "unit/test_completion.py" in CI_FILES and "unit/test_chat_completion.py" in CI_FILES


def test_check_of_some_files_expects_only_their_tests():
    """--check with files: a test llama-server passes in another file is not reported missing."""
    expected = ["unit/test_a.py::t1", "unit/test_b.py::t2"]
    not_yet = {"unit/test_b.py::t2": "why"}
    exp, ny = runner.restrict_to_files(expected, not_yet, ["unit/test_a.py", "-x"])
    assert exp == ["unit/test_a.py::t1"] and ny == {}
    assert runner.restrict_to_files(expected, not_yet, ["-x"]) == (expected, not_yet)
    assert runner.restrict_to_files(expected, not_yet, ["unit/test_b.py::t2"]) == (["unit/test_b.py::t2"], not_yet)
    problems, _ = runner.check({"unit/test_a.py::t1": {"outcome": "passed"}}, exp, ny)
    assert problems == []
    problems, _ = runner.check({"unit/test_a.py::t1": {"outcome": "passed"}}, expected, {})
    assert problems == ["unit/test_b.py::t2: not run (llama-server passes it)"]


def test_pyllama_passes_what_llama_server_passes(tmp_path):
    """The suite's tests that llama-server passes, run on `pyllama serve` (needs the suite's
    requirements: vendor/llama.cpp/tools/server/tests/requirements.txt, and the test models)."""
    pytest.importorskip("fastapi")
    for module in ("wget", "filelock", "requests", "openai"):
        try:
            __import__(module)
        except ImportError:
            pytest.fail(f"llama-server's test suite needs the {module!r} package (its requirements.txt)")
    if not runner.SUITE.is_dir():
        pytest.fail(f"{runner.SUITE} is missing: python scripts/vendor_llama_cpp.py --with tools")
    for name in ("smollm2", "gemma3"):
        suite_models.stand_in_path(name)
    files = [] if os.environ.get("PYLLAMA_SERVER_SUITE") == "full" else CI_FILES
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "llama_server_suite.py"), "--check",
                        "--workdir", str(tmp_path), *files], capture_output=True, text=True, timeout=1500)
    print(r.stdout[-6000:])
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
