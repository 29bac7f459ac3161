"""Shared pytest fixtures.

Fixtures (all session-scoped):

* ``vocab_dir``          vendor/llama.cpp/models (upstream's vocab-only GGUFs and tokenizer
                         test vectors); populated with scripts/vendor_llama_cpp.py if missing.
* ``tiny_model_path``    a tiny random-weight llama model (tests/tiny_model.py), made once.
* ``tiny_model_factory`` ``factory(**make_tiny_llama_kwargs) -> Path``, cached per kwargs.
* ``smollm2_path``       SmolLM2-135M-Instruct Q4_1 from the package registry (pyllama.models).
* ``gemma_path``         Gemma 3 270M Q4_K_M from the package registry.
* ``run_python``         the ``run_python_subprocess`` helper below, as a fixture.

Model fixtures fail loudly when the download fails; only with ``PYLLAMA_OFFLINE=1``
do they skip (and then only when the model is not already cached).

``run_python_subprocess(code, timeout=60)`` runs ``sys.executable -c code`` for tests of
things that might abort the interpreter; importable as ``from conftest import
run_python_subprocess``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

TESTS_DIR = Path(__file__).resolve().parent
ROOT = TESTS_DIR.parent
VOCAB_DIR = ROOT / "vendor" / "llama.cpp" / "models"

if str(TESTS_DIR) not in sys.path:  # `import tiny_model` from any rootdir / import mode
    sys.path.insert(0, str(TESTS_DIR))


def _offline() -> bool:
    return os.environ.get("PYLLAMA_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


# --------------------------------------------------------------------------- subprocess helper


def run_python_subprocess(
    code: str,
    timeout: float = 60,
    *,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``python -c code`` in a fresh interpreter and return the CompletedProcess
    (text stdout/stderr captured, returncode negative for a signal, e.g. -6 for abort).

    tests/ is on the child's PYTHONPATH (so ``import tiny_model`` works) and
    faulthandler is on (a crash prints a traceback).  It never hangs: after
    `timeout` seconds the child's whole process group is killed and the test fails
    with whatever it had printed.
    """
    child_env = dict(os.environ)
    child_env["PYTHONFAULTHANDLER"] = "1"
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(TESTS_DIR), child_env.get("PYTHONPATH", "")) if p
    )
    child_env.setdefault("PYTHONIOENCODING", "utf-8")
    if env:
        child_env.update(env)
    kwargs: dict[str, Any] = {}
    if os.name == "posix":
        kwargs["start_new_session"] = True  # so a timeout can kill grandchildren too
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=child_env,
        cwd=cwd,
        **kwargs,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        if os.name == "posix":
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:
            proc.kill()
        out, err = proc.communicate()
        pytest.fail(
            f"python subprocess timed out after {timeout}s and was killed\n"
            f"--- code ---\n{code}\n--- stdout ---\n{out[-4000:]}\n--- stderr ---\n{err[-4000:]}",
            pytrace=False,
        )
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="session")
def run_python() -> Callable[..., subprocess.CompletedProcess]:
    return run_python_subprocess


# --------------------------------------------------------------------------- vocab + tiny models


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    probe = VOCAB_DIR / "ggml-vocab-llama-spm.gguf"
    if not probe.is_file():
        cmd = [sys.executable, str(ROOT / "scripts" / "vendor_llama_cpp.py"), "--with", "vocab"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not probe.is_file():
            msg = (
                f"cannot populate {VOCAB_DIR}: {' '.join(cmd)} exited {result.returncode}\n"
                f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
            )
            if _offline():
                pytest.skip(f"PYLLAMA_OFFLINE=1 and the vocab files are missing ({msg.splitlines()[0]})")
            pytest.fail(msg, pytrace=False)
    return VOCAB_DIR


@pytest.fixture(scope="session")
def tiny_model_factory(vocab_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``factory(**kwargs)`` -> path of make_tiny_llama(**kwargs), made once per session per kwargs."""
    from tiny_model import make_tiny_llama

    base = tmp_path_factory.mktemp("tiny-models")
    made: dict[tuple, Path] = {}

    def factory(**kwargs: Any) -> Path:
        key = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
        if key not in made:
            made[key] = make_tiny_llama(base / f"tiny-{len(made)}.gguf", **kwargs)
        return made[key]

    return factory


@pytest.fixture(scope="session")
def tiny_model_path(tiny_model_factory: Callable[..., Path]) -> Path:
    """Tiny random llama (2 layers, n_embd 64, llama SPM vocabulary of 32000 tokens, F32)."""
    return tiny_model_factory()


# --------------------------------------------------------------------------- real models


def _fetch(name: str) -> Path:
    from pyllama import models

    if _offline() and not models.is_cached(name):
        # fetch_model would raise too; say why we skip rather than fail.
        try:
            return models.fetch_model(name, progress=False)
        except models.ModelFetchError as exc:
            pytest.skip(f"PYLLAMA_OFFLINE=1: {exc}")
    # Any failure here propagates: a model test must not pass by skipping.
    return models.fetch_model(name, progress=False)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (llama architecture), sha256-verified, cached."""
    return _fetch("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """Gemma 3 270M Q4_K_M (gemma3 architecture), sha256-verified, cached."""
    return _fetch("gemma3-270m")
