"""pyllama.integrations.ray on a local Ray instance: Ray Data's map_batches with LLMPredictor,
Ray Serve replicas of the OpenAI-compatible server, and a shutdown that leaves nothing behind.

One Ray instance serves the module (starting one costs seconds on a small machine): two CPUs,
its own temp dir, no dashboard, no usage stats, bound to this test run (``address="local"``
never joins another cluster).  Every Ray process it starts is recorded from the process table
and must be gone after shutdown; test_shutdown_leaves_no_ray_processes asserts that, and the
module fixture asserts it again (killing leftovers) whatever the order the tests ran in.
Servers bind 127.0.0.1 on free ports; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from pyllama import LLM  # noqa: E402

# Ray's own modules use pydantic features pydantic has deprecated: not ours to fix.
pytestmark = pytest.mark.filterwarnings(r"ignore::DeprecationWarning:ray\..*")

N_THREADS = 1
MAX_TOKENS = 4
N_PARALLEL = 16
# kv_unified=False: one KV stream per sequence, so a sequence's greedy text does not depend on
# which others share its batch (docs/batching.md) -- the actors' batches differ from the
# single process's, and the texts must still match row for row.
LLM_ARGS = {"n_ctx": 2048, "n_parallel": N_PARALLEL, "kv_unified": False, "n_threads": N_THREADS,
            "temperature": 0.0, "max_tokens": MAX_TOKENS}


# --------------------------------------------------------------------------- the process table


def _stat(pid: int):
    """(start time, state) of a live process, None when it is gone (or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    state, start = fields[0].decode(), int(fields[19])
    return None if state in ("Z", "X") else start


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def _all_pids() -> list:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def _descendants(root: int) -> set:
    children: dict = {}
    for pid in _all_pids():
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(pid)
    seen, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


class RaySession:
    """A local Ray instance owned by this module; knows every process it started."""

    def __init__(self) -> None:
        self.temp_dir = None
        self.started: dict = {}     # pid -> start time (pid reuse cannot fool the check)
        self._before: set = set()
        self._watching = threading.Event()
        self._watcher = None
        self._saved_env: dict = {}
        self._data_context = None

    @property
    def running(self) -> bool:
        return ray.is_initialized()

    def start(self) -> None:
        if self.running:
            return
        for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}.items():
            self._saved_env.setdefault(key, os.environ.get(key))
            os.environ[key] = value
        # Short: Ray's unix socket paths live under it (107 bytes at most).
        self.temp_dir = tempfile.mkdtemp(prefix="pyllama-ray-", dir="/tmp")
        self.started = {}
        self._before = _descendants(os.getpid())
        ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=self.temp_dir,
                 log_to_driver=False, configure_logging=False)
        from ray.data import DataContext

        ctx = DataContext.get_current()
        self._data_context = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        self._watching.set()
        self._watcher = threading.Thread(target=self._watch, name="ray-process-watch", daemon=True)
        self._watcher.start()

    def _record(self) -> None:
        pids = _descendants(os.getpid()) - self._before
        pids |= {p for p in _all_pids() if self.temp_dir in _cmdline(p)}
        for pid in pids:
            start = _stat(pid)
            if start is not None:
                self.started.setdefault(pid, start)

    def _watch(self) -> None:
        # Workers come and go while tests run; record each one while it is alive.
        deadline = time.monotonic() + 3600
        while self._watching.is_set() and time.monotonic() < deadline:
            self._record()
            time.sleep(1.0)

    def alive(self) -> list:
        left = [p for p, start in self.started.items() if _stat(p) == start]
        left += [p for p in _all_pids() if self.temp_dir and self.temp_dir in _cmdline(p) and p not in left]
        return sorted(set(left) - {os.getpid()})

    def stop(self, timeout: float = 60.0) -> list:
        """Shut Serve and Ray down; the Ray processes still alive `timeout` s later (killed)."""
        if self.running:
            self._record()
            self._watching.clear()
            if self._watcher is not None:
                self._watcher.join(5)
            try:
                from ray import serve

                serve.shutdown()
            except Exception:  # noqa: BLE001 - Serve never started
                pass
            ray.shutdown()
        self._watching.clear()
        deadline = time.monotonic() + timeout
        left = self.alive()
        while left and time.monotonic() < deadline:
            time.sleep(0.25)
            left = self.alive()
        described = [f"{p}: {_cmdline(p)[:200]}" for p in left]
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if self._data_context is not None:
            from ray.data import DataContext

            ctx = DataContext.get_current()
            ctx.execution_options.preserve_order, ctx.enable_progress_bars = self._data_context
            self._data_context = None
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = {}
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        return described


@pytest.fixture(scope="module")
def ray_session():
    session = RaySession()
    try:
        yield session
    finally:
        left = session.stop()
        assert not left, f"Ray processes left behind after shutdown (killed now): {left}"


@pytest.fixture
def local_ray(ray_session):
    ray_session.start()
    return ray_session


# --------------------------------------------------------------------------- Ray Data

# Short prompts and answers: the test is about rows and order, not about the model.
PROMPTS = [f"{i} plus {i % 7} is" if i % 2 else f"One word for {i}:" for i in range(200)]


@pytest.fixture(scope="module")
def reference_texts(smollm2_path):
    """The greedy texts of the 200 prompts from LLM.generate in this process."""
    with LLM(str(smollm2_path), **LLM_ARGS) as llm:
        return [c.text for c in llm.generate(PROMPTS)]


@pytest.mark.model
def test_map_batches_matches_single_process_and_keeps_bad_rows(local_ray, smollm2_path, reference_texts):
    import ray.data

    from pyllama.integrations.ray import OUTPUT_COLUMNS, LLMPredictor

    too_long = "word " * 1000        # well past a sequence's share of the context
    rows = [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS)]
    rows.insert(57, {"id": -1, "prompt": too_long})        # bad rows among good ones, in two batches
    rows.insert(151, {"id": -2, "prompt": ""})
    ds = ray.data.from_items(rows)
    out = ds.map_batches(LLMPredictor, fn_constructor_kwargs={"model_path": str(smollm2_path), **LLM_ARGS},
                         concurrency=2, num_cpus=1, batch_size=51).take_all()

    assert len(out) == len(rows)
    assert [r["id"] for r in out] == [r["id"] for r in rows], "input order is kept"
    assert set(OUTPUT_COLUMNS) | {"id", "prompt"} == set(out[0])
    good = [r for r in out if r["id"] >= 0]
    assert len(good) == len(PROMPTS) and [r["generated_text"] for r in good] == reference_texts
    assert all(r["error"] is None and r["finish_reason"] in ("length", "eog", "stop") for r in good)
    assert all(0 < r["completion_tokens"] <= MAX_TOKENS and r["prompt_tokens"] > 0 for r in good)

    long_row, empty_row = (next(r for r in out if r["id"] == k) for k in (-1, -2))
    assert long_row["error"].startswith("ContextLengthError: the prompt has 100") and "(n_ctx)" in long_row["error"]
    assert long_row["generated_text"] is None and long_row["prompt_tokens"] > 1000
    assert empty_row["error"].startswith("ValueError:") and "empty" in empty_row["error"]


@pytest.mark.model
def test_messages_column_with_per_row_schema(local_ray, smollm2_path):
    import ray.data

    from pyllama.integrations.ray import LLMPredictor

    conversations = [
        [{"role": "user", "content": "Say hello."}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
        [{"role": "user", "content": "Give a number as JSON."}],
        [{"role": "user", "content": "Bad schema row."}],
        [{"role": "user"}],                                   # no content: Arrow makes it None
    ]
    schemas = [None, None, json.dumps({"type": "object", "properties": {"n": {"type": "integer"}},
                                       "required": ["n"]}), "{not json", None]
    args = {**LLM_ARGS, "max_tokens": 16}
    with LLM(str(smollm2_path), **args) as llm:
        expected = llm.generate([llm.chat_tokens(c) for c in conversations[:2]])
        expected_json = llm.chat(conversations[2], response_format={
            "type": "json_schema", "json_schema": {"schema": json.loads(schemas[2])}}).text

    ds = ray.data.from_items([{"messages": c, "json_schema": s} for c, s in zip(conversations, schemas)])
    out = ds.map_batches(LLMPredictor, fn_constructor_kwargs={"model_path": str(smollm2_path), **args},
                         concurrency=1, num_cpus=1, batch_size=8).take_all()

    assert [r["generated_text"] for r in out[:2]] == [c.text for c in expected]
    assert [r["prompt_tokens"] for r in out[:2]] == [c.prompt_tokens for c in expected]
    assert out[2]["error"] is None and out[2]["generated_text"] == expected_json
    assert out[3]["error"].startswith("JSONDecodeError:") and out[3]["generated_text"] is None
    assert out[4]["error"].startswith("ValueError:") and "content" in out[4]["error"]


def test_missing_model_path_names_the_node(local_ray, tmp_path):
    from pyllama.integrations.ray import load_llm

    missing = str(tmp_path / "not-on-this-node.gguf")

    @ray.remote(num_cpus=0)
    def try_load(path):
        try:
            load_llm(path)
        except FileNotFoundError as exc:
            return str(exc)
        return "loaded?"

    message = ray.get(try_load.remote(missing), timeout=120)
    node_id = ray.get_runtime_context().get_node_id()
    assert f"Ray node {node_id}" in message and socket.gethostname() in message
    assert missing in message and "every node" in message


# --------------------------------------------------------------------------- Ray Serve


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.model
def test_serve_two_replicas_answer_openai(local_ray, smollm2_path):
    from ray import serve

    from pyllama.integrations.ray import REPLICA_HEADER, build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        app = build_app(str(smollm2_path), num_replicas=2, n_ctx=1024, n_parallel=2, n_threads=N_THREADS,
                        server_settings={"model_alias": "smol"})
        serve.run(app, name="pyllama", route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{port}"
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        ask = [{"role": "user", "content": "Say hello."}]

        reply = client.chat.completions.with_raw_response.create(model="smol", messages=ask, max_tokens=8,
                                                                 temperature=0)
        first = reply.headers.get(REPLICA_HEADER)
        chat = reply.parse()
        assert first and chat.choices[0].message.content and chat.model == "smol"
        assert chat.usage.completion_tokens <= 8

        pieces = []
        for event in client.chat.completions.create(model="smol", messages=ask, max_tokens=8, temperature=0,
                                                    stream=True):
            if event.choices and event.choices[0].delta.content:
                pieces.append(event.choices[0].delta.content)
        assert len(pieces) > 1, "the answer arrived as a stream of SSE chunks"
        assert "".join(pieces) == chat.choices[0].message.content

        # Concurrent requests until both replicas have answered (bounded in count and time).
        seen = {first}

        def one(i):
            r = client.chat.completions.with_raw_response.create(
                model="smol", messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=4)
            return r.headers.get(REPLICA_HEADER)

        deadline = time.monotonic() + 120
        with ThreadPoolExecutor(4) as pool:
            for _ in range(6):
                seen.update(pool.map(one, range(4)))
                if len(seen) >= 2 or time.monotonic() > deadline:
                    break
        assert len(seen - {None}) == 2, f"requests reached replicas {seen}"

        # /health and /metrics answer from each replica.
        ops = {}
        for _ in range(40):
            health = httpx.get(base + "/health", timeout=30)
            metrics = httpx.get(base + "/metrics", timeout=30)
            assert health.status_code == 200 and health.json() == {"status": "ok"}
            assert metrics.status_code == 200 and "llamacpp:" in metrics.text
            ops.setdefault(health.headers[REPLICA_HEADER], health)
            if len(ops) == 2:
                break
        assert set(ops) == seen
    finally:
        serve.shutdown()


# --------------------------------------------------------------------------- no Ray: cheap checks


def test_app_builder_parses_command_line_values(monkeypatch):
    from pyllama.integrations.ray import serve as ray_serve

    calls = []
    monkeypatch.setattr(ray_serve, "build_app", lambda model, **kw: calls.append((model, kw)))
    ray_serve.app_builder({"model": "smollm2", "num_replicas": "2", "n_threads": "1", "temperature": "0.5",
                           "stop": '["</s>"]', "flash_attn": "auto", "server_settings": {"max_queue": 4}})
    assert calls == [("smollm2", {"num_replicas": 2, "n_threads": 1, "temperature": 0.5, "stop": ["</s>"],
                                  "flash_attn": "auto", "server_settings": {"max_queue": 4}})]
    with pytest.raises(TypeError, match="model="):
        ray_serve.app_builder({"num_replicas": "2"})


def test_build_app_rejects_wrong_names_on_the_driver():
    from pyllama.integrations.ray import build_app

    with pytest.raises(TypeError, match="n_thread"):
        build_app("smollm2", n_thread=2)
    with pytest.raises(TypeError, match="max_queu"):
        build_app("smollm2", server_settings={"max_queu": 2})


def test_relative_model_path_is_made_absolute_on_the_driver(tmp_path, monkeypatch):
    from pyllama.integrations.ray.serve import _absolute_if_path

    monkeypatch.chdir(tmp_path)
    assert _absolute_if_path("models/x.gguf") == str(tmp_path / "models" / "x.gguf")
    assert _absolute_if_path("smollm2") == "smollm2"


def test_missing_path_names_this_machine(tmp_path):
    from pyllama.integrations.ray import load_llm

    # "Ray node <id> (<host>, <ip>)" when Ray is up in this process, "host <host>" otherwise.
    with pytest.raises(FileNotFoundError, match=f"not found on (Ray node \\w+ \\()?(host )?{socket.gethostname()}"):
        load_llm(str(tmp_path / "nope.gguf"))


@pytest.fixture(scope="module")
def tiny_predictor(tiny_model_path):
    from pyllama.integrations.ray import LLMPredictor

    predictor = LLMPredictor(str(tiny_model_path), n_ctx=256, n_threads=1, temperature=0.0, max_tokens=3)
    yield predictor
    predictor.llm.close()


def test_predictor_takes_every_batch_format(tiny_predictor):
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    prompts = ["alpha beta", None, "gamma"]
    as_numpy = tiny_predictor({"prompt": np.array(prompts, dtype=object), "k": np.arange(3)})
    as_pandas = tiny_predictor(pd.DataFrame({"prompt": prompts, "k": range(3)}))
    as_arrow = tiny_predictor(pa.table({"prompt": prompts, "k": list(range(3))}))
    assert isinstance(as_pandas, pd.DataFrame) and isinstance(as_arrow, pa.Table)
    assert list(as_numpy["k"]) == list(as_pandas["k"]) == as_arrow.column("k").to_pylist() == [0, 1, 2]
    for column in ("generated_text", "finish_reason", "prompt_tokens", "completion_tokens", "error"):
        values = list(as_numpy[column])
        assert values == [None if v != v else v for v in as_pandas[column]] == as_arrow.column(column).to_pylist()
    assert as_numpy["error"][0] is None and as_numpy["error"][1].startswith("ValueError: the row has no prompt")
    assert as_numpy["completion_tokens"].dtype == np.int64 and as_numpy["completion_tokens"][0] == 3


def test_predictor_isolates_a_row_that_generate_rejects(tiny_predictor, monkeypatch):
    import numpy as np

    llm = tiny_predictor.llm
    real_generate = llm.generate
    bad = llm.tokenize("poison")

    def generate(prompts, **kwargs):   # a check the predictor does not know about
        if any(list(p) == bad for p in prompts):
            raise ValueError("this row is poison")
        return real_generate(prompts, **kwargs)

    monkeypatch.setattr(llm, "generate", generate)
    out = tiny_predictor({"prompt": np.array(["one", "poison", "two"], dtype=object)})
    assert list(out["error"]) == [None, "ValueError: this row is poison", None]
    assert out["generated_text"][0] is not None and out["generated_text"][2] is not None
    assert out["prompt_tokens"][1] == len(bad)


def test_import_is_lazy_and_names_the_extra(run_python):
    lazy = run_python("import sys, pyllama.integrations.ray as r\n"
                      "assert 'ray' not in sys.modules, 'ray imported eagerly'\n"
                      "assert 'ray.serve' not in sys.modules\n"
                      "print('ok')\n")
    assert lazy.returncode == 0 and "ok" in lazy.stdout, lazy.stderr
    blocked = run_python("import sys\nsys.modules['ray'] = None\n"
                         "try:\n    import pyllama.integrations.ray\nexcept ImportError as e:\n    print(e)\n")
    assert 'pip install "pyllama[ray]"' in blocked.stdout, blocked.stderr


# --------------------------------------------------------------------------- shutdown (keep last)


def test_shutdown_leaves_no_ray_processes(local_ray):
    # Whatever ran before, a fresh worker exists now (a task), so there is something to clean up.
    @ray.remote(num_cpus=0)
    def pid():
        return os.getpid()

    worker = ray.get(pid.remote(), timeout=120)
    local_ray._record()
    assert worker in local_ray.started
    assert any("raylet" in _cmdline(p) for p in local_ray.started)
    assert any("gcs_server" in _cmdline(p) for p in local_ray.started)
    left = local_ray.stop()
    assert not left, f"Ray processes left behind after ray.shutdown(): {left}"
    assert not ray.is_initialized()
    assert not Path(local_ray.temp_dir).exists()
