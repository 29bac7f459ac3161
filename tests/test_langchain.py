"""LangChain integration (pyllama.integrations.langchain) with real langchain-core and SmolLM2.

Skipped (with the reason) only when langchain-core is not installed: pip install "pyllama[langchain]".

One model load for the in-process tests (the module-scoped ``client``, shared through
``client=``); the LangChain "Llama.cpp" page's examples run verbatim but for the import line
(and a small max_tokens) in a subprocess, so that their verbose=True logging stays there.
"""

from __future__ import annotations

import asyncio
import json
import re
import textwrap
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("langchain_core", reason="langchain-core is not installed (pip install 'pyllama[langchain]')")

import numpy as np  # noqa: E402
from langchain_core.callbacks import (AsyncCallbackHandler, CallbackManager,  # noqa: E402
                                      StreamingStdOutCallbackHandler)
from langchain_core.language_models.chat_models import BaseChatModel  # noqa: E402
from langchain_core.language_models.llms import LLM as LangChainLLM  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage  # noqa: E402
from langchain_core.prompts import PromptTemplate  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

import pyllama  # noqa: E402
from pyllama.errors import GrammarError  # noqa: E402
from pyllama.integrations.langchain import (ChatLlamaCpp, IgnoredFieldWarning, LlamaCpp,  # noqa: E402
                                            LlamaCppEmbeddings, PyLlama)

pytestmark = pytest.mark.model

THREADS = 2
MISSING_MODEL = "/nonexistent/dir/model.gguf"   # loading it would raise FileNotFoundError

PAGE_TEMPLATE = """Question: {question}

Answer: Let's work this out in a step by step way to be sure we have the right answer."""


@pytest.fixture(scope="module")
def client(smollm2_path):
    """The one model load of this module (embedding=True, so the embeddings class can share it)."""
    llm = pyllama.LLM(str(smollm2_path), n_ctx=512, n_threads=THREADS, embedding=True)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def llm(client):
    return LlamaCpp(client=client, temperature=0, max_tokens=8)


@pytest.fixture(scope="module")
def chat(client):
    return ChatLlamaCpp(client=client, temperature=0, max_tokens=48)


# --------------------------------------------------------------------------- the page's examples


def test_page_examples_verbatim(run_python, smollm2_path):
    """The "Llama.cpp" page's code with only the import changed (model path, max_tokens and
    temperature adapted): tokens stream to stdout through callback_manager, the timing lines
    follow each call (verbose=True), prompt | llm works, json.gbnf / list.gbnf give JSON."""
    code = textwrap.dedent(f"""
        import json, sys, warnings
        sys.stderr = sys.stdout            # (test only) one stream, to check the order
        warnings.simplefilter("ignore", DeprecationWarning)

        from pyllama.integrations.langchain import LlamaCpp   # was: from langchain_community.llms import LlamaCpp
        from langchain_core.callbacks import CallbackManager, StreamingStdOutCallbackHandler
        from langchain_core.prompts import PromptTemplate
        import pyllama

        def mark(tag, value=None):
            print("\\n@@" + tag + "@@" + ("" if value is None else json.dumps(value)), flush=True)

        template = {PAGE_TEMPLATE!r}
        prompt = PromptTemplate.from_template(template)
        callback_manager = CallbackManager([StreamingStdOutCallbackHandler()])

        llm = LlamaCpp(
            model_path={str(smollm2_path)!r},
            temperature=0.75,
            max_tokens=6,
            top_p=1,
            callback_manager=callback_manager,
            verbose=True,  # Verbose is required to pass to the callback manager
            n_threads={THREADS},
        )
        question = '''
        Question: A rap battle between Stephen Colbert and John Oliver
        '''
        mark("BEGIN1")
        out = llm.invoke(question)
        mark("END1", out)

        llm_chain = prompt | llm
        question = "What NFL team won the Super Bowl in the year Justin Bieber was born?"
        mark("BEGIN2")
        out = llm_chain.invoke({{"question": question}})
        mark("END2", out)

        n_gpu_layers = 1
        n_batch = 512
        llm = LlamaCpp(
            model_path={str(smollm2_path)!r},
            n_gpu_layers=n_gpu_layers,
            n_batch=n_batch,
            f16_kv=True,  # MUST set to True, otherwise you will run into problem after a couple of calls
            callback_manager=callback_manager,
            verbose=True,
            grammar_path=pyllama.grammar_path("json"),
            temperature=0, max_tokens=64, n_threads={THREADS},
        )
        mark("BEGIN3")
        result = llm.invoke("Describe a person in JSON format:")
        mark("END3", result)

        llm = LlamaCpp(
            model_path={str(smollm2_path)!r},
            n_gpu_layers=n_gpu_layers,
            n_batch=n_batch,
            f16_kv=True,
            callback_manager=callback_manager,
            verbose=True,
            grammar_path=pyllama.grammar_path("list"),
            temperature=0, max_tokens=48, n_threads={THREADS},
        )
        mark("BEGIN4")
        result = llm.invoke("List of top-3 my favourite books:")
        mark("END4", result)
        """)
    proc = run_python(code, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, (out[-3000:], proc.stderr[-3000:])
    results = {}
    for n in (1, 2, 3, 4):
        m = re.search(rf"\n@@BEGIN{n}@@\n(.*?)\n@@END{n}@@([^\n]*)\n", out, re.S)
        assert m, f"call {n} missing:\n{out[-3000:]}"
        segment, result = m.group(1), json.loads(m.group(2))
        results[n] = result
        # Calls 1 and 2 sample (temperature 0.75, no seed, as the page has them): an answer that
        # is an end-of-generation token at once is a valid sample there (~1% of runs with the
        # page's prompt and SmolLM2, measured); the greedy calls 3 and 4 must answer.
        assert result or n in (1, 2), f"call {n} generated nothing"
        # the tokens went to stdout as they came (StreamingStdOutCallbackHandler) ...
        at = segment.find(result)
        assert at >= 0, (n, segment[:1000], result)
        # ... and llama.cpp's timing lines come after them (verbose=True)
        timings = segment[at + len(result):]
        for line in ("load time", "sampling time", "prompt eval time", "eval time", "total time"):
            assert re.search(rf"llama_perf_\w+_print:\s+{line}\s+=\s+\d+\.\d+ ms", timings), (n, line, timings)
    assert isinstance(json.loads(results[3]), dict), results[3]
    value = json.loads(results[4])
    assert isinstance(value, list) and value and all(isinstance(v, str) for v in value), results[4]


def test_callback_manager_streams_to_stdout(client, capsys):
    with pytest.warns(DeprecationWarning, match="callback_manager"):
        llm = LlamaCpp(client=client, temperature=0, max_tokens=8, top_p=1,
                       callback_manager=CallbackManager([StreamingStdOutCallbackHandler()]))
    assert any(isinstance(h, StreamingStdOutCallbackHandler) for h in llm.callbacks)
    capsys.readouterr()
    result = llm.invoke("The capital of France is")
    out = capsys.readouterr().out
    assert result and out == result


def test_prompt_pipe_llm(llm):
    prompt = PromptTemplate.from_template(PAGE_TEMPLATE)
    chain = prompt | llm
    question = "What is two plus two?"
    got = chain.invoke({"question": question})
    assert isinstance(got, str) and got
    assert got == llm.invoke(PAGE_TEMPLATE.format(question=question))   # greedy: the same text


# --------------------------------------------------------------------------- LLM behaviour


def test_is_a_langchain_llm_with_community_fields_and_defaults():
    assert PyLlama is LlamaCpp and issubclass(LlamaCpp, LangChainLLM)
    assert issubclass(ChatLlamaCpp, BaseChatModel)
    community = ("model_path lora_base lora_path n_ctx n_parts seed f16_kv logits_all vocab_only use_mlock "
                 "n_threads n_batch n_gpu_layers suffix max_tokens temperature top_p logprobs echo stop "
                 "repeat_penalty top_k last_n_tokens_size use_mmap rope_freq_scale rope_freq_base model_kwargs "
                 "streaming grammar_path grammar verbose client").split()
    for cls in (LlamaCpp, ChatLlamaCpp):
        missing = [f for f in community if f not in cls.model_fields]
        assert not missing, (cls.__name__, missing)
    f = LlamaCpp.model_fields
    expected = dict(temperature=0.8, top_p=0.95, max_tokens=256, repeat_penalty=1.1, top_k=40,
                    last_n_tokens_size=64, n_ctx=512, streaming=True, rope_freq_base=0.0, rope_freq_scale=0.0,
                    n_batch=512)
    for name, value in expected.items():
        assert f[name].default == value, name


def test_llm_type_params_and_tokens(llm, client):
    assert llm._llm_type == "pyllama"
    params = llm._identifying_params
    assert params["model_path"] == client.model_path and params["max_tokens"] == 8
    text = "The quick brown fox jumps over the lazy dog."
    assert llm.get_token_ids(text) == client.tokenize(text)
    assert llm.get_num_tokens(text) == len(client.tokenize(text))


def test_invoke_overrides_stop_echo_suffix(llm):
    prompt = "Count: 1, 2, 3,"
    plain = llm.invoke(prompt, max_tokens=4)
    assert llm.invoke(prompt, max_tokens=4, echo=True, suffix="<END>") == prompt + plain + "<END>"
    stopped = llm.invoke(prompt, max_tokens=4, stop=[","])
    assert "," not in stopped and plain.startswith(stopped)
    with pytest.raises(TypeError, match="no_such_option"):
        llm.invoke(prompt, no_such_option=1)


def _record_calls(monkeypatch, client, method: str) -> list:
    """The first argument (as a list) of every call of client.<method> from now on."""
    calls = []
    real = getattr(client, method)

    def spy(items, **kw):
        calls.append(list(items))
        return real(items, **kw)

    monkeypatch.setattr(client, method, spy)
    return calls


def test_batch_is_one_batched_call(llm, client, monkeypatch):
    calls = _record_calls(monkeypatch, client, "generate")
    prompts = ["The capital of France is", "Water boils at", "One, two,"]
    out = llm.batch(prompts, max_tokens=4)
    assert len(calls) == 1 and calls[0] == prompts
    assert len(out) == 3 and all(isinstance(t, str) and t for t in out)
    res = llm.generate(prompts[:2], max_tokens=2)
    assert [g[0].generation_info["finish_reason"] for g in res.generations] == ["length", "length"]
    assert res.llm_output["token_usage"]["completion_tokens"] == 4


def test_stream_resumed_on_different_threads(llm):
    """LangChain's own async fallbacks resume a sync generator on pool threads: ours copes."""
    prompt = "The capital of France is"
    expected = llm.invoke(prompt)
    it = llm.stream(prompt)
    pieces = []
    threads = set()
    pools = [ThreadPoolExecutor(max_workers=1), ThreadPoolExecutor(max_workers=1)]
    try:
        for k in range(1000):
            piece, ident = pools[k % 2].submit(lambda: (next(it, None), threading.get_ident())).result()
            if piece is None:
                break
            pieces.append(piece)
            threads.add(ident)
    finally:
        for pool in pools:
            pool.shutdown()
    assert len(threads) == 2
    assert "".join(pieces) == expected


class _Collect(AsyncCallbackHandler):
    def __init__(self) -> None:
        self.tokens = []

    async def on_llm_new_token(self, token, **kwargs):
        self.tokens.append(token)


def test_ainvoke_astream_do_not_block_the_loop(llm):
    prompt = "Once upon a time"

    async def main():
        ticks = 0
        done = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not done.is_set():
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.create_task(ticker())
        try:
            # an early exit cancels the generation and leaves the model usable
            stream = llm.astream(prompt, max_tokens=200)
            async for _ in stream:
                break
            await stream.aclose()
            handler = _Collect()
            text = await llm.ainvoke(prompt, config={"callbacks": [handler]})
            ticks_during_invoke = ticks
            chunks = [c async for c in llm.astream(prompt)]
        finally:
            done.set()
            await t
        return text, handler.tokens, chunks, ticks_during_invoke

    t0 = time.perf_counter()
    text, tokens, chunks, ticks = asyncio.run(main())
    assert time.perf_counter() - t0 < 600
    assert text and "".join(tokens) == text      # streaming=True: every piece reached the handler
    assert len(chunks) > 1 and "".join(chunks) == text
    assert ticks >= 3, "the event loop was blocked while generating"
    assert llm.invoke(prompt) == text


def test_abatch(llm):
    out = asyncio.run(llm.abatch(["The capital of France is", "Water boils at"], max_tokens=3))
    assert len(out) == 2 and all(isinstance(t, str) and t for t in out)


# --------------------------------------------------------------------------- construction checks


def test_grammar_and_grammar_path_is_an_error_before_loading():
    with pytest.raises(ValueError, match="one of grammar and grammar_path"):
        LlamaCpp(model_path=MISSING_MODEL, grammar='root ::= "a"', grammar_path=pyllama.grammar_path("json"))
    with pytest.raises(ValueError, match="one of grammar and grammar_path"):
        ChatLlamaCpp(model_path=MISSING_MODEL, grammar='root ::= "a"', grammar_path=pyllama.grammar_path("json"))


def test_bad_grammar_is_an_error_before_loading(tmp_path):
    with pytest.raises(GrammarError, match="line 1"):
        LlamaCpp(model_path=MISSING_MODEL, grammar='root ::= "a" | (')
    with pytest.raises(GrammarError):
        LlamaCpp(model_path=MISSING_MODEL, grammar="root ::= undefined-rule")
    bad = tmp_path / "bad.gbnf"
    bad.write_text("root ::= [a-\n")
    with pytest.raises(GrammarError, match="bad.gbnf"):
        LlamaCpp(model_path=MISSING_MODEL, grammar_path=str(bad))
    with pytest.raises(FileNotFoundError):
        LlamaCpp(model_path=MISSING_MODEL, grammar_path=str(tmp_path / "missing.gbnf"))
    # a good grammar passes the checks; only then is the (missing) model looked for
    with pytest.raises(FileNotFoundError):
        LlamaCpp(model_path=MISSING_MODEL, grammar_path=pyllama.grammar_path("json"))


def test_grammar_checked_against_a_given_client(client):
    from pyllama.grammar import load_grammar

    llm = LlamaCpp(client=client, grammar_path=pyllama.grammar_path("list"), max_tokens=4, temperature=0)
    assert llm._grammar_text == load_grammar(grammar_path=pyllama.grammar_path("list"))
    with pytest.raises(GrammarError):
        LlamaCpp(client=client, grammar='root ::= "a" | (')


@pytest.mark.parametrize("field,value", [("n_parts", 2), ("lora_base", "base.gguf"), ("logits_all", True),
                                         ("logprobs", 5)])
def test_obsolete_fields_warn(client, field, value):
    with pytest.warns(IgnoredFieldWarning, match=field) as rec:
        LlamaCpp(client=client, **{field: value})
    assert rec[0].filename == __file__   # the warning points at the caller


def test_unknown_fields_warn_and_go_to_model_kwargs(client, smollm2_path):
    with pytest.warns(IgnoredFieldWarning, match="min_p"):
        llm = LlamaCpp(client=client, min_p=0.1)
    assert llm.model_kwargs == {"min_p": 0.1}
    # an unknown name that pyllama.LLM does not know either fails loudly, before loading
    with pytest.warns(IgnoredFieldWarning, match="no_such_option"):
        with pytest.raises(TypeError, match="no_such_option"):
            LlamaCpp(model_path=str(smollm2_path), no_such_option=1)


def test_load_fields_with_client_warn(client):
    with pytest.warns(IgnoredFieldWarning, match="n_ctx"):
        LlamaCpp(client=client, n_ctx=2048)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LlamaCpp(client=client, temperature=0.1, max_tokens=3, stop=["\n"], streaming=False)


def test_needs_model_path_or_client():
    with pytest.raises(ValueError, match="model_path"):
        LlamaCpp()
    with pytest.raises(TypeError, match="pyllama.LLM"):
        LlamaCpp(client=object())


# --------------------------------------------------------------------------- chat


def test_chat_invoke_stream_and_stop(chat):
    msgs = [SystemMessage("You count."), HumanMessage("Count from 1 to 5, separated by commas.")]
    full = chat.invoke(msgs, max_tokens=8)
    assert isinstance(full, AIMessage) and full.content
    assert full.usage_metadata["output_tokens"] > 0
    assert full.response_metadata["finish_reason"] in ("length", "eog", "stop")
    chunks = list(chat.stream(msgs, max_tokens=8))
    assert "".join(c.content for c in chunks) == full.content
    stopped = chat.invoke(msgs, max_tokens=8, stop=[","])
    assert "," not in stopped.content and full.content.startswith(stopped.content)


def test_chat_astream(chat):
    async def main():
        return [c async for c in chat.astream("Say hello.", max_tokens=6)]

    chunks = asyncio.run(main())
    assert "".join(c.content for c in chunks) == chat.invoke("Say hello.", max_tokens=6).content


class Person(BaseModel):
    """A person mentioned in the text."""

    name: str = Field(max_length=16, description="first name")
    age: int = Field(ge=0, le=150)


def test_structured_output_gives_a_validated_pydantic_object(chat):
    got = chat.with_structured_output(Person).invoke("Alice is 30 years old. Give her name and age.")
    assert isinstance(got, Person)
    assert got.name and 0 <= got.age <= 150


def test_structured_output_include_raw_and_dict_schema(chat):
    schema = {"title": "answer", "type": "object",
              "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}}, "required": ["answer"]}
    got = chat.with_structured_output(schema, include_raw=True).invoke("Is the sky blue? Answer yes or no.")
    assert isinstance(got["raw"], AIMessage) and got["parsing_error"] is None
    assert got["parsed"] in ({"answer": "yes"}, {"answer": "no"})


class GetWeather(BaseModel):
    """Get the current weather in a city."""

    city: str = Field(max_length=20, description="the city name")


class GetTime(BaseModel):
    """Get the current time in a time zone."""

    timezone: str = Field(max_length=20)


def test_tool_call_is_well_formed(chat):
    msg = chat.bind_tools([GetWeather, GetTime], tool_choice="GetWeather").invoke("What is the weather in Paris?")
    assert isinstance(msg, AIMessage) and not msg.invalid_tool_calls
    assert len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert call["name"] == "GetWeather" and call["type"] == "tool_call"
    assert isinstance(call["id"], str) and call["id"]
    assert isinstance(call["args"], dict) and set(call["args"]) == {"city"} and isinstance(call["args"]["city"], str)
    GetWeather(**call["args"])
    # the call can be sent back with its result, and rendered by the model's template
    from pyllama.integrations.langchain.chat_models import _message_dict

    convo = [HumanMessage("What is the weather in Paris?"), msg,
             ToolMessage("sunny, 21 C", tool_call_id=call["id"])]
    rendered = chat.client.render_chat([_message_dict(m) for m in convo])
    assert "sunny, 21 C" in rendered


def test_bind_tools_checks_tool_choice(chat):
    with pytest.raises(ValueError, match="Nope"):
        chat.bind_tools([GetWeather], tool_choice="Nope")
    for choice in ("auto", "any", "required", True, None, "none", {"type": "function", "function": {"name": "GetWeather"}}):
        chat.bind_tools([GetWeather], tool_choice=choice)


# --------------------------------------------------------------------------- embeddings


def test_embeddings_shape_batched_and_deterministic(client, monkeypatch):
    emb = LlamaCppEmbeddings(client=client)
    calls = _record_calls(monkeypatch, client, "embed")
    texts = ["The cat sat on the mat.", "A dog barked.", "Stock prices fell today."]
    docs = emb.embed_documents(texts)
    assert len(calls) == 1 and calls[0] == texts
    n_embd = client.model.n_embd
    assert len(docs) == 3 and all(len(v) == n_embd for v in docs)
    assert all(isinstance(x, float) for x in docs[0])
    again = emb.embed_documents(texts)
    np.testing.assert_allclose(np.array(docs), np.array(again), atol=1e-5)
    query = emb.embed_query(texts[1])
    assert len(query) == n_embd
    np.testing.assert_allclose(query, docs[1], atol=1e-4)
    assert abs(np.linalg.norm(query) - 1.0) < 1e-4
    assert emb.embed_documents([]) == []
    got = asyncio.run(emb.aembed_documents(texts[:1]))
    np.testing.assert_allclose(got[0], docs[0], atol=1e-4)


def test_embeddings_need_an_embedding_client(smollm2_path):
    with pyllama.LLM(str(smollm2_path), vocab_only=True) as vocab_only:
        with pytest.raises(TypeError, match="embedding=True"):
            LlamaCppEmbeddings(client=vocab_only)
