"""llama-cpp-python's own test files, run against ``pyllama.install_as_llama_cpp()`` (issue 24).

The test files come from llama-cpp-python's source release on the package registry - the
archive vendor/llama.cpp is taken from (scripts/fetch_llama_cpp_python_tests.py extracts
their tests/ into the cache).  They run unchanged, in a child pytest, with one file added: a
conftest.py that calls ``pyllama.install_as_llama_cpp()`` before they import ``llama_cpp``.
The child is its own interpreter, so the alias never reaches this process.

Their ``huggingface_hub.hf_hub_download(repo, file)`` calls go, through the real
huggingface_hub client, to a local stand-in for the Hub (tests/hf_hub_server.py, via
``HF_ENDPOINT``) that serves our test models under upstream's repository and file names:

* Qwen3.5-0.8B (the "real model") and stories15M (the transformer of the prompt-cache tests)
  -> SmolLM2-135M-Instruct (llama architecture);
* bge-small-en-v1.5 (embeddings) -> a tiny random-weight BERT with bge's vocabulary.

Upstream's vocab-only model path ``./vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf`` is
relative to the working directory: the child runs where that path leads to our vendored copy.

Every upstream test that does not depend on one particular model's output or on
llama-cpp-python's raw ctypes layer must pass; the others are deselected by DESELECTED below,
each with its reason (docs/compat.md lists the same).  The test asserts the exact set of
passed tests, so a new upstream test, a skip or a failure all show up.

The same run, without the alias, on the real llama-cpp-python 0.3.36 (where
benchmarks/setup_llama_cpp_python.sh built it; skipped otherwise) must give the same set: the
deselection is about the models and the ctypes layer, not about pyllama.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import run_python_subprocess  # (conftest also puts tests/ on sys.path: hf_hub_server, tiny_bert)

pytest.importorskip("huggingface_hub")
pytest.importorskip("scipy", reason="llama-cpp-python's test_llama.py imports scipy")

from hf_hub_server import HubServer  # noqa: E402

pytestmark = pytest.mark.model

ROOT = Path(__file__).resolve().parents[1]
FETCH_SCRIPT = ROOT / "scripts" / "fetch_llama_cpp_python_tests.py"
TIMEOUT = 300  # seconds for the whole child pytest run

# Upstream's fixtures download these (repo, file); the fake Hub answers with local models.
SMOLLM2_AS = [
    ("lmstudio-community/Qwen3.5-0.8B-GGUF", "Qwen3.5-0.8B-Q8_0.gguf"),
    ("ggml-org/models", "tinyllamas/stories15M-q4_0.gguf"),
]
BERT_AS = [("CompendiumLabs/bge-small-en-v1.5-gguf", "bge-small-en-v1.5-q4_k_m.gguf")]

RECURRENT = "llama_cpp_recurrent_model_path-True-False"
HYBRID = "llama_cpp_hybrid_model_path-False-True"
TRANSFORMER = "llama_cpp_transformer_model_path-False-False"

NO_MAMBA = ("needs a recurrent (Mamba) GGUF, QuantFactory/mamba-130m-hf-GGUF; the offline test models "
            "are llama, gemma3 and BERT only")
NO_HYBRID = ("needs a hybrid attention/SSM (Falcon-H1) GGUF, tiiuae/Falcon-H1-Tiny-90M-Instruct-GGUF; "
             "the offline test models are llama, gemma3 and BERT only")

# test id (relative to upstream's tests/) -> why it does not run here.
DESELECTED: dict[str, str] = {
    "test_llama.py::test_real_model": (
        "drives llama-cpp-python's ctypes layer directly (llama_cpp._internals.LlamaModel/LlamaContext/"
        "LlamaBatch/LlamaSampler on llama_model_default_params() structs, load_mode/flash_attn_type "
        "fields); pyllama has no ctypes bindings, and it asserts Qwen3.5's token ids"),
    "test_llama.py::test_real_llama": (
        "asserts Qwen3.5-0.8B's own outputs: the greedy continuation ' jumps over the lazy dog.', "
        "'true' sampled at temperature 0.8 with seed 1337, and a logits processor that multiplies "
        "Qwen's raw logits by 1000 (only meaningful for that model's logit signs)"),
    "test_llama.py::test_real_llama_repeated_prompt_cache": (
        "asserts Qwen3.5-0.8B's greedy continuation ' jumps over the lazy dog.' (on SmolLM2, "
        "llama-cpp-python 0.3.36 itself continues ' is a classic example of a')"),
    "test_llama.py::test_recurrent_model_prompt_cache_reset": NO_MAMBA,
    "test_llama.py::test_hybrid_model_prompt_cache_reset": NO_HYBRID,
    **{f"test_llama.py::{name}[{case}]": reason
       for name in ("test_exact_cached_prompt_reuse_matches_fresh",
                    "test_loaded_exact_cached_prompt_reuse_matches_fresh",
                    "test_ram_cache_exact_prompt_hit_matches_fresh",
                    "test_shorter_prompt_prefix_reuse_matches_fresh")
       for case, reason in ((RECURRENT, NO_MAMBA), (HYBRID, NO_HYBRID))},
}

# Everything else in the four upstream files: these must pass, and nothing else may run.
EXPECTED_PASSED = {
    "test_llama.py::test_llama_cpp_version",
    "test_llama.py::test_llama_cpp_tokenization",
    f"test_llama.py::test_exact_cached_prompt_reuse_matches_fresh[{TRANSFORMER}]",
    f"test_llama.py::test_loaded_exact_cached_prompt_reuse_matches_fresh[{TRANSFORMER}]",
    f"test_llama.py::test_ram_cache_exact_prompt_hit_matches_fresh[{TRANSFORMER}]",
    f"test_llama.py::test_shorter_prompt_prefix_reuse_matches_fresh[{TRANSFORMER}]",
    "test_llama.py::test_real_llama_embeddings",
    "test_llama_chat_format.py::test_mistral_instruct",
    "test_llama_chat_format.py::test_hf_tokenizer_config_str_to_chat_formatter",
    "test_llama_grammar.py::test_grammar_from_string",
    "test_llama_grammar.py::test_composed_pydantic_grammar",
    "test_llama_grammar.py::test_grammar_anyof",
    "test_llama_speculative.py::test_find_candidate_pred_tokens",
}

# The one file added to upstream's tests/: the alias, installed before any test module imports
# it (only on pyllama), and the deselection by exact test id (pytest's --deselect matches
# prefixes, and test_real_llama is a prefix of test_real_llama_embeddings).
CONFTEST = '''\
"""Added by pyllama's tests/test_compat_upstream.py."""
import os
from pathlib import Path

if os.environ["COMPAT_IMPLEMENTATION"] == "pyllama":
    import pyllama

    pyllama.install_as_llama_cpp()

import llama_cpp  # noqa: E402

DESELECTED = set(Path(__file__).with_name("deselected.txt").read_text().split())
# which implementation really ran, for the parent to check
Path(os.environ["COMPAT_ORIGIN_FILE"]).write_text(f"Llama from {llama_cpp.Llama.__module__} ({llama_cpp.__file__})")


def pytest_collection_modifyitems(config, items):
    chosen, dropped = [], []
    for item in items:
        (dropped if item.nodeid.split("/", 1)[-1] in DESELECTED else chosen).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = chosen
'''


def _reference_llama_cpp() -> Path | None:
    """The real llama-cpp-python 0.3.36, where benchmarks/setup_llama_cpp_python.sh built it."""
    found = sorted((ROOT / "benchmarks" / ".cache" / "venv-lcp" / "lib").glob("python*/site-packages/llama_cpp"))
    return found[0] if found and (found[0] / "__init__.py").is_file() else None


@pytest.fixture(scope="module")
def upstream_tests() -> Path:
    """The cached tests/ directory of the pinned llama-cpp-python release."""
    result = subprocess.run([sys.executable, str(FETCH_SCRIPT)], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        pytest.fail(f"{FETCH_SCRIPT.name} exited {result.returncode}:\n{result.stderr[-3000:]}", pytrace=False)
    path = Path(result.stdout.strip().splitlines()[-1])
    assert (path / "test_llama.py").is_file(), path
    return path


@pytest.fixture(scope="module")
def hub(smollm2_path: Path, vocab_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The fake Hub with upstream's repositories, serving our models."""
    from tiny_bert import make_tiny_bert

    bert = make_tiny_bert(tmp_path_factory.mktemp("upstream-bert") / "tiny-bert.gguf")
    server = HubServer()
    repos: dict[str, dict[str, Path]] = {}
    for (repo, name), path in [*((r, smollm2_path) for r in SMOLLM2_AS), *((r, bert) for r in BERT_AS)]:
        repos.setdefault(repo, {})[name] = path
    for repo, files in repos.items():
        server.add_repo(repo, files)
    with server:
        yield server


def _ids(report: Path) -> dict[str, str]:
    """junit XML -> {'test_llama.py::test_x[param]': 'passed' | 'failed' | 'error' | 'skipped'}."""
    outcomes: dict[str, str] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        module = case.get("classname", "").rsplit(".", 1)[-1]
        # a module that fails to import is reported with its dotted name and no classname
        key = f"{module}.py::{case.get('name')}" if module else f"{case.get('name')} (collection)"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
        outcomes[key] = outcome
    return outcomes


@pytest.mark.parametrize("implementation", ["pyllama", "llama-cpp-python"])
def test_upstream_test_files(implementation: str, upstream_tests: Path, hub: HubServer, vocab_dir: Path,
                             tmp_path: Path) -> None:
    """On pyllama, the selection passes.  On llama-cpp-python 0.3.36 itself (when the benchmarks
    built it), the same selection passes with the same stand-in models: what is deselected is
    deselected because of the models or the ctypes layer, not because pyllama fails it."""
    python_path = ""  # not our tests/: the child sees upstream's files only
    if implementation == "llama-cpp-python":
        package = _reference_llama_cpp()
        if package is None:
            pytest.skip("llama-cpp-python 0.3.36 is not built (bash benchmarks/setup_llama_cpp_python.sh)")
        shim = tmp_path / "reference"  # only its llama_cpp package: the rest comes from this interpreter
        shim.mkdir()
        (shim / "llama_cpp").symlink_to(package, target_is_directory=True)
        python_path = str(shim)

    found = sorted(p.name for p in upstream_tests.glob("test_*.py"))
    assert found == ["test_llama.py", "test_llama_chat_format.py", "test_llama_grammar.py",
                     "test_llama_speculative.py"], f"upstream's test files changed: {found}"

    # upstream's layout, in a scratch directory: tests/ (+ our conftest.py) and the vocab files
    # at the relative path test_llama.py opens.
    work = tmp_path / "llama-cpp-python"
    shutil.copytree(upstream_tests, work / "tests")
    (work / "tests" / "conftest.py").write_text(CONFTEST)
    (work / "tests" / "deselected.txt").write_text("\n".join(DESELECTED) + "\n")
    (work / "pytest.ini").write_text("[pytest]\n")  # the rootdir: nothing of ours is configured in
    models = work / "vendor" / "llama.cpp" / "models"
    models.parent.mkdir(parents=True)
    models.symlink_to(vocab_dir, target_is_directory=True)

    report = tmp_path / "junit.xml"
    args = ["tests", "-p", "no:cacheprovider", "-q", "-rfEs", f"--junitxml={report}"]
    env = {
        "COMPAT_IMPLEMENTATION": implementation,
        "COMPAT_ORIGIN_FILE": str(tmp_path / "origin.txt"),
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_TOKEN": "",
        "PYTHONPATH": python_path,
    }
    downloads_before = len(hub.downloads())
    code = f"import sys, pytest; sys.exit(pytest.main({args!r}))"
    result = run_python_subprocess(code, timeout=TIMEOUT, env=env, cwd=work)
    log = f"--- stdout ---\n{result.stdout[-12000:]}\n--- stderr ---\n{result.stderr[-4000:]}"

    assert report.is_file(), f"the child pytest wrote no report (exit {result.returncode})\n{log}"
    outcomes = _ids(report)
    failed = sorted(k for k, v in outcomes.items() if v in ("failed", "error"))
    assert not failed, f"upstream tests failed on {implementation}: {failed}\n{log}"
    skipped = sorted(k for k, v in outcomes.items() if v == "skipped")
    assert not skipped, f"upstream tests skipped: {skipped}\n{log}"
    passed = {k for k, v in outcomes.items() if v == "passed"}
    assert passed == EXPECTED_PASSED, (
        f"missing: {sorted(EXPECTED_PASSED - passed)}; unexpected: {sorted(passed - EXPECTED_PASSED)}\n{log}")
    assert result.returncode == 0, log
    expected_origin = "Llama from pyllama" if implementation == "pyllama" else "Llama from llama_cpp.llama "
    origin = (tmp_path / "origin.txt").read_text()
    assert origin.startswith(expected_origin), f"the child did not run on {implementation}: {origin}"
    # the models came through the real huggingface_hub client, from the fake Hub
    assert len(hub.downloads()) > downloads_before, "no hf_hub_download reached the fake Hub"


def test_deselected_tests_exist_upstream(upstream_tests: Path) -> None:
    """Every deselected id names a real upstream test (a renamed test must not stay listed)."""
    sources = {p.name: p.read_text() for p in upstream_tests.glob("test_*.py")}
    for test_id in DESELECTED:
        module, name = test_id.split("::")
        func = name.split("[")[0]
        assert f"def {func}(" in sources[module], test_id
        if "[" in name:
            fixture = name.split("[")[1].split("-")[0]
            assert f'"{fixture}"' in sources[module], test_id
    assert not set(DESELECTED) & EXPECTED_PASSED

