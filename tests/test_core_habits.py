"""Issue 19, "Cython: the anchors' habits": thread defaults under CPU limits, grammar errors
without touching file descriptor 2, views collected in reference cycles, one error helper."""

from __future__ import annotations

import gc
import os
import threading

import pytest

from pyllama import _core, _cpu
from pyllama import _gbnf_check
from pyllama.errors import GrammarError


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    model = _core.Model(tiny_model_path)
    yield model
    model.close()


# --------------------------------------------------------------------------- default threads (pyllama._cpu: pure Python)


def _fake_cgroup(tmp_path, files: dict, membership: str = "0::/\n"):
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    root.mkdir(exist_ok=True)
    self_cgroup = tmp_path / "self_cgroup"
    self_cgroup.write_text(membership)
    return root, self_cgroup


@pytest.mark.parametrize("cpu_max,expected", [
    ("200000 100000\n", 2),
    ("150000 100000\n", 2),     # 1.5 CPUs: round up, never down to a single thread
    ("50000 100000\n", 1),
    ("max 100000\n", None),
])
def test_cgroup_v2_quota(tmp_path, cpu_max, expected):
    root, me = _fake_cgroup(tmp_path, {"cpu.max": cpu_max})
    assert _cpu.cgroup_cpu_limit(root, me) == expected


def test_cgroup_v2_quota_on_a_parent_applies(tmp_path):
    root, me = _fake_cgroup(tmp_path, {"cpu.max": "max 100000\n", "pod/cpu.max": "300000 100000\n",
                                       "pod/app/cpu.max": "max 100000\n"}, "0::/pod/app\n")
    assert _cpu.cgroup_cpu_limit(root, me) == 3


@pytest.mark.parametrize("mount", ["cpu", "cpu,cpuacct"])
def test_cgroup_v1_quota(tmp_path, mount):
    root, me = _fake_cgroup(tmp_path, {f"{mount}/cpu.cfs_quota_us": "250000\n",
                                       f"{mount}/cpu.cfs_period_us": "100000\n"},
                            "4:memory:/\n3:cpu,cpuacct:/\n")
    assert _cpu.cgroup_cpu_limit(root, me) == 3
    (root / mount / "cpu.cfs_quota_us").write_text("-1\n")
    assert _cpu.cgroup_cpu_limit(root, me) is None


def test_no_cgroup_files_means_no_limit(tmp_path):
    root, me = _fake_cgroup(tmp_path, {})
    assert _cpu.cgroup_cpu_limit(root, me) is None


def test_default_threads_respects_quota_and_affinity(tmp_path, monkeypatch):
    """A container on a 64-core host allowed 2 CPUs must not start 64 threads."""
    monkeypatch.setattr(_cpu, "physical_cores", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    limited, me = _fake_cgroup(tmp_path, {"cpu.max": "200000 100000\n"})
    assert _cpu.default_threads(limited, me) == 2
    unlimited, me2 = _fake_cgroup(tmp_path / "u", {"cpu.max": "max 100000\n"})
    assert _cpu.default_threads(unlimited, me2) == 64
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5}, raising=False)   # taskset -c 5
    assert _cpu.default_threads(unlimited, me2) == 1


def test_default_threads_reads_the_module_level_cgroup_root(tmp_path, monkeypatch):
    monkeypatch.setattr(_cpu, "physical_cores", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    root, me = _fake_cgroup(tmp_path, {"cpu.max": "100000 100000\n"})
    monkeypatch.setattr(_cpu, "CGROUP_ROOT", str(root))
    monkeypatch.setattr(_cpu, "SELF_CGROUP", str(me))
    assert _cpu.default_threads() == 1


# --------------------------------------------------------------------------- grammar errors


@pytest.fixture(scope="module")
def vocab(tiny):
    return tiny.vocab


def test_grammar_errors_leave_fd2_alone(vocab, capfd):
    """Another thread's writes to file descriptor 2 must not vanish while grammars fail
    (they did while fd 2 was redirected to capture llama.cpp's parser messages)."""
    stop = threading.Event()
    written = []

    def writer():
        i = 0
        while not stop.is_set():
            os.write(2, f"writer line {i}\n".encode())
            written.append(i)
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        for i in range(200):
            with pytest.raises(GrammarError):
                _core.validate_grammar(vocab, f'root ::= ("a{i}"')
    finally:
        stop.set()
        t.join()
    err = capfd.readouterr().err
    lines = set(err.splitlines())
    missing = [i for i in written if f"writer line {i}" not in lines]
    assert written and not missing, f"{len(missing)} of {len(written)} stderr lines vanished"


@pytest.mark.parametrize("text,root,words", [
    ('root ::= ("a"', "root", "line 1, column 14: expecting ')'"),
    ('root ::= "a"\nx := b', "root", "line 2, column 3: expecting ::="),
    ("root ::= [a", "root", "unclosed character class"),
    ('root ::= "\\q"', "root", "unknown escape"),
    ("root ::= x\nx ::= y | z", "root", "undefined rule 'y', 'z'"),
    ('x ::= "a"', "root", "no rule named 'root'"),
    ('root ::= "a"', "start", "no rule named 'start'"),
])
def test_grammar_error_messages_say_what_and_where(vocab, capfd, text, root, words):
    with pytest.raises(GrammarError, match="invalid grammar") as info:
        _core.validate_grammar(vocab, text, root=root)
    assert words in str(info.value)
    assert "error parsing grammar" not in capfd.readouterr().err   # llama.cpp never saw it


def test_grammar_refused_by_llama_cpp_is_a_grammar_error(vocab, monkeypatch):
    """Should the pre-check let through a grammar llama.cpp refuses, the error is still a
    GrammarError, with what llama.cpp logged."""
    monkeypatch.setattr(_gbnf_check, "check_before_llama", lambda *a, **k: None)
    with pytest.raises(GrammarError, match="invalid grammar: llama.cpp refused it: .*parse"):
        _core.validate_grammar(vocab, 'root ::= ("a"')


def test_check_before_llama_caches_passes():
    _gbnf_check.precheck_cache_clear()
    _gbnf_check.check_before_llama('root ::= "a"')
    with pytest.raises(GrammarError, match="no rule named 'start'"):
        _gbnf_check.check_before_llama('root ::= "a"', "start")


# --------------------------------------------------------------------------- ownership


def _decode_one(ctx, pos):
    batch = _core.Batch(1)
    batch.add(1, pos, 0, True)
    ctx.decode(batch)


def test_view_in_reference_cycle_releases_its_context(tiny):
    """A logits view collected as part of a reference cycle must still release its Context
    (without no_gc_clear, gc cleared the view's owner first and decode() refused forever)."""
    with _core.Context(tiny, n_ctx=64, n_threads=1) as ctx:
        for pos in range(8):
            _decode_one(ctx, pos)
            arr = ctx.logits(0, copy=False)
            view = arr.base.obj if isinstance(arr.base, memoryview) else arr.base
            assert type(view).__name__ == "_FloatView"
            del arr
            cycle = [view]
            cycle.append(cycle)
            del view, cycle
            gc.collect()
        _decode_one(ctx, 8)   # BufferError if a collected view never released the context


# --------------------------------------------------------------------------- Batch.add_sequences


def test_add_sequences_fills_like_per_token_adds(tiny):
    seqs = [[1, 100, 200, 300], [1, 50], [1, 7, 8], [1]]
    with _core.Context(tiny, n_ctx=64, n_threads=1, embeddings=True, pooling="mean", n_seq_max=4) as ctx:
        def pooled(batch):
            ctx.kv_clear()
            ctx.decode(batch)
            return [ctx.embeddings_seq(s) for s in range(len(seqs))]

        by_token = _core.Batch(16, 4)
        for s, toks in enumerate(seqs):
            for p, t in enumerate(toks):
                by_token.add(t, p, s, True)
        at_once = _core.Batch(16, 4)
        assert at_once.add_sequences(seqs, logits_all=True) == 9
        assert at_once.tokens() == by_token.tokens()
        for a, b in zip(pooled(by_token), pooled(at_once)):
            assert (a == b).all()


def test_add_sequences_logits_on_last_and_seq_ids(tiny):
    with _core.Context(tiny, n_ctx=64, n_threads=1, n_seq_max=2) as ctx:
        b = _core.Batch(8, 2)
        assert b.add_sequences([[1, 5], [1, 6, 7]], seq_ids=[1, 0], pos0=0) == 4
        ctx.decode(b)
        ctx.logits(1)
        ctx.logits(4)
        with pytest.raises(IndexError):
            ctx.logits(0)


def test_add_sequences_is_all_or_nothing():
    from pyllama.errors import BatchCapacityError, InvalidSequenceError

    b = _core.Batch(4, 2)
    b.add(1, 0, 0)
    with pytest.raises(BatchCapacityError):
        b.add_sequences([[1, 2], [3, 4]])
    with pytest.raises(InvalidSequenceError):
        b.add_sequences([[1]], seq_ids=[2])
    with pytest.raises(ValueError, match="2 sequences but 1"):
        b.add_sequences([[1], [2]], seq_ids=[0])
    with pytest.raises(TypeError):
        b.add_sequences([[1, "x"]])
    assert b.n_tokens == 1
    assert b.add_sequences([]) == -1 and b.n_tokens == 1


def test_llm_embed_fills_batches_in_one_call(tiny_model_path, monkeypatch):
    """LLM.embed hands whole token lists to the batch (no Python loop of Batch.add), and its
    results are those of the per-token loop it replaces."""
    import numpy as np
    from pyllama import LLM

    llm = LLM(str(tiny_model_path), embedding=True, n_ctx=128, n_threads=1)
    texts = ["The cat sat on the mat.", "A dog barked.", "x", "The cat sat on the mat."]
    got = llm.embed(texts, normalize=False)

    class NoPerTokenAdd(_core.Batch):
        def add(self, *args, **kwargs):
            raise AssertionError("LLM.embed filled a batch one token at a time")

    monkeypatch.setattr(_core, "Batch", NoPerTokenAdd)
    assert np.array_equal(llm.embed(texts, normalize=False), got)
    monkeypatch.undo()

    ctx = llm._embed_ctx
    toks = [llm._prompt_tokens(t) for t in texts]
    batch = _core.Batch(llm._ctx_params["n_batch"], ctx.n_seq_max)
    for s, t in enumerate(toks):
        for p, tok in enumerate(t):
            batch.add(tok, p, s, True)
    ctx.kv_clear()
    ctx.decode(batch)
    for s in range(len(texts)):
        assert np.array_equal(ctx.embeddings_seq(s), got[s])
