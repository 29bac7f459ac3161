"""Models from Hugging Face: ``LLM.from_pretrained``, ``pyllama run/serve/pull -hf``.

There is no network here, so tests/hf_hub_server.py stands in for the Hub on 127.0.0.1
(``HF_ENDPOINT``) and the real ``huggingface_hub`` client code lists, checks and
downloads real GGUF files from it: the tiny random llama under several quantisation-like
names, the tiny LLaVA projector, and a tiny model split into three GGUF shards.  Each
test has its own HF_HOME (the Hub cache) and its own server.
"""

from __future__ import annotations

import contextlib
import filecmp
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

pytest.importorskip("huggingface_hub")

from hf_hub_server import HubServer  # noqa: E402

from pyllama import LLM, models  # noqa: E402
from pyllama.cli import build_parser, main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
JPEG = ROOT / "vendor" / "llama.cpp" / "tools" / "mtmd" / "test-1.jpeg"
REPO = "test/tiny-GGUF"
TOKEN = "hf_test_secret_token"
TIMEOUT = 240


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def published(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The real GGUF files the fake Hub serves: the tiny model, its projector, a split model."""
    import tiny_model
    from tiny_mmproj import make_tiny_mmproj

    d = tmp_path_factory.mktemp("hub-files")
    mmproj = make_tiny_mmproj(d / "mmproj.gguf")
    return {"model": tiny_model_path, "mmproj": mmproj, "split": _make_split_model(tiny_model, d)}


def _make_split_model(tiny_model, directory: Path) -> list[Path]:
    """The tiny llama written as three GGUF shards (``-0000i-of-00003.gguf``), as
    convert_hf_to_gguf.py --split-max-tensors writes them (gguf-py's split writer)."""
    real_writer = tiny_model.GGUFWriter
    stem = "tiny-split-Q6_K"

    def split_writer(_path: str, arch: str, **kw):  # write the shards here instead of the temp file
        return real_writer(str(directory / f"{stem}.gguf"), arch, split_max_tensors=8, **kw)

    tiny_model.GGUFWriter = split_writer
    try:
        with contextlib.suppress(FileNotFoundError):  # make_tiny_llama's rename of a file never written
            tiny_model.make_tiny_llama(directory / "unused.gguf", seed=3)
    finally:
        tiny_model.GGUFWriter = real_writer
    parts = sorted(directory.glob(f"{stem}-*-of-*.gguf"))
    assert [p.name for p in parts] == [f"{stem}-{i:05d}-of-00003.gguf" for i in (1, 2, 3)], parts
    return parts


@pytest.fixture
def hub(published: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A fake Hub with a few repositories, HF_ENDPOINT pointing at it, a fresh HF_HOME."""
    model, mmproj = published["model"], published["mmproj"]
    server = HubServer()
    server.add_repo(REPO, {
        "README.md": b"# tiny\n",
        "tiny-F16.gguf": model,
        "tiny-Q4_K_M.gguf": model,
        "tiny-Q8_0.gguf": model,
        "mmproj-tiny-F16.gguf": mmproj,
    })
    server.add_repo("test/no-q4-GGUF", {"tiny-F16.gguf": model, "tiny-Q8_0.gguf": model})
    server.add_repo("test/odd-GGUF", {"mmproj-a.gguf": mmproj, "tiny-IQ3_XS.gguf": model, "tiny-f16.gguf": model})
    server.add_repo("test/split-GGUF", {"tiny-Q8_0.gguf": model,
                                        **{p.name: p for p in published["split"]}})
    server.add_repo("test/no-gguf", {"README.md": b"safetensors only\n", "model.safetensors": b"\0" * 64})
    server.add_repo("test/private-GGUF", {"tiny-Q4_K_M.gguf": model}, token=TOKEN)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE",
                 "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: another test module (hf_reference)
    # sets it before transformers imports the hub, so undo that here too.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    with server:
        yield server


def _in_cache(path: Path, tmp_path: Path) -> bool:
    return str(path).startswith(str(tmp_path / "hf-home" / "hub"))


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONIOENCODING"] = "utf-8"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    return env


def cli(*args: object, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """`python -m pyllama ARGS` with this test's environment (HF_ENDPOINT, HF_HOME)."""
    return subprocess.run([sys.executable, "-m", "pyllama", *map(str, args)], input="", capture_output=True,
                          text=True, encoding="utf-8", errors="replace", env=_env(), timeout=timeout)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("pyllama: error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


# --------------------------------------------------------------------------- choosing the file


def test_quant_tag_picks_the_file_case_insensitively(hub: HubServer, published: dict, tmp_path: Path) -> None:
    got = models.pull_from_hub(f"{REPO}:q8_0", mmproj=False, progress=False)
    assert got.filename == "tiny-Q8_0.gguf"
    assert got.path.name == "tiny-Q8_0.gguf" and _in_cache(got.path, tmp_path)
    assert filecmp.cmp(got.path, published["model"], shallow=False)
    assert got.parts == (got.path,) and got.mmproj_path is None
    assert hub.downloads() == [f"/{REPO}/resolve/main/tiny-Q8_0.gguf"]


def test_default_quant_and_fallbacks(hub: HubServer) -> None:
    assert models.pull_from_hub(REPO, mmproj=False, progress=False).filename == "tiny-Q4_K_M.gguf"
    # no Q4_K_M: Q8_0, as llama.cpp
    assert models.pull_from_hub("test/no-q4-GGUF", progress=False).filename == "tiny-Q8_0.gguf"
    # neither: the first GGUF that is a model (never the projector)
    odd = models.pull_from_hub("test/odd-GGUF", mmproj=False, progress=False)
    assert odd.filename == "tiny-IQ3_XS.gguf"
    assert models.pull_from_hub("test/odd-GGUF:F16", mmproj=False, progress=False).filename == "tiny-f16.gguf"


def test_mmproj_comes_with_the_model(hub: HubServer, published: dict) -> None:
    got = models.pull_from_hub(f"{REPO}:Q8_0", progress=False)
    assert got.mmproj_filename == "mmproj-tiny-F16.gguf"
    assert got.mmproj_path is not None and got.mmproj_path.parent == got.path.parent
    assert filecmp.cmp(got.mmproj_path, published["mmproj"], shallow=False)
    assert sorted(hub.downloads()) == sorted(f"/{REPO}/resolve/main/{n}"
                                             for n in ("tiny-Q8_0.gguf", "mmproj-tiny-F16.gguf"))


def test_split_model_downloads_every_part_and_loads(hub: HubServer, published: dict) -> None:
    got = models.pull_from_hub("test/split-GGUF:q6_k", progress=False)
    assert got.filename == "tiny-split-Q6_K-00001-of-00003.gguf"
    assert [p.name for p in got.parts] == [p.name for p in published["split"]]
    assert got.path == got.parts[0]
    for local, original in zip(got.parts, published["split"]):
        assert filecmp.cmp(local, original, shallow=False)
    # llama.cpp finds the other shards next to the first: the model loads and generates
    with LLM(got.path, n_ctx=64, n_threads=1) as llm:
        assert llm.complete("Hello", max_tokens=4, temperature=0, ignore_eos=True).usage["completion_tokens"] == 4
    # a glob that matches the shards names one model: from_pretrained takes them all
    path = models.fetch_from_hub("test/split-GGUF", "*Q6_K*.gguf", progress=False)
    assert path == got.path


def test_cache_is_reused_and_works_offline(hub: HubServer, tmp_path: Path, monkeypatch) -> None:
    first = models.pull_from_hub(f"{REPO}:Q8_0", progress=False)
    n_downloads = len(hub.downloads())
    assert n_downloads == 2
    again = models.pull_from_hub(f"{REPO}:Q8_0", progress=False)
    assert again == first
    assert len(hub.downloads()) == n_downloads  # no file fetched a second time (HEAD only)
    hub.stop()
    # The Hub unreachable: the cached snapshot answers, as llama.cpp falls back to its cache ...
    unreachable = models.pull_from_hub(f"{REPO}:Q8_0", progress=False)
    assert unreachable.path == first.path and unreachable.mmproj_path == first.mmproj_path
    # ... and what was never downloaded gets a message that says what to do
    with pytest.raises(models.HubOfflineError, match="cannot be reached") as exc:
        models.pull_from_hub("test/no-q4-GGUF", progress=False)
    assert "HF_HUB_OFFLINE=1" in str(exc.value) and "-m FILE" in str(exc.value)
    # HF_HUB_OFFLINE=1: no request at all, the cache answers
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = models.pull_from_hub(f"{REPO}:Q8_0", progress=False)
    assert offline.path == first.path and offline.mmproj_path == first.mmproj_path


def test_progress_bar_on_a_terminal(hub: HubServer) -> None:
    # `pyllama pull -hf` with stderr on a terminal shows huggingface_hub's progress bar;
    # the path still goes alone to stdout (a pipe here).
    import fcntl
    import pty
    import select
    import struct
    import termios

    controller, terminal = pty.openpty()
    # a 24x120 terminal (a fresh pty is 0x0, where tqdm draws an empty bar)
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    try:
        proc = subprocess.Popen([sys.executable, "-m", "pyllama", "pull", "-hf", f"{REPO}:F16", "--no-mmproj"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=terminal, env=_env())
        os.close(terminal)
        seen = b""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
            elif proc.poll() is not None:
                break
        out, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        os.close(controller)
    assert proc.returncode == 0, seen.decode(errors="replace")
    assert Path(out.decode().strip()).name == "tiny-F16.gguf"
    text = seen.decode(errors="replace")
    assert "tiny-F16.gguf" in text and "100%" in text, text


def test_fake_hub_answers_the_tree_listing(hub: HubServer) -> None:
    # The paginated tree route (HfApi.list_repo_files, HfFileSystem) works too, for other
    # clients of this server (llama-cpp-python's own from_pretrained lists with it).
    from huggingface_hub import HfApi

    assert sorted(HfApi(endpoint=hub.url).list_repo_files("test/odd-GGUF")) == [
        "mmproj-a.gguf", "tiny-IQ3_XS.gguf", "tiny-f16.gguf"]


def test_hf_token_reaches_the_hub(hub: HubServer, monkeypatch) -> None:
    with pytest.raises(models.HubRepoNotFoundError, match="HF_TOKEN"):
        models.pull_from_hub("test/private-GGUF", progress=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    got = models.pull_from_hub("test/private-GGUF", progress=False)
    assert got.filename == "tiny-Q4_K_M.gguf"
    authorised = [r for r in hub.requests if r.headers.get("authorization") == f"Bearer {TOKEN}"]
    assert any("/api/models/test/private-GGUF" in r.path for r in authorised)
    assert any(r.method == "GET" and "/resolve/" in r.path for r in authorised)
    # an explicit token (--hf-token on the command line) does without the environment
    monkeypatch.delenv("HF_TOKEN")
    assert models.pull_from_hub("test/private-GGUF", token=TOKEN, progress=False).path == got.path
    r = cli("pull", "-hf", "test/private-GGUF", "--hf-token", TOKEN)
    assert r.returncode == 0 and Path(r.stdout.strip()) == got.path, r.stderr
    r = cli("pull", "-hf", "test/private-GGUF")
    assert r.returncode == 2 and "HF_TOKEN" in _one_error_line(r)


# --------------------------------------------------------------------------- errors


def test_errors_are_clear(hub: HubServer) -> None:
    with pytest.raises(models.HubRepoNotFoundError, match="test/missing-GGUF not found") as exc:
        models.pull_from_hub("test/missing-GGUF", progress=False)
    assert isinstance(exc.value, FileNotFoundError)
    with pytest.raises(models.HubFileNotFoundError, match="no GGUF model file in test/no-gguf") as exc:
        models.pull_from_hub("test/no-gguf", progress=False)
    assert "model.safetensors" in str(exc.value)
    with pytest.raises(models.HubFileNotFoundError) as exc:
        models.pull_from_hub(f"{REPO}:Q2_K", progress=False)
    msg = str(exc.value)
    assert "'Q2_K'" in msg and all(n in msg for n in ("tiny-F16.gguf", "tiny-Q4_K_M.gguf", "tiny-Q8_0.gguf"))
    assert isinstance(exc.value, FileNotFoundError) and isinstance(exc.value, ValueError)
    with pytest.raises(models.HubAmbiguousFileError, match="several files"):
        models.fetch_from_hub(REPO, "tiny-*.gguf", progress=False)
    with pytest.raises(models.HubFileNotFoundError, match="no file matching"):
        models.fetch_from_hub(REPO, "*Q5_K_M.gguf", progress=False)
    with pytest.raises(models.HubRepoNotFoundError, match="no revision 'v9'"):
        models.pull_from_hub(REPO, revision="v9", progress=False)
    for bad in ("just-a-name", "a/b/c", "/x"):
        with pytest.raises(ValueError, match="user>/<model"):
            models.pull_from_hub(bad)
    assert hub.downloads() == []  # nothing was downloaded on the way to any of these errors


def test_offline_without_cache_says_what_to_do(hub: HubServer, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.HubOfflineError) as exc:
        models.pull_from_hub(REPO, progress=False)
    msg = str(exc.value)
    assert "HF_HUB_OFFLINE" in msg and "-m FILE" in msg and REPO in msg
    assert isinstance(exc.value, ConnectionError)
    assert hub.requests == []


def test_missing_huggingface_hub_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install 'pyllama\[hf\]'"):
        models.pull_from_hub(REPO)
    with pytest.raises(ImportError, match=r"pip install 'pyllama\[hf\]'"):
        LLM.from_pretrained(REPO, "*Q8_0.gguf")


# --------------------------------------------------------------------------- LLM.from_pretrained


def test_from_pretrained_with_a_glob(hub: HubServer, published: dict, tmp_path: Path) -> None:
    with LLM.from_pretrained(REPO, filename="*Q8_0.gguf", n_ctx=64, n_threads=1) as llm:
        assert Path(llm.model_path).name == "tiny-Q8_0.gguf" and _in_cache(Path(llm.model_path), tmp_path)
        assert llm.multimodal is None
        out = llm.complete("Hello", max_tokens=4, temperature=0, ignore_eos=True)
        assert len(out.tokens) == 4
    with LLM(published["model"], n_ctx=64, n_threads=1) as ref:
        assert ref.complete("Hello", max_tokens=4, temperature=0, ignore_eos=True).text == out.text
    assert hub.downloads() == [f"/{REPO}/resolve/main/tiny-Q8_0.gguf"]


def test_from_pretrained_local_dir_extra_files_and_mmproj(hub: HubServer, tmp_path: Path) -> None:
    local = tmp_path / "here"
    with LLM.from_pretrained(REPO, "tiny-Q4_K_M.gguf", additional_files=["README.md"], local_dir=local,
                             local_dir_use_symlinks=False, mmproj=True, n_ctx=64, n_threads=1) as llm:
        assert Path(llm.model_path) == local / "tiny-Q4_K_M.gguf"
        assert llm.multimodal is not None
    assert (local / "README.md").read_bytes() == b"# tiny\n"
    assert (local / "mmproj-tiny-F16.gguf").is_file()
    # cache_dir: huggingface_hub's cache layout, somewhere else than $HF_HOME
    elsewhere = tmp_path / "other-cache"
    with LLM.from_pretrained(REPO, "tiny-F16.gguf", cache_dir=elsewhere, vocab_only=True) as llm:
        assert Path(llm.model_path).is_relative_to(elsewhere / "models--test--tiny-GGUF" / "snapshots")
    # no filename: llama.cpp's choice (the :QUANT tag, else Q4_K_M)
    with LLM.from_pretrained(f"{REPO}:Q8_0", n_ctx=64, n_threads=1, vocab_only=True) as llm:
        assert Path(llm.model_path).name == "tiny-Q8_0.gguf"


# --------------------------------------------------------------------------- the command line


def test_cli_pull_hf_prints_the_path(hub: HubServer, published: dict, tmp_path: Path) -> None:
    r = cli("pull", "-hf", f"{REPO}:Q8_0")
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip())
    assert path.name == "tiny-Q8_0.gguf" and _in_cache(path, tmp_path)
    assert filecmp.cmp(path, published["model"], shallow=False)
    assert "projector: " in r.stderr and "mmproj-tiny-F16.gguf" in r.stderr
    assert "100%" not in r.stderr  # not a terminal: no progress bar
    r = cli("pull", "-hf", REPO, "--hf-file", "tiny-F16.gguf", "--no-mmproj")
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).name == "tiny-F16.gguf" and "projector" not in r.stderr


def test_cli_errors_are_one_line(hub: HubServer) -> None:
    r = cli("pull", "-hf", "test/missing-GGUF")
    assert r.returncode == 2 and "not found" in _one_error_line(r)
    r = cli("pull", "-hf", f"{REPO}:Q2_K")
    line = _one_error_line(r)
    assert r.returncode == 2 and "tiny-Q8_0.gguf" in line and "Q2_K" in line
    r = cli("run", "-hf", "not-a-repo", "hi")
    assert r.returncode == 2 and "<user>/<model>" in _one_error_line(r)
    r = cli("run", "-m", "x.gguf", "-hf", REPO, "hi")
    assert r.returncode == 2 and "not both" in _one_error_line(r)
    r = cli("pull", "--hf-file", "tiny-F16.gguf")
    assert r.returncode == 2 and "needs -hf" in _one_error_line(r)
    env_offline = {"HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "pyllama", "pull", "-hf", REPO], capture_output=True, text=True,
                       env={**_env(), **env_offline}, timeout=TIMEOUT)
    assert r.returncode == 1 and "HF_HUB_OFFLINE" in _one_error_line(r)


def test_cli_run_hf_generates_text(hub: HubServer, published: dict) -> None:
    args = ("-t", "1", "--temp", "0", "-n", "6", "--ignore-eos", "-c", "64")
    r = cli("run", "-hf", f"{REPO}:Q8_0", "--no-mmproj", "--raw", *args, "Once upon a time")
    assert r.returncode == 0, r.stderr
    with LLM(published["model"], n_ctx=64, n_threads=1) as llm:
        want = llm.complete("Once upon a time", max_tokens=6, temperature=0, ignore_eos=True).text
    assert want.strip()
    assert r.stdout == want + ("" if want.endswith("\n") else "\n")


def test_cli_run_hf_loads_the_repos_mmproj(hub: HubServer, published: dict) -> None:
    # The image needs the projector: it came from the repository, not from --mmproj.
    args = ("-t", "1", "--temp", "0", "-n", "6", "--chat-template", "chatml")
    r = cli("run", "-hf", f"{REPO}:Q8_0", *args, "--image", JPEG, "What is in this image?")
    assert r.returncode == 0, r.stderr
    with LLM(published["model"], mmproj_path=published["mmproj"], chat_template="chatml", n_threads=1) as llm:
        content = [{"type": "image", "image": str(JPEG)}, {"type": "text", "text": "What is in this image?"}]
        want = llm.chat([{"role": "user", "content": content}], max_tokens=6, temperature=0).text
    assert r.stdout.rstrip("\n") == want.rstrip("\n")
    # --no-mmproj: no projector, so the image is refused before anything loads
    r = cli("run", "-hf", f"{REPO}:Q8_0", "--no-mmproj", *args, "--image", JPEG, "x")
    assert r.returncode == 2 and "projector" in _one_error_line(r)


def test_cli_serve_hf_answers_with_the_repos_model(hub: HubServer, published: dict) -> None:
    pytest.importorskip("fastapi")
    import httpx
    from server_process import ServerProcess

    server = ServerProcess("-hf", f"{REPO}:Q8_0", "-np", "1", "-c", "128", "-t", "1")
    try:
        url = server.wait_ready()
        got = httpx.post(url + "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 4,
                                                        "temperature": 0, "ignore_eos": True}, timeout=60)
        assert got.status_code == 200, got.text
        assert "tiny-Q8_0.gguf" in server.stderr and "projector mmproj-tiny-F16.gguf" in server.stderr
    finally:
        assert server.stop() == 0
    with LLM(published["model"], n_ctx=128, n_threads=1) as llm:
        want = llm.complete("Once upon a time", max_tokens=4, temperature=0, ignore_eos=True).text
    assert got.json()["choices"][0]["text"] == want


def test_serve_resolves_hf_like_run(hub: HubServer) -> None:
    # `serve` and `run` share the resolution: -hf gives the model and the repo's projector.
    from pyllama import cli as cli_module

    args = build_parser().parse_args(["serve", "-hf", f"{REPO}:q8_0"])
    path = cli_module._model_path_of(args)
    assert Path(path).name == "tiny-Q8_0.gguf"
    assert Path(args.mmproj_path).name == "mmproj-tiny-F16.gguf"
    kwargs = cli_module.serve_llm_kwargs(args, path)
    assert Path(kwargs["mmproj_path"]).name == "mmproj-tiny-F16.gguf"
    args = build_parser().parse_args(["serve", "-hf", REPO, "--no-mmproj", "--hf-file", "tiny-F16.gguf"])
    assert Path(cli_module._model_path_of(args)).name == "tiny-F16.gguf" and args.mmproj_path is None
    assert main(["serve", "-hf", "test/missing-GGUF", "--port", "0"]) == 2
