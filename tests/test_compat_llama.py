"""pyllama.compat.Llama: llama-cpp-python 0.3's ``Llama`` on pyllama's engine.

Most tests share one SmolLM2 ``Llama`` (module scope); shapes are checked against the dicts
llama-cpp-python 0.3.36 returns (llama_cpp/llama.py, llama_chat_format.py).
"""

from __future__ import annotations

import json
import pickle
import textwrap
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from pyllama.compat import (
    DIFFERENCES,
    LLAMA_SPLIT_MODE_NONE,
    CHandleError,
    Llama,
    LlamaDiskCache,
    LlamaRAMCache,
    LlamaState,
    LogitsProcessorList,
    StoppingCriteriaList,
)

PROMPT = "The capital of France is"
# One thread each: on a shared, busy machine llama.cpp's spinning worker threads make
# multi-threaded decoding many times slower.
ONE_THREAD = {"n_threads": 1, "n_threads_batch": 1}


@pytest.fixture(scope="module")
def llm(smollm2_path: Path) -> Llama:
    model = Llama(model_path=str(smollm2_path), n_ctx=512, verbose=False, seed=1234, **ONE_THREAD)
    yield model
    model.close()


@pytest.fixture(scope="module")
def embedder(smollm2_path: Path) -> Llama:
    model = Llama(model_path=str(smollm2_path), n_ctx=256, embedding=True, verbose=False, n_parallel=1, **ONE_THREAD)
    yield model
    model.close()


def greedy(llm: Llama, prompt: str = PROMPT, **kw) -> dict:
    return llm(prompt, temperature=0, **kw)


# ---- constructor ----------------------------------------------------------------------------

def test_constructor_maps_llama_cpp_parameters(tiny_model_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = Llama(model_path=str(tiny_model_path), n_ctx=128, n_batch=64, n_ubatch=1024, split_mode=LLAMA_SPLIT_MODE_NONE,
                  type_k=0, type_v=0, n_threads=1, yarn_ext_factor=0.5, made_up_flag=3, n_parallel=3, verbose=False)
    try:
        messages = [str(w.message) for w in caught]
        assert any("yarn_ext_factor" in t for t in messages), messages          # ignored, said so
        assert any("made_up_flag" in t for t in messages), messages             # unknown, said so
        assert m.n_ctx() == 128 and m.context_params.n_ctx == 128
        assert m.n_batch == 64 and m.context_params.n_ubatch == 64                # min(n_batch, n_ubatch)
        assert m.context_params.n_threads == 1
        assert m.n_parallel == 3 and m.llm.n_parallel == 3
        assert m.llm.n_ctx >= 128 * 3                                            # n_ctx per call, times the slots
        # one KV stream of n_ctx cells per slot (llama-server's -np N; the attention of a call
        # spans its own cells, not every slot's)
        assert m.llm.context.kv_unified is False and m.llm.context.n_ctx_seq >= 128   # (padded to 256)
        assert m.llm.context.n_threads == 1
        assert m.llm._ctx_params["type_k"] == "f32" and m.llm._ctx_params["type_v"] == "f32"
        assert m.model_params.split_mode == LLAMA_SPLIT_MODE_NONE
        assert m.n_vocab() == m.llm.vocab.n_tokens and m.n_embd() == 64
        assert m.token_bos() == m.llm.vocab.bos and m.token_eos() == m.llm.vocab.eos
        assert isinstance(m.metadata, dict) and m.metadata["general.architecture"] == "llama"
        assert m.model_path == str(tiny_model_path)
    finally:
        m.close()
    m = Llama(model_path=str(tiny_model_path), n_ctx=64, n_parallel=2, kv_unified=True, verbose=False, **ONE_THREAD)
    try:
        assert m.llm.context.kv_unified is True                                  # pyllama's keyword, passed on
    finally:
        m.close()
    m = Llama(model_path=str(tiny_model_path), n_ctx=0, verbose=False, **ONE_THREAD)   # 0: the model's own
    try:
        n_train = int(m.metadata["llama.context_length"])
        assert m.n_ctx() == n_train and m.n_parallel == max(1, min(8, 16384 // n_train))
    finally:
        m.close()
    with pytest.raises(ValueError, match="Model path does not exist"):
        Llama(model_path=str(tiny_model_path) + ".missing", verbose=False)
    with pytest.raises(ValueError, match="type_k"):
        Llama(model_path=str(tiny_model_path), type_k=12345, verbose=False)


def test_default_parallelism_and_chat_format(llm: Llama) -> None:
    assert llm.n_parallel == 8                       # min(8, 16384 // 512)
    assert llm.chat_format == "chat_template.default"   # SmolLM2's GGUF has a template
    assert "n_ctx" in DIFFERENCES and "save_state / load_state" in DIFFERENCES


def test_raw_c_handles_raise_a_clear_error(llm: Llama) -> None:
    for name in ("ctx", "_model", "batch"):
        assert not hasattr(llm, name)
        with pytest.raises(CHandleError, match="no ctypes handles") as err:
            getattr(llm, name)
        assert isinstance(err.value, NotImplementedError) and isinstance(err.value, AttributeError)
        assert "docs/compat.md" in str(err.value)
    # _ctx: llama-cpp-python's wrapper; its .ctx exists (opaque), its ctypes methods do not.
    assert llm._ctx.ctx is not None
    with pytest.raises(CHandleError, match="no ctypes"):
        llm._ctx.kv_cache_clear()
    from pyllama.compat import _internals

    with pytest.raises(CHandleError, match="ctypes"):
        _internals.LlamaModel(path_model="x.gguf", params=None)


def test_model_handle_works_with_the_low_level_functions(llm: Llama) -> None:
    import ctypes

    from pyllama.compat import _lowlevel as ll

    vocab = ll.llama_model_get_vocab(llm.model)      # as outlines reads a vocabulary
    buf = (ctypes.c_char * 32)()
    n = ll.llama_token_to_piece(vocab, llm.tokenize(b" Paris", add_bos=False)[0], buf, 32, 0, True)
    assert bytes(buf[:n]) == b" Paris"
    assert ll.llama_vocab_n_tokens(vocab) == llm.n_vocab()
    assert llm.tokenizer_ is not None and llm.tokenizer().decode(llm.tokenize(b"Hi there")) == "Hi there"


# ---- completions ------------------------------------------------------------------------------

def test_completion_dict_shape(llm: Llama) -> None:
    out = greedy(llm, max_tokens=6)
    assert set(out) == {"id", "object", "created", "model", "choices", "usage"}
    assert out["id"].startswith("cmpl-") and out["object"] == "text_completion"
    assert isinstance(out["created"], int) and out["model"] == llm.model_path
    (choice,) = out["choices"]
    assert set(choice) == {"text", "index", "logprobs", "finish_reason"}
    assert choice["index"] == 0 and choice["logprobs"] is None and choice["finish_reason"] == "length"
    assert "Paris" in choice["text"]
    usage = out["usage"]
    assert usage["completion_tokens"] == 6
    assert usage["prompt_tokens"] == len(llm.tokenize(PROMPT.encode()))
    assert usage["total_tokens"] == usage["prompt_tokens"] + 6
    assert llm(PROMPT, max_tokens=6, temperature=0, model="alias")["model"] == "alias"
    # token prompts work too, and tokens count the same
    toks = llm.tokenize(PROMPT.encode())
    assert llm.create_completion(toks, max_tokens=6, temperature=0)["choices"][0]["text"] == choice["text"]


def test_stream_yields_llama_cpp_chunks(llm: Llama) -> None:
    whole = greedy(llm, max_tokens=10)["choices"][0]["text"]
    chunks = list(llm(PROMPT, max_tokens=10, temperature=0, stream=True))
    assert len(chunks) >= 3
    for c in chunks:
        assert set(c) == {"id", "object", "created", "model", "choices"} and c["object"] == "text_completion"
        assert c["id"] == chunks[0]["id"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0] == {"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole


def test_echo_puts_the_prompt_first(llm: Llama) -> None:
    plain = greedy(llm, max_tokens=4)["choices"][0]["text"]
    echoed = greedy(llm, max_tokens=4, echo=True)["choices"][0]["text"]
    assert echoed == PROMPT + plain


def test_integer_logprobs(llm: Llama) -> None:
    out = greedy(llm, max_tokens=5, logprobs=3)
    lp = out["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "text_offset", "token_logprobs", "top_logprobs"}
    assert len(lp["tokens"]) == 5 and "".join(lp["tokens"]) == out["choices"][0]["text"]
    assert len(lp["text_offset"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    assert lp["text_offset"][0] == len(PROMPT)
    assert all(b - a == len(t) for a, b, t in zip(lp["text_offset"], lp["text_offset"][1:], lp["tokens"]))
    for tok, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert value <= 0 and 1 <= len(top) <= 4 and top[tok] == value
        assert max(top.values()) == pytest.approx(value)   # greedy: the chosen token is the likeliest
    echoed = greedy(llm, max_tokens=2, logprobs=1, echo=True)["choices"][0]["logprobs"]
    n_prompt = len(llm.tokenize(PROMPT.encode()))
    assert len(echoed["tokens"]) == n_prompt + 2 and "".join(echoed["tokens"][:n_prompt]) == PROMPT
    assert len(echoed["token_logprobs"]) == len(echoed["top_logprobs"]) == n_prompt + 2
    assert echoed["token_logprobs"][0] is None and echoed["top_logprobs"][0] is None
    assert all(v is not None and v <= 0 for v in echoed["token_logprobs"][1:])
    streamed = [c["choices"][0]["logprobs"] for c in llm(PROMPT, max_tokens=5, temperature=0, logprobs=3, stream=True)]
    tokens = [t for lp_ in streamed if lp_ for t in lp_["tokens"]]
    assert tokens == lp["tokens"]


def test_stop_strings(llm: Llama) -> None:
    free = greedy(llm, "Count: 1, 2, 3,", max_tokens=12)["choices"][0]["text"]
    assert " 5" in free
    out = greedy(llm, "Count: 1, 2, 3,", max_tokens=12, stop=[" 5", "never"])
    assert out["choices"][0]["text"] == free[: free.index(" 5")]
    assert out["choices"][0]["finish_reason"] == "stop"
    assert greedy(llm, "Count: 1, 2, 3,", max_tokens=12, stop=" 5")["choices"][0]["text"] == out["choices"][0]["text"]
    chunks = llm("Count: 1, 2, 3,", max_tokens=12, temperature=0, stop=[" 5"], stream=True)
    assert "".join(c["choices"][0]["text"] for c in chunks) == out["choices"][0]["text"]


def test_max_tokens_none_runs_to_the_context_window(tiny_model_path: Path) -> None:
    m = Llama(model_path=str(tiny_model_path), n_ctx=40, verbose=False, n_parallel=2, **ONE_THREAD)
    try:
        eog = [t for t in range(m.n_vocab()) if m.llm.vocab.is_eog(t)]

        def no_eog(ids, scores):
            scores[eog] = -np.inf
            return scores

        for max_tokens in (None, 0, -1, 1000):
            out = m("hello world", max_tokens=max_tokens, temperature=0, logits_processor=LogitsProcessorList([no_eog]))
            usage = out["usage"]
            assert usage["total_tokens"] == 40, (max_tokens, usage)
            assert out["choices"][0]["finish_reason"] == "length"
        with pytest.raises(ValueError, match="exceed context window of 40"):
            m("word " * 60)
    finally:
        m.close()


def test_seed_makes_sampling_reproducible(llm: Llama) -> None:
    a = llm(PROMPT, max_tokens=12, temperature=1.0, seed=7)["choices"][0]["text"]
    b = llm(PROMPT, max_tokens=12, temperature=1.0, seed=7)["choices"][0]["text"]
    assert a == b
    others = {llm(PROMPT, max_tokens=12, temperature=1.0, seed=s)["choices"][0]["text"] for s in (1, 2, 3)}
    assert len(others | {a}) > 1
    # llama-cpp-python's rule: without a seed, each call draws one from the previous seed.
    # (The engine's prompt cache is cleared before each run: a prompt evaluated in another batch
    # can differ in the last bits of its logits, enough to move a draw at temperature 1.)
    llm.set_seed(99)
    llm.llm.reset()
    c = llm(PROMPT, max_tokens=12, temperature=1.0)["choices"][0]["text"]
    llm.set_seed(99)
    llm.llm.reset()
    d = llm(PROMPT, max_tokens=12, temperature=1.0)["choices"][0]["text"]
    assert c == d


def test_grammar_constrains_the_output(llm: Llama) -> None:
    from pyllama.compat.llama_grammar import LlamaGrammar

    grammar = LlamaGrammar.from_string('root ::= "yes" | "no"', verbose=False)
    out = llm("Is Paris in France? Answer:", grammar=grammar, max_tokens=8, temperature=0)
    assert out["choices"][0]["text"] in ("yes", "no")

    class StandIn:                      # anything with llama-cpp-python's `_grammar` text
        _grammar = 'root ::= [0-9] [0-9]'

    out = llm("Pick a number:", grammar=StandIn(), max_tokens=8, temperature=0)
    assert len(out["choices"][0]["text"]) == 2 and out["choices"][0]["text"].isdigit()


def test_logits_processor_bans_a_token(llm: Llama) -> None:
    first = llm.tokenize(b" Paris", add_bos=False)[0]
    seen = []

    def ban(input_ids, scores):
        seen.append(len(input_ids))
        scores[first] = -np.inf
        return scores

    out = greedy(llm, max_tokens=4, logits_processor=LogitsProcessorList([ban]))
    assert not out["choices"][0]["text"].startswith(" Paris")
    n_prompt = len(llm.tokenize(PROMPT.encode()))
    assert seen[:2] == [n_prompt, n_prompt + 1]        # input_ids: the tokens so far, as there
    biased = greedy(llm, max_tokens=2, logit_bias={str(first): -100.0})
    assert not biased["choices"][0]["text"].startswith(" Paris")


def test_stopping_criteria_match_llama_cpp_python(llm: Llama) -> None:
    n_prompt = len(llm.tokenize(PROMPT.encode()))
    calls = []

    def after_three(input_ids, logits):
        # llama-cpp-python calls this with the tokens evaluated so far (not the one just sampled).
        calls.append(len(input_ids))
        return len(input_ids) >= n_prompt + 3

    out = greedy(llm, max_tokens=20, stopping_criteria=StoppingCriteriaList([after_three]))
    assert calls[:4] == [n_prompt, n_prompt + 1, n_prompt + 2, n_prompt + 3]
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] == 3
    assert out["choices"][0]["text"] == greedy(llm, max_tokens=3)["choices"][0]["text"]
    chunks = list(llm(PROMPT, max_tokens=20, temperature=0, stream=True,
                      stopping_criteria=StoppingCriteriaList([after_three])))
    assert "".join(c["choices"][0]["text"] for c in chunks) == out["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


# ---- chat ----------------------------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_completion_with_the_gguf_template(smollm2_path: Path) -> None:
    # Every prompt evaluated afresh (cache_prompt=False, a pyllama keyword): a greedy answer then
    # does not depend on what an earlier call left cached (a prefix evaluated apart from the rest
    # can round differently and flip a near-tie; which ones flip depends on the CPU's kernels).
    llm = Llama(model_path=str(smollm2_path), n_ctx=512, verbose=False, cache_prompt=False, **ONE_THREAD)
    try:
        _check_chat_completion(llm)
    finally:
        llm.close()


def _check_chat_completion(llm: Llama) -> None:
    out = llm.create_chat_completion(MESSAGES, max_tokens=12, temperature=0)
    assert set(out) == {"id", "object", "created", "model", "choices", "usage"}
    assert out["id"].startswith("chatcmpl-") and out["object"] == "chat.completion"
    (choice,) = out["choices"]
    assert set(choice) == {"index", "message", "logprobs", "finish_reason"}
    # The GGUF's own template, as LLM.chat applies it: the same prompt, the same greedy answer.
    assert out["usage"]["prompt_tokens"] == len(llm.llm.chat_prompt(MESSAGES))
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["message"]["content"] == llm.llm.chat(MESSAGES, max_tokens=12, temperature=0).text

    chunks = list(llm.create_chat_completion(MESSAGES, max_tokens=12, temperature=0, stream=True))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == choice["message"]["content"]

    with_lp = llm.create_chat_completion(MESSAGES, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    entries = with_lp["choices"][0]["logprobs"]["content"]
    assert len(entries) == 3 and all(len(e["top_logprobs"]) >= 1 for e in entries)


def test_chat_format_by_name(llm: Llama, smollm2_path: Path) -> None:
    m = Llama(model_path=str(smollm2_path), n_ctx=256, chat_format="chatml", verbose=False, n_parallel=1, **ONE_THREAD)
    try:
        out = m.create_chat_completion(MESSAGES, max_tokens=8, temperature=0)
        # SmolLM2 speaks ChatML: llama-cpp-python's "chatml" prompt works for it too.
        assert "Paris" in out["choices"][0]["message"]["content"]
        from pyllama.compat import llama_chat_format

        prompt = llama_chat_format.get_chat_format("chatml")(messages=MESSAGES).prompt
        assert prompt.startswith("<|im_start|>") and prompt != m.llm.render_chat(MESSAGES)
        assert out["usage"]["prompt_tokens"] == len(m.tokenize(prompt.encode(), special=True))
        with pytest.raises(ValueError):
            Llama(model_path=str(smollm2_path), n_ctx=64, chat_format="no-such-format", verbose=False,
                  n_parallel=1).create_chat_completion(MESSAGES, max_tokens=1)
    finally:
        m.close()


@pytest.mark.parametrize("fmt", [
    {"type": "json_object", "schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                       "required": ["city"]}},
    {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
        "type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["city", "population"]}}},
])
def test_response_format_constrains_chat(llm: Llama, fmt: dict) -> None:
    import jsonschema

    schema = fmt.get("schema") or fmt["json_schema"]["schema"]
    out = llm.create_chat_completion(MESSAGES + [{"role": "user", "content": "Answer in JSON."}],
                                     response_format=fmt, max_tokens=60, temperature=0)
    jsonschema.validate(json.loads(out["choices"][0]["message"]["content"]), schema)


def test_json_object_without_schema_is_json(llm: Llama) -> None:
    msgs = [{"role": "user", "content": 'Reply with {"city": <the capital of France>} only.'}]
    out = llm.create_chat_completion(msgs, response_format={"type": "json_object"}, max_tokens=80, temperature=0)
    assert out["choices"][0]["finish_reason"] == "stop", out
    assert isinstance(json.loads(out["choices"][0]["message"]["content"]), dict)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_tools_give_openai_tool_calls(llm: Llama) -> None:
    import jsonschema

    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    out = llm.create_chat_completion(msgs, tools=[WEATHER], max_tokens=40, temperature=0,
                                     tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])
    # llama-cpp-python's legacy functions / function_call
    chunks = list(llm.create_chat_completion(msgs, functions=[WEATHER["function"]], function_call={"name": "get_weather"},
                                             max_tokens=40, temperature=0, stream=True))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"][0]["delta"].get("tool_calls")]
    assert deltas and deltas[0]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert deltas[0]["function_call"]["name"] == "get_weather"


def test_openai_v1_types(llm: Llama) -> None:
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    out = llm.create_chat_completion_openai_v1(messages=MESSAGES, max_tokens=5, temperature=0)
    assert isinstance(out, ChatCompletion) and out.choices[0].message.role == "assistant"
    chunks = list(llm.create_chat_completion_openai_v1(messages=MESSAGES, max_tokens=5, temperature=0, stream=True))
    assert chunks and all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content


# ---- tokens, embeddings ----------------------------------------------------------------------------

def test_tokenize_detokenize_bytes(llm: Llama) -> None:
    text = "Héllo wörld 🙂".encode()
    tokens = llm.tokenize(text)
    assert isinstance(tokens, list) and all(isinstance(t, int) for t in tokens)
    assert llm.detokenize(tokens) == text
    assert isinstance(llm.detokenize(tokens), bytes)
    special = llm.tokenize(b"<|im_start|>user", add_bos=False, special=True)
    assert len(special) < len(llm.tokenize(b"<|im_start|>user", add_bos=False, special=False))
    assert llm.detokenize(special, special=True) == b"<|im_start|>user"
    assert llm.detokenize(special) == b"user"          # control tokens render empty without special


def test_embed_is_not_normalised_by_default(embedder: Llama, llm: Llama) -> None:
    raw = embedder.embed("Hello world")
    unit = embedder.embed("Hello world", normalize=True)
    assert isinstance(raw, list) and len(raw) == embedder.n_embd()
    assert abs(float(np.linalg.norm(raw)) - 1.0) > 1e-2
    assert float(np.linalg.norm(unit)) == pytest.approx(1.0, abs=1e-4)
    assert np.allclose(np.asarray(raw) / np.linalg.norm(raw), unit, atol=1e-5)
    many, count = embedder.embed(["a b c", "Hello world"], return_count=True)
    assert len(many) == 2 and np.allclose(many[1], raw, atol=1e-5)
    assert count == len(embedder.tokenize(b"a b c")) + len(embedder.tokenize(b"Hello world"))
    with pytest.raises(RuntimeError, match="embedding=True"):
        llm.embed("x")


def test_create_embedding_shape(embedder: Llama) -> None:
    out = embedder.create_embedding(["one", "two"])
    assert set(out) == {"object", "data", "model", "usage"} and out["object"] == "list"
    assert [d["index"] for d in out["data"]] == [0, 1]
    assert all(d["object"] == "embedding" and len(d["embedding"]) == embedder.n_embd() for d in out["data"])
    assert out["usage"]["prompt_tokens"] == out["usage"]["total_tokens"] > 0
    single = embedder.create_embedding("one", model="m")
    assert len(single["data"]) == 1 and single["model"] == "m"


# ---- state, caches ----------------------------------------------------------------------------------

def test_save_state_pickles_and_resumes(llm: Llama) -> None:
    llm.reset()
    llm.eval(llm.tokenize(PROMPT.encode()))
    state = llm.save_state()
    assert isinstance(state, LlamaState) and state.n_tokens == llm.n_tokens and state.llama_state_size > 0
    expected = [llm.sample(temp=0)]
    llm.eval(expected)
    expected.append(llm.sample(temp=0))

    llm.reset()
    llm.eval(llm.tokenize(b"Something else entirely"))
    restored = pickle.loads(pickle.dumps(state))
    llm.load_state(restored)
    assert llm.n_tokens == state.n_tokens and list(llm._input_ids) == list(state.input_ids[: state.n_tokens])
    got = [llm.sample(temp=0)]
    llm.eval(got)
    got.append(llm.sample(temp=0))
    assert got == expected
    assert llm.detokenize(expected).startswith(b" Paris")
    with pytest.raises(ValueError, match="save_state"):
        llm.load_state(LlamaState(state.input_ids, state.scores, 3, b"\x01\x02", 2, 0))


def test_load_state_restores_the_seed(llm: Llama) -> None:
    llm.set_seed(5)
    state = llm.save_state()
    llm.llm.reset()      # same engine state for both runs (see test_seed_makes_sampling_reproducible)
    a = llm(PROMPT, max_tokens=8, temperature=1.0)["choices"][0]["text"]
    llm.load_state(pickle.loads(pickle.dumps(state)))
    llm.llm.reset()
    b = llm(PROMPT, max_tokens=8, temperature=1.0)["choices"][0]["text"]
    assert a == b


def test_generate_streams_tokens(llm: Llama) -> None:
    tokens = llm.tokenize(PROMPT.encode())
    out = []
    for tok in llm.generate(tokens, temp=0):
        out.append(tok)
        if len(out) == 4:
            break
    assert llm.n_tokens == len(tokens) + len(out) - 1          # the last one is not evaluated yet
    assert llm.detokenize(out) == greedy(llm, max_tokens=4)["choices"][0]["text"].encode()
    stop_after_two = StoppingCriteriaList([lambda ids, logits: len(ids) >= len(tokens) + 2])
    assert list(llm.generate(tokens, temp=0, stopping_criteria=stop_after_two)) == out[:2]


def test_ram_cache_store_and_lookup(llm: Llama) -> None:
    cache = LlamaRAMCache(capacity_bytes=1 << 20)
    s = llm.save_state()
    cache[[1, 2, 3]] = s
    cache[[1, 2, 9, 9]] = s
    assert [1, 2, 9] in cache and [7] not in cache
    assert cache[[1, 2, 9, 9, 4]] is s
    with pytest.raises(KeyError):
        cache[[8]]
    small = LlamaRAMCache(capacity_bytes=s.llama_state_size * 2)
    for i in range(5):
        small[[i]] = s
    assert len(small.cache_state) == 2 and small.cache_size <= s.llama_state_size * 2

    llm.set_cache(cache)
    try:
        out = greedy(llm, max_tokens=3)
        key = llm.tokenize(PROMPT.encode()) + llm.tokenize(out["choices"][0]["text"].encode(), add_bos=False)
        assert tuple(key) in cache.cache_state                     # stored after the completion
        assert cache[llm.tokenize(PROMPT.encode())].n_tokens == len(key)
    finally:
        llm.set_cache(None)


def test_disk_cache_store_and_lookup(llm: Llama, tmp_path: Path) -> None:
    cache = LlamaDiskCache(cache_dir=str(tmp_path / "cache"))
    llm.reset()
    llm.eval([1, 2, 3])
    cache[[1, 2, 3]] = llm.save_state()
    again = LlamaDiskCache(cache_dir=str(tmp_path / "cache"))      # it is on disk
    assert [1, 2, 3, 4] in again and cache.cache_size > 0
    state = again[[1, 2, 3, 4]]
    assert isinstance(state, LlamaState) and state.n_tokens == 3
    assert [1, 2, 3] not in again                                   # a lookup takes the entry, as there


# ---- concurrency -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_model_path: Path) -> Llama:
    model = Llama(model_path=str(tiny_model_path), n_ctx=128, verbose=False, **ONE_THREAD)
    yield model
    model.close()


def test_threads_calling_one_llama_batch_and_agree_with_sequential(tiny: Llama) -> None:
    # The tiny F32 model: no near-ties, so batched and sequential greedy runs agree exactly.
    llm = tiny
    assert llm.n_parallel == 8
    no_eog = {t: float("-inf") for t in range(llm.n_vocab()) if llm.llm.vocab.is_eog(t)}
    prompts = [f"{n} plus {n} equals" for n in range(8)]

    def run(p: str) -> str:
        return greedy(llm, p, max_tokens=12, logit_bias=no_eog)["choices"][0]["text"]

    expected = [run(p) for p in prompts]
    assert len(set(expected)) > 1
    results: list = [None] * 8
    errors: list = []
    barrier = threading.Barrier(8)
    before = llm.llm.metrics()

    def work(i: int) -> None:
        try:
            barrier.wait()
            results[i] = run(prompts[i])
        except BaseException as e:   # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and results == expected
    after = llm.llm.metrics()
    decodes = after["n_decode_total"] - before["n_decode_total"]
    assert decodes < 8 * 12       # batched: far fewer decodes than one per token per call


# ---- install_as_llama_cpp, the Hub --------------------------------------------------------------------

def test_install_as_llama_cpp(run_python, tiny_model_path: Path) -> None:
    code = textwrap.dedent(f"""
        import importlib.util, sys
        if importlib.util.find_spec("llama_cpp") is None:   # (llama-cpp-python is not installed here)
            try:
                import llama_cpp
            except ImportError:
                pass
            else:
                raise SystemExit("llama_cpp importable before install: " + repr(llama_cpp))
        import pyllama
        assert "llama_cpp" not in sys.modules
        mod = pyllama.install_as_llama_cpp()
        assert pyllama.install_as_llama_cpp() is mod        # idempotent
        import llama_cpp
        from llama_cpp import Llama, LlamaGrammar, LlamaRAMCache, LlamaState, StoppingCriteriaList
        import llama_cpp.llama_chat_format, llama_cpp.llama_types, llama_cpp.llama_grammar
        from llama_cpp.llama import LogitsProcessorList
        from llama_cpp.llama_cache import LlamaDiskCache
        import pyllama.compat
        assert llama_cpp is pyllama.compat and llama_cpp.__version__ == "0.3.36"
        assert Llama is pyllama.compat.Llama
        assert sys.modules["llama_cpp.llama_chat_format"] is pyllama.compat.llama_chat_format
        import llama_cpp.llama_cpp as low
        assert low is pyllama.compat._lowlevel and llama_cpp.llama_token_to_piece is low.llama_token_to_piece
        from llama_cpp import llama_model_get_vocab, llama_n_vocab
        from llama_cpp import ChatCompletionRequestUserMessage, CreateCompletionResponse   # the types, at the top
        assert ChatCompletionRequestUserMessage is pyllama.compat.llama_types.ChatCompletionRequestUserMessage
        ns = {{}}
        exec("from llama_cpp import *", ns)
        assert ns["Llama"] is Llama and ns["LlamaGrammar"] is LlamaGrammar
        llm = Llama(model_path={str(tiny_model_path)!r}, n_ctx=64, verbose=False, n_parallel=1)
        print(llm("hi", max_tokens=2, temperature=0)["object"])
    """)
    res = run_python(code, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().endswith("text_completion")

    refuse = textwrap.dedent("""
        import sys, types
        fake = types.ModuleType("llama_cpp")
        fake.__file__ = "/site-packages/llama_cpp/__init__.py"
        sys.modules["llama_cpp"] = fake
        import pyllama
        try:
            pyllama.install_as_llama_cpp()
        except ImportError as e:
            print("refused:", e)
        assert sys.modules["llama_cpp"] is fake
    """)
    res = run_python(refuse, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "refused:" in res.stdout and "already imported" in res.stdout


def test_from_pretrained_uses_the_hub(tiny_model_path: Path, tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("huggingface_hub")
    from hf_hub_server import HubServer

    import huggingface_hub.constants

    server = HubServer()
    server.add_repo("test/compat-GGUF", {"tiny-Q4_K_M.gguf": tiny_model_path, "tiny-Q8_0.gguf": tiny_model_path,
                                         "README.md": b"# tiny\n"})
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    with server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        m = Llama.from_pretrained("test/compat-GGUF", "*Q8_0.gguf", n_ctx=64, verbose=False, n_parallel=1,
                                  additional_files=["README.md"])
        try:
            assert m.model_path.endswith("tiny-Q8_0.gguf") and str(tmp_path / "hf-home") in m.model_path
            assert (Path(m.model_path).parent / "README.md").is_file()
            assert m("hi", max_tokens=2, temperature=0)["usage"]["completion_tokens"] <= 2
        finally:
            m.close()
        with pytest.raises(ValueError):
            Llama.from_pretrained("test/compat-GGUF", "*.gguf", verbose=False)   # two files match


# ---- chat handlers ---------------------------------------------------------------------------------

def test_multimodal_chat_handler_loads_the_projector(tiny_model_path: Path, tmp_path: Path) -> None:
    import base64

    from pyllama import _core
    from pyllama.compat.llama_chat_format import Llava15ChatHandler
    from test_mtmd import png_bytes
    from tiny_mmproj import make_tiny_mmproj

    if not _core.mtmd_available():
        pytest.skip("this build has no mtmd")
    handler = Llava15ChatHandler(clip_model_path=str(make_tiny_mmproj(tmp_path / "mmproj.gguf")), verbose=False)
    m = Llama(model_path=str(tiny_model_path), chat_handler=handler, n_ctx=512, n_parallel=1, verbose=False,
              **ONE_THREAD)
    try:
        assert m.llm.multimodal is not None                 # mmproj_path=handler.clip_model_path
        url = "data:image/png;base64," + base64.b64encode(png_bytes(32, 32)).decode()
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What is this?"}]}]
        out = m.create_chat_completion(msgs, max_tokens=3, temperature=0)
        assert out["object"] == "chat.completion"
        assert out["usage"]["prompt_tokens"] > 10 and out["usage"]["completion_tokens"] <= 3
    finally:
        m.close()


def test_callable_chat_handler_is_called_as_llama_cpp_python_calls_it(tiny: Llama) -> None:
    seen = {}

    def handler(*, llama, messages, **kwargs):
        seen.update(kwargs, llama=llama, messages=messages)
        return {"handled": True}

    tiny.chat_handler = handler
    try:
        assert tiny.create_chat_completion(MESSAGES, temperature=0.5, max_tokens=3) == {"handled": True}
    finally:
        tiny.chat_handler = None
    assert seen["llama"] is tiny and seen["messages"] == MESSAGES
    assert seen["temperature"] == 0.5 and seen["max_tokens"] == 3 and seen["repeat_penalty"] == 1.0


def test_llama_pickles_by_its_arguments(tiny: Llama) -> None:
    copy = pickle.loads(pickle.dumps(tiny))
    try:
        assert copy is not tiny and copy.model_path == tiny.model_path
        assert copy.n_ctx() == tiny.n_ctx() and copy.n_parallel == tiny.n_parallel
        assert copy.context_params.n_threads == 1
        assert copy("hello", max_tokens=3, temperature=0)["choices"][0]["text"] == \
            tiny("hello", max_tokens=3, temperature=0)["choices"][0]["text"]
    finally:
        copy.close()


def test_tool_calling_chat_format_names_use_the_models_template(smollm2_path: Path) -> None:
    """instructor's llama-cpp-python example loads Llama(chat_format="chatml-function-calling"):
    tool calls then go through the GGUF's own template and pyllama's tool calling."""
    import jsonschema

    model = Llama(model_path=str(smollm2_path), n_ctx=512, verbose=False, n_parallel=1,
                  chat_format="chatml-function-calling", **ONE_THREAD)
    try:
        msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
        out = model.create_chat_completion(msgs, tools=[WEATHER], max_tokens=40, temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
        (call,) = out["choices"][0]["message"]["tool_calls"]
        jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])
        plain = model.create_chat_completion(msgs, max_tokens=8, temperature=0)
        assert plain["choices"][0]["message"]["content"]
    finally:
        model.close()


def test_prompt_lookup_draft_model_is_the_engines_speculation(tiny_model_path: Path) -> None:
    from pyllama.compat.llama_speculative import LlamaPromptLookupDecoding

    spec = Llama(model_path=str(tiny_model_path), n_ctx=512, verbose=False, n_parallel=1,
                 draft_model=LlamaPromptLookupDecoding(max_ngram_size=2, num_pred_tokens=6), **ONE_THREAD)
    plain = Llama(model_path=str(tiny_model_path), n_ctx=512, verbose=False, n_parallel=1, **ONE_THREAD)
    try:
        assert spec.llm._spec == {"draft_max": 6, "draft_min": 0, "ngram_n": 2}
        head = "Once upon a time"
        prompt = head + plain(head, max_tokens=30, temperature=0)["choices"][0]["text"] + head
        a = plain(prompt, max_tokens=30, temperature=0)
        b = spec(prompt, max_tokens=30, temperature=0)
        assert b["choices"][0]["text"] == a["choices"][0]["text"]
    finally:
        spec.close()
        plain.close()


def test_custom_draft_model_is_called_and_verified(tiny_model_path: Path) -> None:
    """A LlamaDraftModel subclass (llama-cpp-python's interface: input_ids -> proposed ids) is
    the engine's drafter: called with the tokens so far, its right proposals accepted, its wrong
    ones rejected, the text the same as without it."""
    from pyllama.compat.llama_speculative import LlamaDraftModel

    plain = Llama(model_path=str(tiny_model_path), n_ctx=512, verbose=False, n_parallel=1, **ONE_THREAD)
    head = "Once upon a time"
    ref = plain.llm.complete(head, max_tokens=30, temperature=0)
    n_prompt = len(plain.llm.tokenize(head))

    class Knows(LlamaDraftModel):
        """Proposes the known answer, one token spoiled every other call."""

        def __init__(self) -> None:
            self.calls = 0
            self.seen_types: set = set()

        def __call__(self, input_ids, /, **kwargs):
            self.calls += 1
            self.seen_types.add((type(input_ids).__name__, str(input_ids.dtype)))
            done = len(input_ids) - n_prompt
            out = np.array(ref.tokens[done:done + 5], dtype=np.intc)
            if self.calls % 2 == 0 and len(out):
                out[-1] = (out[-1] + 11) % plain.n_vocab()
            return out

    drafter = Knows()
    spec = Llama(model_path=str(tiny_model_path), n_ctx=512, verbose=False, n_parallel=1, draft_model=drafter,
                 spec_cost_model=False, **ONE_THREAD)
    try:
        out = spec(head, max_tokens=30, temperature=0)
        assert out["choices"][0]["text"] == ref.text
        assert drafter.calls > 0 and drafter.seen_types == {("ndarray", "int32")}
        got = spec.llm.complete(head, max_tokens=30, temperature=0)
        assert got.timings.draft_n_accepted > 0 and got.timings.draft_n > got.timings.draft_n_accepted
    finally:
        spec.close()
        plain.close()


def test_repeat_penalty_counts_generated_tokens_only(tiny: Llama) -> None:
    """llama-cpp-python's chain accepts only what it samples: its repeat penalty never sees the
    prompt (LangChain passes repeat_penalty=1.1 by default, so every LangChain answer depends on
    it).  On the tiny model (no near ties): put the greedy next token into the prompt; with a
    huge penalty the compat call still picks it, pyllama's native default (prompt counted)
    cannot."""
    llm = tiny.llm
    head = llm.tokenize("Once upon a time")
    t0 = llm.complete(head, max_tokens=1, temperature=0, cache_prompt=False).tokens[0]
    prompt = head[:1] + [t0] + head[1:]
    assert llm.complete(prompt, max_tokens=1, temperature=0, cache_prompt=False).tokens[0] == t0
    native = llm.complete(prompt, max_tokens=1, temperature=0, cache_prompt=False, repeat_penalty=1e6).tokens[0]
    assert native != t0 and native not in prompt
    want = llm.complete(prompt, max_tokens=1, temperature=0, cache_prompt=False, repeat_penalty=1e6,
                        penalize_prompt=False)
    assert want.tokens == [t0]
    out = tiny(prompt, max_tokens=1, temperature=0, repeat_penalty=1e6)
    assert out["choices"][0]["text"] == want.text

def test_docs_list_every_difference() -> None:
    """docs/compat.md's table is DIFFERENCES: each entry is on the page, word for word."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "compat.md").read_text(encoding="utf-8")
    missing = [k for k, v in DIFFERENCES.items() if f"`{k}`" not in page or v not in page]
    assert not missing, f"docs/compat.md lacks (or has an old text of): {missing}"
