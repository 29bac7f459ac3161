"""Slot files: LLM.save_slot / LLM.restore_slot (Engine.save_slot / restore_slot), the prompt
cache of one sequence slot written to a file in llama-server's slot-file format and loaded back
into any idle slot, where the next prompt that starts with its tokens reuses it.

Bad files (missing, damaged, another model's, tokens outside the vocabulary) raise and leave
the slot empty; a busy slot, a slot that does not exist, an empty slot raise.  A file from a
model of other dimensions is loaded in a subprocess (llama.cpp reads it)."""

from __future__ import annotations

import json
import struct

import pytest

from conftest import run_python_subprocess
from pyllama import LLM

PROMPT = "Once upon a time there was a little robot who"
#: llama_state_seq_save_file's header: magic, version, token count (then the tokens).
STATE_HEADER = 12


@pytest.fixture()
def llm(tiny_model_path):
    with LLM(str(tiny_model_path), n_ctx=512, n_parallel=2, temperature=0, verbose=False) as m:
        yield m


def _busy_slot(llm: LLM) -> int:
    return next(s["id"] for s in llm.slots() if s["n_cached"] > 0)


def _file_tokens(path) -> list:
    data = open(path, "rb").read()
    (n,) = struct.unpack_from("=I", data, STATE_HEADER - 4)
    return list(struct.unpack_from(f"={n}i", data, STATE_HEADER))


def test_save_and_restore_into_another_slot(llm, tmp_path):
    first = llm.complete(PROMPT, max_tokens=8)
    src = _busy_slot(llm)
    held = llm.slots()[src]["n_cached"]
    path = tmp_path / "slot.bin"
    assert llm.save_slot(src, path) == held

    # llama-server's packed token list: LLAMA_TOKEN_NULL, version 1, n, the tokens, no media
    packed = _file_tokens(path)
    assert packed[:3] == [-1, 1, held] and packed[-1] == 0 and len(packed) == held + 4
    assert packed[3:3 + len(llm.tokenize(PROMPT))] == llm.tokenize(PROMPT)

    llm.context.kv_clear()
    llm._engine.reset()
    assert all(s["n_cached"] == 0 for s in llm.slots())
    dst = 1 - src
    assert llm.restore_slot(dst, path) == held
    assert [s["n_cached"] for s in llm.slots()] == [held if s == dst else 0 for s in range(2)]

    again = llm.complete(PROMPT, max_tokens=8)
    assert again.text == first.text
    # the prompt came from the restored cells: only its last token was evaluated again
    assert again.timings.prompt_n <= 1, again.timings


def test_plain_token_list_restores(llm, tmp_path):
    """Files of older llama-server versions hold a plain token list."""
    llm.complete(PROMPT, max_tokens=4)
    src = _busy_slot(llm)
    path = tmp_path / "slot.bin"
    n = llm.save_slot(src, path)
    data = bytearray(path.read_bytes())
    (count,) = struct.unpack_from("=I", data, STATE_HEADER - 4)
    end = STATE_HEADER + 4 * count
    plain = data[:STATE_HEADER] + data[STATE_HEADER + 12:STATE_HEADER + 12 + 4 * n] + data[end:]
    struct.pack_into("=I", plain, STATE_HEADER - 4, n)
    path.write_bytes(bytes(plain))
    llm._engine.reset()
    assert llm.restore_slot(0, path) == n
    assert llm.slots()[0]["n_cached"] == n


def test_bad_slots(llm, tmp_path):
    with pytest.raises(ValueError, match="holds no tokens"):
        llm.save_slot(0, tmp_path / "empty.bin")
    for bad in (-1, 2, 99):
        with pytest.raises(ValueError, match="slot must be in 0..1"):
            llm.save_slot(bad, tmp_path / "x.bin")
        with pytest.raises(ValueError, match="slot must be in 0..1"):
            llm.restore_slot(bad, tmp_path / "x.bin")
    assert not (tmp_path / "x.bin").exists() and not (tmp_path / "empty.bin").exists()

    # a slot in use: a stream left open holds it
    stream = llm.stream(PROMPT, max_tokens=50, ignore_eos=True)
    next(iter(stream))
    busy = next(s["id"] for s in llm.slots() if s["busy"])
    with pytest.raises(ValueError, match="busy"):
        llm.save_slot(busy, tmp_path / "busy.bin")
    with pytest.raises(ValueError, match="busy"):
        llm.restore_slot(busy, tmp_path / "busy.bin")
    stream.close()
    assert llm.complete(PROMPT, max_tokens=4).text


def test_bad_files_leave_the_slot_empty(llm, tmp_path):
    reference = llm.complete(PROMPT, max_tokens=6).text
    src = _busy_slot(llm)
    good = tmp_path / "good.bin"
    llm.save_slot(src, good)

    with pytest.raises(FileNotFoundError):
        llm.restore_slot(src, tmp_path / "missing.bin")
    assert llm.slots()[src]["n_cached"] == 0       # what it held was dropped first

    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00\x01" * 1000)
    with pytest.raises(ValueError):
        llm.restore_slot(src, garbage)
    assert llm.slots()[src]["n_cached"] == 0

    # a token outside the vocabulary in an otherwise valid file
    data = bytearray(good.read_bytes())
    struct.pack_into("=i", data, STATE_HEADER + 12, 10_000_000)
    bad_token = tmp_path / "bad_token.bin"
    bad_token.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="invalid token 10000000"):
        llm.restore_slot(src, bad_token)
    assert llm.slots()[src]["n_cached"] == 0

    # an unknown packed-format version
    data = bytearray(good.read_bytes())
    struct.pack_into("=i", data, STATE_HEADER + 4, 7)
    (tmp_path / "v7.bin").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="version-1"):
        llm.restore_slot(src, tmp_path / "v7.bin")

    # the model still works, and agrees with itself
    assert llm.complete(PROMPT, max_tokens=6).text == reference


CHILD = r"""
import json, os, sys
from pyllama import LLM
out = {}
with LLM(os.environ["A"], n_ctx=256, n_parallel=2, temperature=0, verbose=False) as a:
    a.complete("Once upon a time", max_tokens=4)
    s = next(x["id"] for x in a.slots() if x["n_cached"] > 0)
    a.save_slot(s, os.environ["F"])
with LLM(os.environ["B"], n_ctx=256, n_parallel=2, temperature=0, verbose=False) as b:
    before = b.complete("Once upon a time", max_tokens=6).text
    b._engine.reset()
    try:
        b.restore_slot(0, os.environ["F"])
        out["error"] = None
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
    out["n_cached"] = b.slots()[0]["n_cached"]
    out["same"] = b.complete("Once upon a time", max_tokens=6).text == before
print(json.dumps(out))
"""


def test_another_models_file_is_refused(tiny_model_factory, tmp_path):
    a = tiny_model_factory()
    b = tiny_model_factory(n_layer=3)   # other KV dimensions (one more layer)
    res = run_python_subprocess(CHILD, timeout=120, env={"A": str(a), "B": str(b), "F": str(tmp_path / "a.bin")})
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["error"] and out["error"].startswith("ValueError"), out
    assert out["n_cached"] == 0 and out["same"], out
