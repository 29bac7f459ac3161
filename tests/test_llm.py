"""The LLM class on real models (issue 4): grammars and JSON schemas, seeds and
streaming, stop strings, Unicode streaming, chat templates, verbose timings and
silence, the prompt cache, context limits, parameter validation, tokenize,
lifecycle, embeddings and the Completion record.

SmolLM2-135M-Instruct (llama, byte-level BPE, has a chat template) and Gemma 3
270M (gemma3, SentencePiece, base model without a chat template).  Each model
is loaded once per module; generations are kept short (the test machines have
two cores).
"""

from __future__ import annotations

import json
import logging
import math
import re
import textwrap
import warnings

import numpy as np
import pytest

import pyllama
from pyllama import LLM, _core
from pyllama.errors import ContextLengthError

from hf_reference import hf_render
from llm_fixtures import either_llm, module_llm

pytestmark = pytest.mark.model

THREADS = 2


# --------------------------------------------------------------------------- fixtures


smol = module_llm("smollm2_path", n_ctx=1024, n_threads=THREADS, temperature=0)
gemma = module_llm("gemma_path", n_ctx=1024, n_threads=THREADS, temperature=0)
any_llm = either_llm("smol", "gemma")


def _grammar_path(name: str) -> str:
    """pyllama.grammar_path(name), or a clear failure if the grammar module is missing."""
    try:
        from pyllama.grammar import grammar_path
    except ImportError as exc:  # pragma: no cover - only while grammar.py is missing
        pytest.fail(f"pyllama.grammar is missing: {exc}")
    return str(grammar_path(name))


# --------------------------------------------------------------------------- grammars and JSON schema

JSON_PROMPTS = [
    [{"role": "user", "content": "Give me a JSON object with the keys city and country for Paris."}],
    [{"role": "user", "content": "Write a JSON object with the keys name and age for Alice, 30."}],
    [{"role": "user", "content": "Return JSON with one key, answer, whose value is yes."}],
    [{"role": "user", "content": "Give me the weather in Paris as a short JSON object."}],
]


@pytest.mark.parametrize("messages", JSON_PROMPTS, ids=["city", "person", "answer", "weather"])
def test_json_grammar_gives_valid_json(smol, messages):
    c = smol.chat(messages, grammar_path=_grammar_path("json"), max_tokens=64)
    assert c.finish_reason == "eog", f"the JSON did not finish within max_tokens: {c.text!r}"
    json.loads(c.text)


def test_json_grammar_with_plain_prompt(smol):
    c = smol.complete('A JSON object describing a dog: ', grammar_path=_grammar_path("json"), max_tokens=64)
    assert c.finish_reason == "eog", c.text
    json.loads(c.text)


def _greedy_with_the_grammar_on_every_candidate(llm, prompt_ids, grammar_text, n):
    """The reference: llama.cpp's chain with the grammar stage before greedy, which filters
    the whole vocabulary at every token (as llama-cpp-python samples)."""
    chain = _core.SamplerChain(llm.vocab).add_grammar(grammar_text).add_greedy()
    out = []
    with _core.Context(llm._model, n_ctx=256, n_threads=THREADS) as ctx:
        b = _core.Batch(len(prompt_ids))
        b.add_sequence(prompt_ids, 0, 0)
        ctx.decode(b)
        for i in range(n):
            tok = chain.sample(ctx)
            if llm.vocab.is_eog(tok):
                break
            out.append(tok)
            b = _core.Batch(1)
            b.add(tok, len(prompt_ids) + i, 0, True)
            ctx.decode(b)
    return out


def test_grammar_checks_the_sampled_token_with_the_same_answer(smol):
    """The engine samples first and runs the grammar over every candidate only when it
    refuses the sampled token (llama.cpp's common_sampler; compat_bench.py times it against
    llama-cpp-python's grammar-on-every-candidate).  Both must give the same greedy tokens,
    including at the positions where the model's own choice was refused."""
    from pyllama.grammar import grammar_path

    grammar_text = open(grammar_path("json"), encoding="utf-8").read()
    prompt_ids = smol.tokenize("A JSON object describing a dog: ")
    free = smol.complete(prompt_ids, add_special=False, max_tokens=1, ignore_eos=True).tokens
    c = smol.complete(prompt_ids, add_special=False, grammar=grammar_text, max_tokens=40)
    assert free[0] != c.tokens[0], "the model's first choice was allowed: the refusal path went untested"
    assert c.tokens == _greedy_with_the_grammar_on_every_candidate(smol, prompt_ids, grammar_text, len(c.tokens))


def test_list_grammar_gives_json_list(smol):
    messages = [{"role": "user", "content": "List three fruits."}]
    c = smol.chat(messages, grammar_path=_grammar_path("list"), max_tokens=48)
    assert c.finish_reason == "eog", c.text
    value = json.loads(c.text)
    assert isinstance(value, list)


PET_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "kind": {"enum": ["cat", "dog", "bird"]},
    },
    "required": ["name", "age", "kind"],
    "additionalProperties": False,
}


def test_json_schema_dict_validates(smol):
    import jsonschema

    messages = [{"role": "user", "content": "Describe a pet as JSON: Rex, a 4 year old dog."}]
    c = smol.chat(messages, json_schema=PET_SCHEMA, max_tokens=48)
    assert c.finish_reason == "eog", c.text
    jsonschema.validate(json.loads(c.text), PET_SCHEMA)


def test_json_schema_pydantic_model_validates(smol):
    import jsonschema
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        population: int
        capital: bool

    messages = [{"role": "user", "content": "Describe Paris as JSON."}]
    c = smol.chat(messages, json_schema=City, max_tokens=48)
    assert c.finish_reason == "eog", c.text
    data = json.loads(c.text)
    jsonschema.validate(data, City.model_json_schema())
    City.model_validate(data)


def test_json_schema_as_construction_default(smollm2_path):
    import jsonschema

    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3}
    with LLM(smollm2_path, n_ctx=256, n_threads=THREADS, temperature=0, json_schema=schema, max_tokens=32) as llm:
        c = llm.complete("Three small numbers: ")
        assert c.finish_reason == "eog", c.text
        jsonschema.validate(json.loads(c.text), schema)
        # A per-call grammar replaces the default schema.
        c = llm.complete("Yes or no? ", grammar='root ::= "yes" | "no"')
        assert c.text in ("yes", "no")


def test_response_format_json_object(smol):
    messages = [{"role": "user", "content": "Give me the weather in Paris as a short JSON object."}]
    c = smol.chat(messages, response_format={"type": "json_object"}, max_tokens=64)
    assert c.finish_reason == "eog", c.text
    assert isinstance(json.loads(c.text), dict)


def test_response_format_json_schema(smol):
    import jsonschema

    messages = [{"role": "user", "content": "Describe a pet as JSON: Tom, a 3 year old cat."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET_SCHEMA}}
    c = smol.chat(messages, response_format=fmt, max_tokens=48)
    assert c.finish_reason == "eog", c.text
    jsonschema.validate(json.loads(c.text), PET_SCHEMA)


def test_bad_grammar_fails_when_given(smol, smollm2_path):
    with pytest.raises(ValueError):
        smol.invoke("hi", grammar="root ::= (", max_tokens=2)
    with pytest.raises(ValueError):
        LLM(smollm2_path, vocab_only=True, grammar="root ::= undefined_rule")


# --------------------------------------------------------------------------- seeds and streaming

SEED_PROMPT = "Once upon a time, in a land far away,"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_stream_equals_invoke_same_seed(smol, seed):
    kw = dict(seed=seed, temperature=0.8, max_tokens=12)
    streamed = "".join(smol.stream(SEED_PROMPT, **kw))
    assert streamed == smol.invoke(SEED_PROMPT, **kw)


def test_same_seed_same_text_different_seeds_differ(smol):
    kw = dict(temperature=1.0, max_tokens=10)
    texts = {s: smol.invoke(SEED_PROMPT, seed=s, **kw) for s in (11, 12, 13, 14)}
    assert smol.invoke(SEED_PROMPT, seed=12, **kw) == texts[12]
    assert len(set(texts.values())) >= 3, texts


def test_stream_completion_and_callback(smol):
    kw = dict(seed=5, temperature=0.8, max_tokens=12)
    it = smol.stream(SEED_PROMPT, **kw)
    pieces = list(it)
    assert it.completion is not None
    assert it.completion.text == "".join(pieces)
    got = []
    c = smol.complete(SEED_PROMPT, callback=got.append, **kw)
    assert got and all(isinstance(p, str) and p for p in got)
    assert "".join(got) == c.text == it.completion.text
    assert c.tokens == it.completion.tokens


def test_stream_can_be_abandoned(smol):
    it = smol.stream(SEED_PROMPT, max_tokens=16)
    first = next(it)
    assert isinstance(first, str)
    it.close()
    # The LLM is still usable and greedy output unchanged.
    assert smol.invoke(SEED_PROMPT, max_tokens=4) == smol.invoke(SEED_PROMPT, max_tokens=4)


# --------------------------------------------------------------------------- stop strings

STOP_PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def stop_base(smol):
    """The greedy no-stop output, and its per-token text pieces."""
    c = smol.complete(STOP_PROMPT, max_tokens=24)
    assert c.finish_reason == "length"
    pieces = [smol.detokenize([t]) for t in c.tokens]
    assert "".join(pieces) == c.text
    return c.text, pieces


def _expected(text: str, stops: list) -> str:
    cut = min(text.index(s) for s in stops if s in text)
    return text[:cut]


def _stop_cases(text: str, pieces: list) -> dict:
    starts = [sum(len(p) for p in pieces[:i]) for i in range(len(pieces) + 1)]
    # a whole word token in the middle of the output
    single = next(p for p in pieces[3:] if len(p.strip()) >= 3 and p.strip().isalpha())
    # a run of three whole tokens
    multi = text[starts[5]:starts[8]]
    # from the middle of one token to the middle of a later one
    k = next(i for i in range(4, len(pieces) - 2) if len(pieces[i]) >= 3 and len(pieces[i + 1]) >= 2)
    straddle = text[starts[k] + 1:starts[k + 2] - 1]
    assert len(straddle) >= 2
    return {"single": [single], "multi": [multi], "straddle": [straddle], "first": [pieces[0]],
            "several": [multi, single, "zzzz-never"]}


@pytest.mark.parametrize("case", ["single", "multi", "straddle", "first", "several"])
def test_stop_strings_cut_exactly(smol, stop_base, case):
    text, pieces = stop_base
    stops = _stop_cases(text, pieces)[case]
    expected = _expected(text, stops)
    c = smol.complete(STOP_PROMPT, max_tokens=24, stop=stops)
    assert c.text == expected
    assert c.finish_reason == "stop"
    for s in stops:
        assert s not in c.text


@pytest.mark.parametrize("case", ["single", "multi", "straddle", "several"])
def test_stream_never_leaks_partial_stop(smol, stop_base, case):
    text, pieces = stop_base
    stops = _stop_cases(text, pieces)[case]
    expected = _expected(text, stops)
    it = smol.stream(STOP_PROMPT, max_tokens=24, stop=stops)
    got = []
    for piece in it:
        got.append(piece)
        so_far = "".join(got)
        # Everything released so far is part of the final answer: no piece was a
        # (partial) stop string that later completed.
        assert expected.startswith(so_far), (so_far, expected)
    assert "".join(got) == expected
    assert it.completion.finish_reason == "stop"


def test_stop_string_absent_changes_nothing(smol, stop_base):
    text, _ = stop_base
    c = smol.complete(STOP_PROMPT, max_tokens=24, stop=["@@@", "never-there"])
    assert c.text == text
    assert c.finish_reason == "length"


def test_stop_as_single_string(smol, stop_base):
    text, pieces = stop_base
    s = _stop_cases(text, pieces)["single"][0]
    assert smol.invoke(STOP_PROMPT, max_tokens=24, stop=s) == _expected(text, [s])


# --------------------------------------------------------------------------- emoji and CJK

EMOJI_PROMPT = "🎉 🐍 🚀 🎉 🐍 🚀 🎉 🐍 🚀"
CJK_PROMPT = "你好世界。你好世界。你好世界。"


def _is_emoji(ch: str) -> bool:
    return ord(ch) >= 0x1F000


def _is_cjk(ch: str) -> bool:
    return "\u4e00" <= ch <= "\u9fff" or "\u3000" <= ch <= "\u30ff" or "\uff00" <= ch <= "\uffef"


def _boundary_max_tokens(llm, prompt: str, n: int) -> int:
    """The largest m <= n such that the first m greedy tokens end on a character boundary."""
    toks = llm.complete(prompt, max_tokens=n).tokens
    for m in range(len(toks), 0, -1):
        if "\ufffd" not in llm.detokenize(toks[:m]):
            return m
    pytest.fail(f"no character boundary in {toks}")


@pytest.mark.parametrize("prompt,kind", [(EMOJI_PROMPT, _is_emoji), (CJK_PROMPT, _is_cjk)], ids=["emoji", "cjk"])
def test_unicode_streams_whole_characters(any_llm, prompt, kind):
    n = _boundary_max_tokens(any_llm, prompt, 16)
    it = any_llm.stream(prompt, max_tokens=n)
    pieces = list(it)
    text = "".join(pieces)
    assert any(kind(ch) for ch in text), f"the model did not produce the expected script: {text!r}"
    for p in pieces:
        assert isinstance(p, str) and p
        assert "\ufffd" not in p, pieces
        p.encode("utf-8")  # no lone surrogates
    assert text == any_llm.invoke(prompt, max_tokens=n)
    assert text == it.completion.text == any_llm.detokenize(it.completion.tokens)
    got = []
    any_llm.complete(prompt, max_tokens=n, callback=got.append)
    assert got == pieces


@pytest.mark.parametrize("prompt", [EMOJI_PROMPT, CJK_PROMPT], ids=["emoji", "cjk"])
def test_unicode_cut_by_max_tokens(any_llm, prompt):
    """Whatever max_tokens cuts, no piece but the last can hold a broken character,
    and streaming agrees with invoke."""
    for n in range(1, 7):
        it = any_llm.stream(prompt, max_tokens=n)
        pieces = list(it)
        assert pieces and all("\ufffd" not in p for p in pieces[:-1]), (n, pieces)
        assert "".join(pieces) == any_llm.invoke(prompt, max_tokens=n)


def test_byte_tokens_are_held_until_complete(smol):
    """SmolLM2 spells emoji with several byte tokens: fewer pieces than tokens."""
    it = smol.stream(EMOJI_PROMPT, max_tokens=16)
    pieces = list(it)
    assert len(pieces) < len(it.completion.tokens)
    assert smol.detokenize(it.completion.tokens) == "".join(pieces)


def test_unicode_stop_string(smol):
    base = smol.invoke(EMOJI_PROMPT, max_tokens=16)
    emoji = next(ch for ch in base if _is_emoji(ch))
    pieces = list(smol.stream(EMOJI_PROMPT, max_tokens=16, stop=[emoji]))
    assert "".join(pieces) == base[:base.index(emoji)]


# --------------------------------------------------------------------------- chat


def _hf_render(template: str, messages, bos: str, eos: str, add_generation_prompt: bool = True) -> str:
    return hf_render(template, messages, add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos)


CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke."}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one", "system", "multi"])
def test_smollm2_render_matches_jinja(smol, messages):
    template = smol.model.chat_template()
    assert template, "SmolLM2 carries tokenizer.chat_template"
    assert smol.metadata.get("tokenizer.chat_template") == template
    v = smol.vocab
    expected = _hf_render(template, messages, v.token_text(v.bos), v.token_text(v.eos))
    assert smol.render_chat(messages) == expected
    expected_no_gen = _hf_render(template, messages, v.token_text(v.bos), v.token_text(v.eos), False)
    assert smol.render_chat(messages, add_generation_prompt=False) == expected_no_gen


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one", "system", "multi"])
def test_gemma_base_uses_builtin_fallback(gemma, messages):
    assert gemma.model.chat_template() is None
    rendered = gemma.render_chat(messages)
    assert rendered == _core.apply_builtin_chat_template("gemma", messages, True)
    assert rendered.count("<start_of_turn>") == sum(m["role"] != "system" for m in messages) + 1
    assert rendered.endswith("<start_of_turn>model\n")
    assert "<start_of_turn>user\n" in rendered


def test_gemma_fallback_exact_text(gemma):
    assert gemma.render_chat([{"role": "user", "content": "Hello!"}]) == (
        "<start_of_turn>user\nHello!<end_of_turn>\n<start_of_turn>model\n")


def test_chat_answers(any_llm):
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    c = any_llm.chat(messages, max_tokens=16)
    assert isinstance(c, pyllama.Completion)
    assert c.text.strip()
    assert c.finish_reason in ("eog", "length", "stop")
    # The chat prompt was tokenized with special tokens parsed: the template's
    # markers are single tokens, not text.
    prompt, _ = any_llm._chat_formatter().render_for_tokenize(messages)
    n_plain = len(any_llm.tokenize(prompt, parse_special=False))
    assert c.prompt_tokens < n_plain


def test_chat_smollm2_answer_is_sensible(smol):
    c = smol.chat([{"role": "user", "content": "What is the capital of France? Answer in one word."}],
                  max_tokens=16)
    assert "Paris" in c.text
    assert c.finish_reason == "eog"
    assert "<|im_end|>" not in c.text


def test_chat_continues_a_final_assistant_message(smol):
    """continue_final_message: the answer carries on from the assistant's text (greedy: the same
    tokens a plain completion of that prompt gives), where a plain chat answers anew after it;
    add_generation_prompt=False leaves the assistant's header out of the prompt."""
    ask = [{"role": "user", "content": "What is the capital of France?"}]
    prefill = ask + [{"role": "assistant", "content": "The capital of France is"}]
    cont = smol.chat(prefill, continue_final_message=True, max_tokens=6, temperature=0)
    prompt = smol.render_chat(ask) + "The capital of France is"
    plain = smol.complete(smol.tokenize(prompt, add_special=False, parse_special=True), max_tokens=6,
                          temperature=0)
    assert cont.text == plain.text and "Paris" in cont.text
    assert cont.prompt_tokens == plain.prompt_tokens
    anew = smol.chat(prefill, max_tokens=6, temperature=0)
    assert anew.prompt_tokens > cont.prompt_tokens          # a closed message, then a new header
    bare = smol.chat(ask, add_generation_prompt=False, max_tokens=1, temperature=0)
    assert bare.prompt_tokens < smol.chat(ask, max_tokens=1, temperature=0).prompt_tokens
    with pytest.raises(ValueError, match="only an assistant message"):
        smol.chat(ask, continue_final_message=True)
    with pytest.raises(TypeError, match="continue_final_message"):
        smol.chat(prefill, continue_final_message="yes")


def test_chat_stream_equals_chat(any_llm):
    messages = [{"role": "user", "content": "Say hello."}]
    pieces = list(any_llm.chat(messages, stream=True, max_tokens=12))
    assert "".join(pieces) == any_llm.chat(messages, max_tokens=12).text


def test_chat_single_bos(any_llm):
    """The template writes BOS (or not); the tokens hold at most one."""
    messages = [{"role": "user", "content": "Hi"}]
    prompt, add_special = any_llm._chat_formatter().render_for_tokenize(messages)
    toks = any_llm.tokenize(prompt, add_special=add_special, parse_special=True)
    bos = any_llm.vocab.bos
    assert toks[:2] != [bos, bos]
    if any_llm.vocab.add_bos:
        assert toks[0] == bos


# --------------------------------------------------------------------------- verbose timings / silence


TIMING_PATTERNS = [
    r"load time\s*=\s*\d+\.\d+ ms",
    r"sampl(e|ing) time\s*=\s*\d+\.\d+ ms /\s*\d+ runs\s*\(\s*\d+\.\d+ ms per token,\s*\d+\.\d+ tokens per second\)",
    r"prompt eval time\s*=\s*\d+\.\d+ ms /\s*\d+ tokens\s*\(\s*\d+\.\d+ ms per token,\s*\d+\.\d+ tokens per second\)",
    r"(?<!prompt )eval time\s*=\s*\d+\.\d+ ms /\s*\d+ runs\s*\(\s*\d+\.\d+ ms per token,\s*\d+\.\d+ tokens per second\)",
    r"total time\s*=\s*\d+\.\d+ ms /\s*\d+ tokens",
]


def test_verbose_prints_timings(run_python, smollm2_path):
    code = textwrap.dedent(f"""
        import pyllama
        with pyllama.LLM({str(smollm2_path)!r}, n_ctx=256, n_threads=2, temperature=0, verbose=True) as llm:
            c = llm.complete("The capital of France is", max_tokens=6)
            print("TIMINGS", c.timings.prompt_n, c.timings.predicted_n, flush=True)
            llm.invoke("The sky is", max_tokens=4)
        """)
    proc = run_python(code, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    for pat in TIMING_PATTERNS:
        assert len(re.findall(pat, err)) >= 2, f"{pat!r} not printed after each call:\n{err[-3000:]}"
    # The numbers printed are the Completion's.
    m = re.search(r"TIMINGS (\d+) (\d+)", proc.stdout)
    assert m
    prompt_n, predicted_n = int(m.group(1)), int(m.group(2))
    assert re.search(rf"prompt eval time\s*=\s*\d+\.\d+ ms /\s*{prompt_n} tokens", err)
    assert re.search(rf"(?<!prompt )eval time\s*=\s*\d+\.\d+ ms /\s*{predicted_n} runs", err)
    # llama.cpp's own log (model loading) is shown too when verbose.
    assert "llama_model_loader" in err or "llama_context" in err or "print_info" in err


def test_not_verbose_prints_nothing(run_python, smollm2_path):
    """llama.cpp writes from C: check the child's file descriptors 1 and 2."""
    code = textwrap.dedent(f"""
        import pyllama
        path = {str(smollm2_path)!r}
        with pyllama.LLM(path, n_ctx=512, n_threads=2, temperature=0) as llm:
            out = [llm.invoke("The capital of France is", max_tokens=4)]
            out.append("".join(llm.stream("Hello", max_tokens=4, seed=3, temperature=0.7)))
            out.append(llm.chat([{{"role": "user", "content": "Hi"}}], max_tokens=4).text)
            out += [c.text for c in llm.generate(["One", "Two, three"], max_tokens=3)]
            try:
                llm.invoke("x" * 5000)
                raise SystemExit("no ContextLengthError")
            except pyllama.ContextLengthError:
                pass
            from pyllama.grammar import grammar_path
            out.append(llm.invoke("JSON: ", grammar_path=grammar_path("json"), max_tokens=4))
            try:
                llm.invoke("x", grammar="root ::= (")
                raise SystemExit("no GrammarError")
            except pyllama.GrammarError:
                pass
        with pyllama.LLM(path, n_ctx=256, n_threads=2, embedding=True) as emb:
            emb.embed(["hello", "world"])
        import sys
        sys.stdout.write("DONE %d\\n" % len(out))
        """)
    proc = run_python(code, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == ""
    assert proc.stdout == "DONE 6\n", proc.stdout[-3000:]


# --------------------------------------------------------------------------- prompt cache


def test_prompt_cache_evaluates_only_new_part(smol):
    smol.reset()
    base = "The quick brown fox jumps over the lazy dog. " * 4
    c1 = smol.complete(base, max_tokens=2)
    assert c1.timings.cached_n == 0
    assert c1.timings.prompt_n == c1.prompt_tokens
    c2 = smol.complete(base + "Then the fox ran into the forest and", max_tokens=2)
    t = c2.timings
    assert t.cached_n > 0
    assert t.prompt_n < c2.prompt_tokens
    assert t.prompt_n + t.cached_n == c2.prompt_tokens
    assert t.cached_n >= c1.prompt_tokens - 1
    # The same prompt again: everything but the last token is reused.
    c3 = smol.complete(base + "Then the fox ran into the forest and", max_tokens=2)
    assert c3.timings.prompt_n == 1
    assert c3.text == c2.text
    # reset() forgets the cache.
    smol.reset()
    c4 = smol.complete(base, max_tokens=2)
    assert c4.timings.cached_n == 0
    assert c4.text == c1.text


# --------------------------------------------------------------------------- context limits


@pytest.fixture(scope="module")
def small_ctx(smollm2_path):
    llm = LLM(smollm2_path, n_ctx=64, n_threads=THREADS, temperature=0)
    yield llm
    llm.close()


def test_prompt_longer_than_context(small_ctx):
    n_ctx = small_ctx.n_ctx
    prompt = "hello world " * n_ctx
    n_prompt = len(small_ctx.tokenize(prompt))
    assert n_prompt > n_ctx
    for call in (small_ctx.invoke, small_ctx.complete, small_ctx.stream):
        with pytest.raises(ContextLengthError) as info:
            call(prompt, max_tokens=4)
        assert isinstance(info.value, ValueError)
        msg = str(info.value)
        assert str(n_prompt) in msg and str(n_ctx) in msg, msg
    # Still usable afterwards.
    assert small_ctx.complete("Hello", max_tokens=2).usage["completion_tokens"] == 2


def _long_prompt(llm, n_free: int) -> str:
    """A prompt that leaves about n_free cells of the context."""
    words = []
    while True:
        words.append("The robot painted a picture of the sea.")
        p = " ".join(words)
        if len(llm.tokenize(p)) >= llm.n_ctx - n_free:
            return p


@pytest.mark.parametrize("max_tokens", [-1, None])
def test_generation_fills_context(small_ctx, max_tokens):
    prompt = _long_prompt(small_ctx, 24)
    c = small_ctx.complete(prompt, ignore_eos=True, max_tokens=max_tokens)
    assert c.finish_reason == "length"
    n_ctx = small_ctx.n_ctx
    assert c.prompt_tokens + c.usage["completion_tokens"] <= n_ctx
    assert c.prompt_tokens + c.usage["completion_tokens"] >= n_ctx - 1
    assert c.usage["completion_tokens"] >= 10


def test_n_ctx_is_what_was_asked_or_padded(small_ctx):
    # llama.cpp pads the KV size up to a multiple of 256; n_ctx reports the real window.
    assert small_ctx.n_ctx >= 64
    assert small_ctx.n_ctx % 64 == 0


# --------------------------------------------------------------------------- parameters


def test_unknown_kwargs_at_construction(smollm2_path):
    with pytest.raises(TypeError, match="n_ctx"):
        LLM(smollm2_path, n_ctxx=128)
    with pytest.raises(TypeError, match="temperature"):
        LLM(smollm2_path, temprature=0.5)
    with pytest.raises(TypeError, match="n_gpu_layers"):
        LLM(smollm2_path, n_gpu_layer=1)


@pytest.mark.parametrize("method", ["invoke", "complete", "stream", "chat", "generate", "generate_stream"])
def test_unknown_kwargs_per_call(smol, method):
    arg = {"chat": [{"role": "user", "content": "hi"}], "generate": ["hi"], "generate_stream": ["hi"]}.get(method, "hi")
    with pytest.raises(TypeError, match="max_tokens") as info:
        getattr(smol, method)(arg, max_token=4)
    assert "max_token" in str(info.value)
    with pytest.raises(TypeError, match="top_p"):
        getattr(smol, method)(arg, top_pp=0.5)


def test_unknown_kwargs_per_prompt(smol):
    with pytest.raises(TypeError, match="temperature"):
        smol.generate(["a", "b"], per_prompt=[{}, {"temprature": 0.5}])


BAD_SAMPLING = [
    ("temperature", float("nan")),
    ("temperature", -0.5),
    ("top_p", 2.0),
    ("top_p", 0.0),
    ("max_tokens", -5),
    ("min_p", 1.5),
    ("top_k", -1),
    ("repeat_penalty", 0.0),
    ("mirostat_mode", 3),
    ("seed", -7),
    ("top_n_sigma", math.nan),
    ("xtc_probability", 1.5),
    ("xtc_threshold", -0.1),
    ("dynatemp_range", -1.0),
    ("dynatemp_exponent", math.inf),
    ("dry_multiplier", -0.5),
    ("dry_base", 0.5),
    ("dry_allowed_length", -1),
    ("dry_penalty_last_n", -2),
    ("dry_sequence_breakers", ["\n", ""]),
]


@pytest.mark.parametrize("name,value", BAD_SAMPLING)
def test_bad_sampling_values(smol, smollm2_path, name, value):
    with pytest.raises(ValueError):
        smol.invoke("hi", **{name: value})
    with pytest.raises(ValueError):
        smol.stream("hi", **{name: value})
    with pytest.raises(ValueError):
        smol.generate(["hi", "ho"], **{name: value})
    with pytest.raises(ValueError):
        LLM(smollm2_path, vocab_only=True, **{name: value})


@pytest.mark.parametrize("kwargs", [{"n_ctx": -1}, {"n_batch": 0}, {"n_ubatch": 0}, {"n_gpu_layers": -2},
                                    {"n_parallel": 0}])
def test_bad_load_values(smollm2_path, kwargs):
    with pytest.raises(ValueError):
        LLM(smollm2_path, **kwargs)


def test_bad_values_do_not_break_the_llm(smol):
    with pytest.raises(ValueError):
        smol.invoke("hi", temperature=-1)
    assert smol.complete("hi", max_tokens=2).usage["completion_tokens"] == 2


def test_f16_kv(smollm2_path):
    records = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("pyllama")
    handler = Grab(level=logging.DEBUG)
    old_logger_level, old_core_level = logger.level, _core.get_log_level()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    _core.set_log_level(logging.INFO)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with LLM(smollm2_path, n_ctx=128, n_threads=THREADS, f16_kv=True):
                pass
        kv_f16 = [r for r in records if "K (" in r]
        records.clear()
        with pytest.warns(DeprecationWarning, match="type_k"):
            with LLM(smollm2_path, n_ctx=128, n_threads=THREADS, f16_kv=False) as llm:
                assert llm.complete("Hi", max_tokens=2, temperature=0).usage["completion_tokens"] == 2
        kv_f32 = [r for r in records if "K (" in r]
    finally:
        _core.set_log_level(old_core_level)
        logger.removeHandler(handler)
        logger.setLevel(old_logger_level)
    assert kv_f16 and all("K (f16)" in r and "V (f16)" in r for r in kv_f16), kv_f16
    assert kv_f32 and all("K (f32)" in r and "V (f32)" in r for r in kv_f32), kv_f32


def test_n_gpu_layers_accepted_on_cpu(smollm2_path, smol, monkeypatch):
    """On this CPU build n_gpu_layers is accepted, warns that the model runs on the CPU (the
    warning points at the caller's line, not at pyllama), and the answer is the CPU answer."""
    from pyllama import gpu

    monkeypatch.setattr(gpu, "_warned", set())
    for ngl in (-1, 1, 99):
        with pytest.warns(RuntimeWarning, match=f"n_gpu_layers={ngl} .*runs on the CPU") as caught:
            llm = LLM(smollm2_path, n_ctx=256, n_threads=THREADS, n_gpu_layers=ngl, temperature=0)
        assert [w.filename for w in caught] == [__file__]
        with llm:
            assert llm.offload.n_offloaded == 0
            assert llm.invoke(STOP_PROMPT, max_tokens=6) == smol.invoke(STOP_PROMPT, max_tokens=6)


def test_greedy_default_overridden_per_call(smol):
    greedy = smol.invoke(SEED_PROMPT, max_tokens=12)
    assert smol.invoke(SEED_PROMPT, max_tokens=12) == greedy
    sampled = [smol.invoke(SEED_PROMPT, max_tokens=12, temperature=0.9, seed=s) for s in (1, 2, 3)]
    assert any(t != greedy for t in sampled)
    # Overrides do not stick.
    assert smol.invoke(SEED_PROMPT, max_tokens=12) == greedy
    assert smol.defaults.temperature == 0


def test_construction_defaults_equal_per_call(smollm2_path, smol):
    kw = dict(temperature=0.9, seed=7, top_k=20, top_p=0.9, min_p=0.02, repeat_penalty=1.1, max_tokens=10)
    with LLM(smollm2_path, n_ctx=256, n_threads=THREADS, **kw) as llm:
        assert llm.invoke(SEED_PROMPT) == smol.invoke(SEED_PROMPT, **kw)
        assert len(llm.complete(SEED_PROMPT).tokens) <= 10
        # and each default can be overridden per call
        assert llm.invoke(SEED_PROMPT, temperature=0, repeat_penalty=1.0) == smol.invoke(SEED_PROMPT, max_tokens=10)
        assert len(llm.complete(SEED_PROMPT, max_tokens=3).tokens) == 3


# One valid non-default value for every sampling parameter; each must be settable at
# construction and per call.
EVERY_PARAM = [
    ("temperature", 0.7), ("top_k", 5), ("top_p", 0.5), ("min_p", 0.1), ("typical_p", 0.9),
    ("repeat_penalty", 1.3), ("last_n_tokens_size", 16), ("frequency_penalty", 0.5), ("presence_penalty", 0.5),
    ("mirostat_mode", 2), ("mirostat_tau", 3.0), ("mirostat_eta", 0.2), ("seed", 42), ("max_tokens", 3),
    ("top_n_sigma", 1.5), ("xtc_probability", 0.5), ("xtc_threshold", 0.2), ("dynatemp_range", 0.3),
    ("dynatemp_exponent", 1.5), ("dry_multiplier", 0.8), ("dry_base", 2.0), ("dry_allowed_length", 3),
    ("dry_penalty_last_n", -1), ("dry_sequence_breakers", ("\n", "##")),
    ("stop", ["\n"]), ("stop_tokens", [2]), ("logit_bias", {2: -math.inf}), ("grammar", 'root ::= "yes" | "no"'),
    ("grammar_path", "json"), ("json_schema", {"type": "boolean"}), ("ignore_eos", True),
]


@pytest.mark.parametrize("name,value", EVERY_PARAM, ids=[p[0] for p in EVERY_PARAM])
def test_every_sampling_param_at_construction_and_per_call(smollm2_path, smol, name, value):
    if name == "grammar_path":
        value = _grammar_path(value)
    with LLM(smollm2_path, vocab_only=True, **{name: value}) as v:
        got = getattr(v.defaults, name)
        assert got == value or (name == "stop" and list(got) == value)
    kw = {name: value}
    kw.setdefault("max_tokens", 4)
    c = smol.complete(SEED_PROMPT, **kw)
    assert c.finish_reason in ("stop", "length", "eog")
    assert len(c.tokens) <= kw["max_tokens"]
    if name == "grammar":
        assert c.text in ("yes", "no")
    if name == "json_schema":
        assert json.loads(c.text) in (True, False)
    if name in ("stop_tokens", "logit_bias"):  # token 2 is SmolLM2's <|im_end|>
        assert 2 not in c.tokens
    if name == "max_tokens":
        assert len(c.tokens) == 3


def test_logit_bias_changes_greedy_choice(smol):
    c = smol.complete(STOP_PROMPT, max_tokens=1)
    first = c.tokens[0]
    c2 = smol.complete(STOP_PROMPT, max_tokens=1, logit_bias={first: -math.inf})
    assert c2.tokens[0] != first
    c3 = smol.complete(STOP_PROMPT, max_tokens=1, logit_bias={c2.tokens[0]: -math.inf})
    assert c3.tokens[0] == first


def test_stop_tokens_and_ignore_eos(smol):
    msgs = [{"role": "user", "content": "Say hi."}]
    c = smol.chat(msgs, max_tokens=48)
    assert c.finish_reason == "eog"
    n = len(c.tokens)
    c2 = smol.chat(msgs, max_tokens=n + 3, ignore_eos=True)
    assert c2.finish_reason == "length"
    assert len(c2.tokens) == n + 3
    assert c2.tokens[:n] == c.tokens
    c3 = smol.chat(msgs, max_tokens=48, stop_tokens=[c.tokens[1]])
    assert c3.finish_reason == "stop"
    assert c3.tokens == c.tokens[:2]


# --------------------------------------------------------------------------- tokens


ROUND_TRIP_TEXTS = ["Hello, world!", "  leading spaces and\ttabs\nnewlines", "émoji 🎉 and 你好世界", "x"]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokenize_detokenize_round_trip(any_llm, text):
    toks = any_llm.tokenize(text, add_special=False)
    assert toks and all(isinstance(t, int) for t in toks)
    assert any_llm.detokenize(toks) == text
    assert any_llm.tokenize(text.encode("utf-8"), add_special=False) == toks
    with_special = any_llm.tokenize(text, add_special=True)
    if any_llm.vocab.add_bos:
        assert with_special == [any_llm.vocab.bos] + toks
        assert any_llm.detokenize(with_special, remove_special=True) == text
    else:
        assert with_special == toks


def test_tokenize_parse_special(smol):
    assert smol.tokenize("<|im_start|>", add_special=False, parse_special=True) == [smol.vocab.bos]
    assert len(smol.tokenize("<|im_start|>", add_special=False, parse_special=False)) > 1


def test_prompt_as_token_ids(smol):
    toks = smol.tokenize(STOP_PROMPT)
    assert smol.invoke(toks, max_tokens=6) == smol.invoke(STOP_PROMPT, max_tokens=6)
    with pytest.raises(ValueError):
        smol.invoke([smol.vocab.n_tokens + 5], max_tokens=2)
    with pytest.raises(ValueError):
        smol.invoke("", max_tokens=2)


# --------------------------------------------------------------------------- lifecycle


def test_context_manager_closes(smollm2_path):
    with LLM(smollm2_path, n_ctx=128, n_threads=THREADS, temperature=0) as llm:
        assert llm.invoke("Hi", max_tokens=2)
    for call in (lambda: llm.invoke("Hi"), lambda: llm.complete("Hi"), lambda: llm.stream("Hi"),
                 lambda: llm.chat([{"role": "user", "content": "Hi"}]), lambda: llm.generate(["a", "b"]),
                 lambda: llm.tokenize("Hi"), lambda: llm.detokenize([1]), lambda: llm.reset(),
                 lambda: llm.n_ctx):
        with pytest.raises(ValueError, match="closed"):
            call()
    llm.close()  # idempotent
    assert "closed" in repr(llm)


def test_close_while_streaming(smollm2_path):
    llm = LLM(smollm2_path, n_ctx=128, n_threads=THREADS, temperature=0)
    it = llm.stream("Once upon a time", max_tokens=8)
    next(it)
    llm.close()
    with pytest.raises(ValueError, match="closed"):
        list(it)


def test_unclosed_llm_warns(smollm2_path):
    import gc

    llm = LLM(smollm2_path, n_ctx=128, n_threads=THREADS)
    with pytest.warns(ResourceWarning):
        del llm
        gc.collect()


# --------------------------------------------------------------------------- embeddings


@pytest.fixture(scope="module")
def embedder(smollm2_path):
    llm = LLM(smollm2_path, n_ctx=256, n_threads=THREADS, embedding=True)
    yield llm
    llm.close()


def test_embed(embedder):
    texts = ["The cat sat on the mat.", "A dog barked.", "The cat sat on the mat."]
    e = embedder.embed(texts)
    n_embd = embedder.model.n_embd
    assert isinstance(e, np.ndarray)
    assert e.shape == (3, n_embd) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert np.all(np.isfinite(e))
    # deterministic, and independent of the other texts in the batch
    again = embedder.embed(texts)
    np.testing.assert_allclose(e, again, atol=1e-5)
    np.testing.assert_allclose(e[0], e[2], atol=1e-5)
    alone = embedder.embed(texts[1])
    assert alone.shape == (n_embd,)
    np.testing.assert_allclose(alone, e[1], atol=1e-4)
    # similar texts are closer than different ones
    sim = embedder.embed(["The cat sat on a mat."])[0]
    assert float(sim @ e[0]) > float(sim @ e[1])
    raw = embedder.embed(texts[:1], normalize=False)
    assert np.linalg.norm(raw[0]) > 0
    assert embedder.embed([]).shape == (0, n_embd)


def test_embed_needs_embedding_true(smol):
    with pytest.raises(ValueError, match="embedding=True"):
        smol.embed(["hi"])


# --------------------------------------------------------------------------- Completion


def test_completion_fields(smol):
    c = smol.complete(STOP_PROMPT, max_tokens=8)
    assert c.finish_reason == "length"
    assert c.prompt_tokens == len(smol.tokenize(STOP_PROMPT))
    assert len(c.tokens) == 8 == c.usage["completion_tokens"]
    assert c.usage == {"prompt_tokens": c.prompt_tokens, "completion_tokens": 8, "total_tokens": c.prompt_tokens + 8,
                       "prompt_tokens_details": {"cached_tokens": c.timings.cached_n}}
    assert smol.detokenize(c.tokens) == c.text
    assert str(c) == c.text
    t = c.timings
    assert t.prompt_n + t.cached_n == c.prompt_tokens
    assert t.predicted_n >= 7 and t.sample_n >= 8
    assert t.total_ms > 0 and t.predicted_ms > 0 and t.sample_ms >= 0
    assert t.total_ms >= t.predicted_ms
    assert t.predicted_per_second > 0
    d = t.as_dict()
    assert d["predicted_n"] == t.predicted_n and t["prompt_n"] == t.prompt_n
    for line in ("load time", "prompt eval time", "eval time", "total time"):
        assert line in t.format()


def test_cache_prompt_per_call(smol):
    """A repeated prompt reuses the slot's cached prefix unless the call says
    cache_prompt=False (llama-server's per-request field); both give the same tokens."""
    prompt = STOP_PROMPT + " Tell me more about it."
    first = smol.complete(prompt, max_tokens=4, temperature=0)
    cached = smol.complete(prompt, max_tokens=4, temperature=0)
    fresh = smol.complete(prompt, max_tokens=4, temperature=0, cache_prompt=False)
    assert cached.timings.cached_n == first.prompt_tokens - 1   # all but the last token reused
    assert fresh.timings.cached_n == 0 and fresh.timings.prompt_n == fresh.prompt_tokens
    assert fresh.tokens == cached.tokens == first.tokens
    with pytest.raises(TypeError, match="cache_prompt"):
        smol.complete(prompt, cache_prompt="no")


def test_finish_reasons(smol):
    eog = smol.chat([{"role": "user", "content": "Say hi."}], max_tokens=48)
    assert eog.finish_reason == "eog"
    assert eog.usage["completion_tokens"] == len(eog.tokens) > 0
    assert smol.vocab.eos not in eog.tokens and not any(smol.vocab.is_eog(t) for t in eog.tokens)
    length = smol.complete(STOP_PROMPT, max_tokens=3)
    assert length.finish_reason == "length" and len(length.tokens) == 3
    stop = smol.complete(STOP_PROMPT, max_tokens=16, stop=["."])
    assert stop.finish_reason == "stop" and "." not in stop.text
    assert stop.usage["completion_tokens"] == len(stop.tokens)


def test_call_is_invoke(smol):
    assert smol(STOP_PROMPT, max_tokens=5) == smol.invoke(STOP_PROMPT, max_tokens=5)



def test_metrics_count_cached_prompt_tokens_and_the_longest_sequence(tiny_model_path):
    """llama-server's prompt_tokens_cached_total and n_tokens_max, from the calls' timings."""
    with pyllama.LLM(tiny_model_path, n_ctx=512, n_threads=1, verbose=False) as llm:
        prompt = "Once upon a time there was a model"
        first = llm.complete(prompt, max_tokens=6, temperature=0, ignore_eos=True)
        again = llm.complete(prompt, max_tokens=9, temperature=0, ignore_eos=True)   # same prefix: cached
        assert first.timings.cached_n == 0 and again.timings.cached_n > 0
        m = llm.metrics()
        assert m["prompt_tokens_cached_total"] == again.timings.cached_n
        n_prompt = len(llm.tokenize(prompt))
        # llama-server's n_tokens_max is the longest slot content: the prompt and every answer
        # token but the last (sampled, never fed back), which is what predicted_n counts.
        assert len(again.tokens) == 9 and again.timings.predicted_n == 8
        assert m["n_tokens_max"] == n_prompt + 8
        assert m["prompt_tokens_total"] == first.timings.prompt_n + again.timings.prompt_n
        # tokens_predicted_total counts the sampled tokens, as llama-server's (not decode steps)
        assert m["tokens_predicted_total"] == 6 + 9


def test_metrics_count_embedding_decodes(tiny_model_path):
    """llama-server counts an embedding's prompt tokens and its decode; nothing is predicted."""
    with pyllama.LLM(tiny_model_path, n_ctx=512, n_threads=1, embedding=True, verbose=False) as llm:
        llm.embed(["hello world", "goodbye world"])
        m = llm.metrics()
        n = len(llm.tokenize("hello world")) + len(llm.tokenize("goodbye world"))
        assert m["prompt_tokens_total"] == n and m["n_decode_total"] >= 1 and m["tokens_predicted_total"] == 0
