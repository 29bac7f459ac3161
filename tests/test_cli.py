"""The ``pyllama`` command, run as a user runs it: ``python -m pyllama ...`` in a subprocess.

Model tests use SmolLM2-135M-Instruct (the default model) from the cache the
fixtures fill; one thread and a few tokens keep them quick on a busy machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyllama import models
from pyllama.cli import main

TIMEOUT = 240
FAST = ["-t", "1"]  # one thread: the machine is shared; OpenMP threads fighting for cores is far slower


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONIOENCODING"] = "utf-8"
    env.pop("PYTHONFAULTHANDLER", None)
    env.update(extra)
    return env


def cli(*args: str, input: str | None = None, env: dict | None = None,
            timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """Run `python -m pyllama ARGS` and return the CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-m", "pyllama", *map(str, args)],
        input=input if input is not None else "",
        capture_output=True, text=True, encoding="utf-8", errors="replace",
        env=env or _env(), timeout=timeout,
    )


def _no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    _no_traceback(result)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("pyllama: error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


# --------------------------------------------------------------------------- no model needed


def test_help_and_version(capsys: pytest.CaptureFixture) -> None:
    import pyllama as pl

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert pl.__version__ in out and pl.__llama_cpp_commit__ in out
    for cmd in ("run", "chat", "info"):
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
        assert "usage: pyllama " + cmd in capsys.readouterr().out


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture) -> None:
    assert main([]) == 2
    assert "run" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["run", "--temp", "nan", "hi"], "--temp"),
    (["run", "--temp", "inf", "hi"], "--temp"),
    (["run", "--top-k", "-3", "hi"], "--top-k"),
    (["run", "-n", "many", "hi"], "--max-tokens"),
    (["run", "--bogus-flag", "hi"], "--bogus-flag"),
    (["frobnicate"], "frobnicate"),
    (["run"], "PROMPT"),
    (["run", "hi", "--grammar", "x", "--json-schema", "{}"], "not allowed"),
    (["run", "hi", "--mirostat", "3"], "--mirostat"),
])
def test_usage_errors_in_process(capsys: pytest.CaptureFixture, argv: list, needle: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyllama: error: ") and needle in lines[0], err


@pytest.mark.parametrize("argv, needle", [
    (["run", "hi", "--xtc-probability", "2"], "xtc_probability"),
    (["run", "hi", "--dry-base", "0.5"], "dry_base"),
    (["run", "hi", "--dry-sequence-breaker", ""], "dry_sequence_breakers"),
    (["run", "hi", "--dynatemp-range", "-1"], "dynatemp_range"),
])
def test_bad_sampler_values_are_usage_errors(capsys: pytest.CaptureFixture, argv: list, needle: str) -> None:
    """Checked before any model is loaded: exit status 2 and one error line."""
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyllama: error: ") and needle in lines[0], lines


def test_sampler_flags_use_llama_cpp_names() -> None:
    """llama-cli's sampler flags map onto SamplingParams (only the ones given)."""
    from pyllama.cli import build_parser, sampling_overrides

    args = build_parser().parse_args([
        "run", "hi", "--top-n-sigma", "1.5", "--xtc-probability", "0.5", "--xtc-threshold", "0.2",
        "--dynatemp-range", "0.3", "--dynatemp-exp", "1.5", "--dry-multiplier", "0.8", "--dry-base", "2",
        "--dry-allowed-length", "3", "--dry-penalty-last-n", "-1", "--dry-sequence-breaker", "##",
        "--dry-sequence-breaker", "\\n", "--typical", "0.9", "--presence-penalty", "0.5", "--frequency-penalty", "0.25",
        "--mirostat", "2", "--mirostat-lr", "0.2", "--mirostat-ent", "3"])
    got = sampling_overrides(args)
    assert got == dict(max_tokens=-1, top_n_sigma=1.5, xtc_probability=0.5, xtc_threshold=0.2, dynatemp_range=0.3,
                       dynatemp_exponent=1.5, dry_multiplier=0.8, dry_base=2.0, dry_allowed_length=3,
                       dry_penalty_last_n=-1, dry_sequence_breakers=["##", "\n"], typical_p=0.9,
                       presence_penalty=0.5, frequency_penalty=0.25, mirostat_mode=2, mirostat_eta=0.2,
                       mirostat_tau=3.0)


def test_unknown_flag_subprocess() -> None:
    r = cli("run", "--no-such-flag", "hi")
    assert r.returncode == 2
    assert "--no-such-flag" in _one_error_line(r)
    assert r.stdout == ""


def test_temp_nan_subprocess() -> None:
    r = cli("run", "--temp", "nan", "hi")
    assert r.returncode == 2
    assert "nan" in _one_error_line(r)


def test_missing_model_file(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model.gguf"
    r = cli("run", "-m", missing, "hi")
    assert r.returncode == 2, r.stderr
    assert str(missing) in _one_error_line(r)
    assert r.stdout == ""
    r = cli("info", missing)
    assert r.returncode == 2
    assert str(missing) in _one_error_line(r)


def test_unknown_model_name() -> None:
    r = cli("run", "-m", "no-such-model-name", "hi")
    assert r.returncode == 2
    line = _one_error_line(r)
    assert "no-such-model-name" in line and models.DEFAULT_MODEL in line


def test_not_a_gguf_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    r = cli("run", "-m", bad, "hi")
    assert r.returncode == 2
    assert "bad.gguf" in _one_error_line(r)


def test_pull_lists_fetches_and_refuses(tmp_path: Path) -> None:
    """`pyllama pull`: --list shows the known models and what is cached; a name prints the
    cached path on stdout; unknown names fail before any download; offline is a clear error."""
    empty = _env(PYLLAMA_CACHE=str(tmp_path / "cache"), PYLLAMA_OFFLINE="1")
    r = cli("pull", "--list", env=empty)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == len(models.KNOWN_MODELS)
    assert all("not cached" in ln for ln in lines) and lines[0].startswith(models.DEFAULT_MODEL)
    r = cli("pull", "smollm2", "no-such-model", env=empty)
    assert r.returncode == 2 and "no-such-model" in _one_error_line(r) and r.stdout == ""
    r = cli("pull", "gemma3", env=empty)
    assert r.returncode == 1 and "PYLLAMA_OFFLINE" in _one_error_line(r)


@pytest.mark.model
def test_pull_prints_the_cached_path(smollm2_path: Path) -> None:
    env = _env(PYLLAMA_CACHE=str(models.cache_dir()), PYLLAMA_OFFLINE="1")   # cached: no network needed
    r = cli("pull", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(smollm2_path)
    r = cli("pull", "--list", env=env)
    assert "not cached" not in r.stdout.splitlines()[0]


def test_build_info() -> None:
    import pyllama as pl

    r = cli("info")
    assert r.returncode == 0, r.stderr
    assert pl.__llama_cpp_commit__ in r.stdout
    assert pl.__version__ in r.stdout
    assert "CPU" in r.stdout
    assert "backends:" in r.stdout and "legacy mapped:" in r.stdout
    from pyllama.gpu import gpu_status

    assert f"gpu:            {gpu_status().summary}\n" in r.stdout    # e.g. "no GPU backend compiled in"
    r = cli("info", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["build"]["llama_cpp_commit"] == pl.__llama_cpp_commit__
    assert any(b["name"] == "CPU" for b in data["build"]["backends"])
    assert "options" in data["build"]["build"]
    assert data["build"]["gpu"] == gpu_status().summary


# --------------------------------------------------------------------------- with a real model


@pytest.mark.model
def test_run_greedy_is_deterministic(smollm2_path: Path) -> None:
    args = ["run", "-m", smollm2_path, "What is the capital of France?", "-n", "8", "--temp", "0", *FAST]
    a = cli(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout.strip()
    _no_traceback(a)
    b = cli(*args)
    assert b.returncode == 0, b.stderr
    assert a.stdout == b.stdout


@pytest.mark.model
def test_run_matches_the_library(smollm2_path: Path) -> None:
    from pyllama import LLM

    prompt = "Name a fruit."
    r = cli("run", "-m", smollm2_path, prompt, "-n", "8", "--temp", "0", *FAST)
    assert r.returncode == 0, r.stderr
    r_raw = cli("run", "--raw", "-m", smollm2_path, "The capital of France is", "-n", "8", "--temp", "0", *FAST)
    assert r_raw.returncode == 0, r_raw.stderr
    with LLM(smollm2_path, n_threads=1) as llm:
        chat = llm.chat([{"role": "user", "content": prompt}], max_tokens=8, temperature=0).text
        raw = llm.complete("The capital of France is", max_tokens=8, temperature=0).text
    assert r.stdout == chat + ("" if chat.endswith("\n") else "\n")
    assert r_raw.stdout == raw + ("" if raw.endswith("\n") else "\n")


@pytest.mark.model
def test_run_default_model_end_to_end(smollm2_path: Path) -> None:
    # No -m: the default model comes from the cache the fixture filled (no download).
    assert models.DEFAULT_MODEL == models.canonical_name("smollm2")
    env = _env(PYLLAMA_CACHE=str(models.cache_dir()))
    r = cli("run", "Say hello.", "-n", "8", "--temp", "0", *FAST, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    _no_traceback(r)


@pytest.mark.model
def test_run_prompt_from_stdin_and_known_name(smollm2_path: Path) -> None:
    env = _env(PYLLAMA_CACHE=str(models.cache_dir()))
    a = cli("run", "-m", "smollm2", "-", "-n", "6", "--temp", "0", *FAST, input="Name a colour.\n", env=env)
    assert a.returncode == 0, a.stderr
    b = cli("run", "-m", smollm2_path, "Name a colour.", "-n", "6", "--temp", "0", *FAST)
    assert b.returncode == 0, b.stderr
    assert a.stdout == b.stdout and a.stdout.strip()


@pytest.mark.model
def test_stop_string_is_cut(smollm2_path: Path) -> None:
    r = cli("run", "--raw", "-m", smollm2_path, "1, 2, 3, 4,", "-n", "24", "--temp", "0",
                "--stop", "7", "--stop", "never-there", *FAST)
    assert r.returncode == 0, r.stderr
    assert "7" not in r.stdout
    assert "5" in r.stdout


@pytest.mark.model
def test_verbose_goes_to_stderr_only(smollm2_path: Path) -> None:
    r = cli("run", "-m", smollm2_path, "Hi", "-n", "4", "--temp", "0", "--verbose", *FAST)
    assert r.returncode == 0, r.stderr
    assert "eval time" in r.stderr and "load time" in r.stderr
    assert "llama_" not in r.stdout and "eval time" not in r.stdout
    quiet = cli("run", "-m", smollm2_path, "Hi", "-n", "4", "--temp", "0", *FAST)
    assert quiet.returncode == 0
    assert quiet.stderr == ""
    assert quiet.stdout == r.stdout


def _json_grammar_path() -> str:
    import pyllama as pl

    deadline = time.time() + 5
    while True:  # grammar.py / json.gbnf may be landing concurrently
        try:
            return str(pl.grammar_path("json"))
        except (AttributeError, ValueError, FileNotFoundError):
            if time.time() > deadline:
                raise
            time.sleep(1)


@pytest.mark.model
@pytest.mark.parametrize("prompt", ["Give a JSON object with a name and an age.",
                                    "What is the capital of France? Answer in JSON."])
def test_grammar_file_gives_json(smollm2_path: Path, prompt: str) -> None:
    # Prompts whose greedy answer closes its JSON well within -n (a 135M model can loop).
    r = cli("run", "-m", smollm2_path, prompt, "-n", "96", "--temp", "0",
                "--grammar-file", _json_grammar_path(), *FAST)
    assert r.returncode == 0, r.stderr
    json.loads(r.stdout)


SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


@pytest.mark.model
def test_json_schema_inline_and_file(smollm2_path: Path, tmp_path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema_file = tmp_path / "person.json"
    schema_file.write_text(json.dumps(SCHEMA))
    for spec in (json.dumps(SCHEMA), str(schema_file)):
        r = cli("run", "-m", smollm2_path, "Give me a person as JSON.", "-n", "64", "--temp", "0",
                    "--json-schema", spec, *FAST)
        assert r.returncode == 0, r.stderr
        jsonschema.validate(json.loads(r.stdout), SCHEMA)


@pytest.mark.model
def test_grammar_and_schema_input_errors(smollm2_path: Path, tmp_path: Path) -> None:
    r = cli("run", "-m", smollm2_path, "hi", "--grammar-file", tmp_path / "missing.gbnf")
    assert r.returncode == 2
    assert "missing.gbnf" in _one_error_line(r)
    bad = tmp_path / "bad.gbnf"
    bad.write_text("root ::= undefined-rule\n")
    r = cli("run", "-m", smollm2_path, "hi", "--grammar-file", bad)
    assert r.returncode == 2
    assert "grammar" in _one_error_line(r).lower()
    r = cli("run", "-m", smollm2_path, "hi", "--json-schema", "{not json")
    assert r.returncode == 2
    assert "JSON" in _one_error_line(r)
    r = cli("run", "-m", smollm2_path, "hi", "--json-schema", tmp_path / "nope.json")
    assert r.returncode == 2
    assert "nope.json" in _one_error_line(r)
    r = cli("run", "-m", smollm2_path, "hi", "--top-p", "1.5")
    assert r.returncode == 2
    assert "top_p" in _one_error_line(r)


@pytest.mark.model
def test_info_model(smollm2_path: Path) -> None:
    import pyllama as pl

    r = cli("info", smollm2_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "architecture:   llama" in out
    assert "Q4_1" in out
    assert "134.5M" in out
    assert "<|im_start|>" in out  # the chat template preview
    assert "8192" in out
    assert pl.__llama_cpp_commit__ in out and "CPU" in out
    r = cli("info", "--json", smollm2_path)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)["model"]
    assert data["architecture"] == "llama"
    assert data["ftype"] == "Q4_1"
    assert data["n_vocab"] == 49152 and data["n_layer"] == 30
    assert data["file_size"] == os.path.getsize(smollm2_path)
    assert "<|im_start|>" in data["chat_template"]


@pytest.mark.model
def test_chat_piped_stdin(smollm2_path: Path) -> None:
    from pyllama import LLM

    r = cli("chat", "-m", smollm2_path, "-n", "8", "--temp", "0", *FAST, input="Hello\n/exit\nnot read\n")
    assert r.returncode == 0, r.stderr
    with LLM(smollm2_path, n_threads=1) as llm:
        answer = llm.chat([{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0).text
    assert answer.strip() and r.stdout == answer + "\n"      # one answer: /exit stopped the chat
    _no_traceback(r)


@pytest.mark.model
def test_chat_keeps_history_and_reset(smollm2_path: Path) -> None:
    from pyllama import LLM

    r = cli("chat", "-m", smollm2_path, "-n", "6", "--temp", "0", "--system", "You are terse.", *FAST,
                input="Hi\nWhat did I say?\n/reset\nHi\n")  # EOF ends the chat
    assert r.returncode == 0, r.stderr
    with LLM(smollm2_path, n_threads=1) as llm:
        sys_msg = [{"role": "system", "content": "You are terse."}]
        a1 = llm.chat(sys_msg + [{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0).text
        hist = sys_msg + [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": a1},
                          {"role": "user", "content": "What did I say?"}]
        a2 = llm.chat(hist, max_tokens=6, temperature=0).text
    assert r.stdout == f"{a1}\n{a2}\n{a1}\n"


@pytest.mark.model
def test_sigint_stops_generation_cleanly(smollm2_path: Path) -> None:
    kwargs = {"start_new_session": True} if os.name == "posix" else {}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyllama", "run", "-m", str(smollm2_path), "Tell me a very long story.",
         "-n", "2000", "--ignore-eos", *FAST],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=_env(), **kwargs)
    try:
        first = proc.stdout.read(1)  # generation is under way
        assert first, proc.stderr.read().decode()
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    err_text = err.decode("utf-8", "replace")
    assert proc.returncode == 130, err_text
    assert elapsed < 5, elapsed  # ~2 s asked; some slack for a loaded machine
    assert "Traceback" not in err_text and "KeyboardInterrupt" not in err_text
    assert err_text.endswith("\n")


def test_run_with_speculation_flags(smollm2_path: Path) -> None:
    """llama-server's speculation flags: the answer is plain decoding's, the timings report the
    drafts (--no-spec-cost-model: drafted whatever a draft costs on this runner); so does -md
    (a draft model); a missing draft model is one clear line."""
    prompt = "Repeat exactly: one two three four five six seven eight nine ten, one two three four five"
    plain = cli("run", "-m", smollm2_path, prompt, "-n", "40", "--temp", "0", *FAST)
    spec = cli("run", "-m", smollm2_path, prompt, "-n", "40", "--temp", "0", "--spec-type", "ngram-simple",
               "--spec-draft-n-max", "8", "--spec-ngram-simple-size-n", "2", "--no-spec-cost-model", "--verbose",
               *FAST)
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout
    assert "draft acceptance rate" in spec.stderr
    # -md: a draft model (here the model itself, which agrees with itself on every draft).
    drafted = cli("run", "-m", smollm2_path, prompt, "-n", "40", "--temp", "0", "-md", smollm2_path,
                  "--spec-draft-p-min", "0.5", "--verbose", *FAST)
    assert drafted.returncode == 0, drafted.stderr
    assert drafted.stdout == plain.stdout
    assert "draft acceptance rate" in drafted.stderr
    bad = cli("run", "-m", smollm2_path, "hi", "-n", "2", "-md", "no-such-draft.gguf", *FAST)
    assert bad.returncode != 0
    assert "no-such-draft.gguf" in _one_error_line(bad)
    zero = cli("run", "-m", smollm2_path, "hi", "--spec-type", "ngram-simple", "--spec-draft-n-max", "0", *FAST)
    assert zero.returncode == 2 and "--spec-draft-n-max" in zero.stderr
