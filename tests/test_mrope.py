"""Vision models that place images with M-RoPE (the Qwen2-VL family) in the batched engine
(issue 28), on tests/tiny_qwen2vl.py's tiny random-weight pair: a "qwen2vl" text model and a
"qwen2vl_merger" projector.

On these models an image of nx x ny tokens shares one first position and advances the
sequence's position by max(nx, ny), not by its token count, so after an image the positions run
behind the token count the engine keeps (its prompt cache, truncation, preemption, forks).  What
is checked:

- mtmd's layout as MediaPrompt reports it (`pos_spans`, `n_positions`);
- the positions and the greedy text equal llama.cpp's own path (`mtmd_helper_eval_chunks`, in
  tests/native/mtmd_reference.cpp), through both `Multimodal.eval` and the engine;
- the engine's paths that cut or copy a sequence -- the prompt cache, a batch beside other
  requests, n > 1, preemption -- give the same text as a request evaluated alone;
- the server answers an image chat with such a model.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from pyllama import LLM, _core
from test_mtmd import image_chat, png_bytes

pytestmark = pytest.mark.skipif(not _core.mtmd_available(), reason="built with -DPYLLAMA_MTMD=OFF")

WIDE = (64, 32)      # an image of 4 x 2 tokens: 8 tokens, 4 positions


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from tiny_qwen2vl import make_tiny_qwen2vl, make_tiny_qwen2vl_mmproj

    d = tmp_path_factory.mktemp("mrope")
    return make_tiny_qwen2vl(d / "qwen2vl.gguf"), make_tiny_qwen2vl_mmproj(d / "qwen2vl-mmproj.gguf")


def load(pair, **kwargs):
    text, proj = pair
    options = dict(n_ctx=1024, n_parallel=4, kv_unified=False, n_threads=1, chat_template="chatml",
                   temperature=0.0, max_tokens=8)
    options.update(kwargs)
    return LLM(str(text), mmproj_path=str(proj), **options)


@pytest.fixture(scope="module")
def llm(pair):
    with load(pair) as model:
        yield model


def wide_image(i: int = 0) -> bytes:
    return png_bytes(*WIDE, rgb=(200 - 40 * i, 10 + 40 * i, 60))


def test_an_image_takes_fewer_positions_than_tokens(llm):
    from tiny_qwen2vl import expected_grid

    prompt = llm.chat_prompt(image_chat(wide_image()))
    nx, ny = expected_grid(*WIDE)
    (start, n_tokens, n_pos, last_t), = prompt.pos_spans
    assert (n_tokens, n_pos, last_t) == (nx * ny, max(nx, ny), 0) and n_pos < n_tokens
    assert prompt.spans == [(start, n_tokens, 1)]
    assert prompt.n_media_tokens == n_tokens
    assert prompt.n_positions == len(prompt) - (n_tokens - n_pos)


def test_positions_and_text_equal_mtmds_own_helper(pair, llm, tmp_path):
    """llama.cpp's reference: mtmd_helper_eval_chunks evaluates the prompt, then greedy decoding
    from the position it returns.  Our Multimodal.eval must end at the same position with the
    same logits, and the engine must write the same positions and produce the same tokens."""
    import native_tools

    exe = native_tools.build_mtmd_reference()
    text, proj = pair
    image = tmp_path / "wide.png"
    image.write_bytes(wide_image())
    marker = _core.media_marker()
    prompt_text = f"hello {marker} describe the picture"
    n_predict = 12
    run = subprocess.run([str(exe), str(text), str(proj), str(image), prompt_text, str(n_predict)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    ref = json.loads(run.stdout.strip().splitlines()[-1])
    assert [c["n_pos"] < c["n_tokens"] for c in ref["chunks"] if c["type"] == "image"] == [True]

    mm = llm.multimodal
    prompt = mm.tokenize(prompt_text, [mm.load(image.read_bytes())])
    assert prompt.n_positions == ref["n_past_after_prompt"]
    assert [c["n_tokens"] for c in prompt.chunks_info()] == [c["n_tokens"] for c in ref["chunks"]]

    # The low-level path, into a context of its own.
    ctx = _core.Context(llm._model, n_ctx=512, n_batch=512, n_ubatch=512, n_threads=1)
    try:
        assert mm.eval(ctx, prompt, seq_id=0, n_past=0) == ref["n_past_after_prompt"]
        assert ctx.kv_seq_pos_max(0) == ref["seq_pos_max"]
        np.testing.assert_allclose(np.asarray(ctx.logits(-1))[:8], ref["first_logits"], rtol=1e-4, atol=1e-4)
    finally:
        ctx.close()

    # The engine: same tokens; its sequence holds the prompt and all but the last token, at
    # the positions the reference used.
    out = llm.complete(prompt, max_tokens=n_predict, temperature=0.0)
    assert out.tokens == ref["tokens"]
    slot = next(s for s in llm._engine.slot_info() if s["n_cached"] == len(prompt) + n_predict - 1)
    assert llm._ctx.kv_seq_pos_max(slot["id"]) == ref["n_past_after_prompt"] + n_predict - 2


def test_a_batch_of_image_chats_equals_one_at_a_time(llm):
    chats = [image_chat(wide_image(i), f"question {i}") for i in range(4)]
    chats.append(image_chat(png_bytes(32, 64, (9, 9, 200)), "a tall one"))      # 2 x 4 tokens
    chats.append([{"role": "user", "content": "a chat without an image"}])
    one_by_one = [llm.chat(c, max_tokens=10).text for c in chats]
    batched = llm.generate(chats, max_tokens=10)
    assert [c.text for c in batched] == one_by_one


def test_images_change_the_logits(llm):
    mm = llm.multimodal
    rows = []
    for i in range(2):
        p = mm.tokenize(f"look {mm.marker} here", [mm.load(wide_image(i))])
        out = llm.complete(p, max_tokens=1, logprobs=True, top_logprobs=5)
        rows.append([(e.id, round(e.logprob, 4)) for e in out.logprobs[0].top_logprobs])
    assert rows[0] != rows[1]


def test_prompt_cache_reuses_an_image_prefix_and_changes_nothing(pair, llm):
    """The second chat shares the first's image and some text after it: the slot keeps them
    (cut after the image, at a position that is not the token count) and evaluates the rest."""
    image = wide_image(3)
    first = llm.chat(image_chat(image, "what colour is it"), max_tokens=4)
    second = llm.chat(image_chat(image, "what shape is it"), max_tokens=10)
    prompt = llm.chat_prompt(image_chat(image, "what shape is it"))
    (start, n_tokens, _, _), = prompt.pos_spans
    assert second.usage["prompt_tokens_details"]["cached_tokens"] >= start + n_tokens
    assert len(first.tokens) == 4
    with load(pair, n_parallel=1, cache_prompt=False) as fresh:
        assert fresh.chat(image_chat(image, "what shape is it"), max_tokens=10).text == second.text


def test_n_greater_than_one_shares_the_image(llm):
    one = llm.chat(image_chat(wide_image(1)), max_tokens=6)
    many = llm.chat(image_chat(wide_image(1)), max_tokens=6, n=3)
    assert [c.text for c in many] == [one.text] * 3


def test_preempted_image_request_resumes_with_the_same_output(pair):
    """A paused stream's cells are taken by another request; it resumes by re-evaluating its
    prompt, image included, at the positions it had.  (Kept short: on this deliberately
    sensitive model, batches of another shape change late tokens by float rounding alone.)"""
    question = "describe every part of this picture in great detail, " * 8
    with load(pair, n_ctx=128, n_parallel=2, kv_unified=True) as small:
        chat = image_chat(wide_image(2), question)
        alone = small.chat(chat, max_tokens=40).text
        small.reset()
        s1 = small.chat(chat, max_tokens=40, stream=True)
        first = next(iter(s1))             # started, then left paused
        other = small.chat(image_chat(wide_image(0), question), max_tokens=40)
        assert small._engine.n_preemptions >= 1
        assert first + "".join(s1) == alone
        assert len(other.tokens) == 40


def test_server_answers_an_image_chat(pair, llm):
    openai = pytest.importorskip("openai")
    import base64

    from server_process import ServerProcess

    text, proj = pair
    url = "data:image/png;base64," + base64.b64encode(wide_image()).decode()
    want = llm.chat(image_chat(url), max_tokens=8)
    server = ServerProcess("-m", str(text), "--mmproj", str(proj), "-np", "2", "-c", "1024", "-t", "1",
                           "--chat-template", "chatml")
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        got = client.chat.completions.create(model="x", messages=image_chat(url), max_tokens=8, temperature=0)
        assert got.choices[0].message.content == want.text
        assert got.usage.prompt_tokens == want.prompt_tokens
    finally:
        assert server.stop() == 0
