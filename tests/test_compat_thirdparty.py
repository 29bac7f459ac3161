"""Libraries built on llama-cpp-python, unchanged, running on pyllama (issue 24).

The real packages from the registry - langchain-community (``LlamaCpp``, ``ChatLlamaCpp``,
``LlamaCppEmbeddings``), llama-index-llms-llama-cpp (``LlamaCPP``), outlines
(``from_llamacpp``) and instructor (``patch(create=llm.create_chat_completion_openai_v1)``) -
import ``llama_cpp``; after ``pyllama.install_as_llama_cpp()`` that name is pyllama's
compatibility package, and their code runs on pyllama's engine.

Each library runs in its own interpreter (a script through ``run_python_subprocess``, killed
after a timeout), so the ``llama_cpp`` alias never reaches this process or other test files.
A script runs every step of its library, records each step's value or traceback, and prints
one JSON line; the tests below assert on that record, one test per step.  The model is the
real SmolLM2-135M-Instruct at temperature 0 with a few tokens (the embeddings use a tiny
random-weight BERT, the architecture of bge and all-MiniLM).

Skipped (with the reason) when one of those packages is not installed; scripts/test.sh
installs them (llama-index-llms-llama-cpp with ``--no-deps``: it requires llama-cpp-python).
"""

from __future__ import annotations

import importlib.util
import json
import os
import textwrap
from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import run_python_subprocess

pytestmark = pytest.mark.model

THREADS = 2
TIMEOUT = 240  # seconds per library script (each loads its library and the 135M model once)

# The importable module of each library and the package that provides it.
LIBRARIES = {
    "langchain_community": "langchain-community",
    "llama_index.llms.llama_cpp": "llama-index-llms-llama-cpp",
    "outlines": "outlines (and numba)",
    "numba": "numba",
    "instructor": "instructor",
}


def _require(*modules: str) -> None:
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            pytest.skip(f"{LIBRARIES.get(module, module)} is not installed (scripts/test.sh installs it)")


# Runs first in every script: the alias, the model paths, and the step recorder.
PRELUDE = '''
import json, os, sys, tempfile, traceback

import pyllama

pyllama.install_as_llama_cpp()

import llama_cpp

MODEL = os.environ["COMPAT_MODEL"]
BERT = os.environ["COMPAT_BERT"]
THREADS = int(os.environ["COMPAT_THREADS"])
WORKDIR = os.environ["COMPAT_WORKDIR"]
RESULTS = {"_llama_cpp": llama_cpp.Llama.__module__}


def step(name):
    """Run the decorated function now; record its value, or its traceback, under `name`."""
    def run(fn):
        try:
            RESULTS[name] = {"ok": True, "value": fn()}
        except BaseException as exc:  # a failing step must not hide the others
            RESULTS[name] = {"ok": False, "error": "".join(traceback.format_exception(exc))[-4000:]}
        return fn
    return run
'''

EPILOGUE = '''
print("RESULT " + json.dumps(RESULTS, default=repr), flush=True)
'''

SCRIPTS: dict[str, str] = {}

SCRIPTS["langchain_llm"] = '''
from langchain_community.llms import LlamaCpp
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import PromptTemplate

PROMPT = "Q: What is the capital of France?\\nA:"
llm = LlamaCpp(model_path=MODEL, temperature=0, max_tokens=10, n_threads=THREADS, verbose=False)


@step("invoke")
def _():
    return llm.invoke(PROMPT)


@step("stream")
def _():
    chunks = list(llm.stream(PROMPT))
    return {"chunks": chunks, "invoke": llm.invoke(PROMPT)}


@step("chain")
def _():
    chain = PromptTemplate.from_template("Q: {question}\\nA:") | llm | StrOutputParser()
    return chain.invoke({"question": "What is two plus two?"})


@step("batch")  # LangChain runs these on a thread pool: concurrent calls on one Llama
def _():
    return llm.batch(["The sky is", "Water is", "Paris is"])


@step("stop")
def _():
    return llm.invoke("Count with me: 1, 2, 3, 4,", stop=[","])


@step("get_num_tokens")
def _():
    return {"n": llm.get_num_tokens("Hello world"), "tokens": llm.client.tokenize(b"Hello world")}


@step("grammar")
def _():
    constrained = LlamaCpp(model_path=MODEL, grammar='root ::= "yes" | "no"', temperature=0, max_tokens=4,
                           n_threads=THREADS, verbose=False)
    return [constrained.invoke("Is the sky blue? Answer yes or no.\\nAnswer:"),
            constrained.invoke("Is fire cold? Answer yes or no.\\nAnswer:")]


@step("grammar_path")
def _():
    path = os.path.join(WORKDIR, "colour.gbnf")
    with open(path, "w") as f:
        f.write('root ::= colour ("," " "? colour)*\\ncolour ::= "red" | "green" | "blue"\\n')
    constrained = LlamaCpp(model_path=MODEL, grammar_path=path, temperature=0, max_tokens=8,
                           n_threads=THREADS, verbose=False)
    return constrained.invoke("Name some colours of the rainbow:")
'''

SCRIPTS["langchain_chat"] = '''
from langchain_community.chat_models import ChatLlamaCpp
from pydantic import BaseModel, Field

MESSAGES = [("system", "You are a helpful assistant. Answer in one short sentence."),
            ("human", "What is the capital of France?")]
chat = ChatLlamaCpp(model_path=MODEL, temperature=0, max_tokens=48, n_ctx=1024, n_threads=THREADS, verbose=False)


class GetWeather(BaseModel):
    """Get the current weather in a city."""

    city: str = Field(description="The name of the city", max_length=24)


class Capital(BaseModel):
    """A country and its capital."""

    country: str = Field(max_length=24)
    capital: str = Field(max_length=24)


@step("invoke")
def _():
    msg = chat.invoke(MESSAGES)
    return {"type": type(msg).__name__, "content": msg.content,
            "finish_reason": msg.response_metadata.get("finish_reason")}


@step("stream")
def _():
    chunks = [chunk.content for chunk in chat.stream(MESSAGES)]
    return {"chunks": chunks, "invoke": chat.invoke(MESSAGES).content}


@step("bind_tools")
def _():
    forced = chat.bind_tools([GetWeather], tool_choice={"type": "function", "function": {"name": "GetWeather"}})
    msg = forced.invoke("What is the weather like in Paris today?")
    return {"tool_calls": msg.tool_calls, "invalid_tool_calls": msg.invalid_tool_calls}


@step("with_structured_output")
def _():
    answer = chat.with_structured_output(Capital).invoke("Paris is the capital of which country?")
    return {"type": type(answer).__name__, "value": answer.model_dump()}


@step("grammar")
def _():
    constrained = ChatLlamaCpp(model_path=MODEL, grammar='root ::= "yes" | "no"', temperature=0, max_tokens=4,
                               n_threads=THREADS, verbose=False)
    return constrained.invoke([("human", "Is the sky blue? Answer yes or no.")]).content
'''

SCRIPTS["langchain_embeddings"] = '''
from langchain_community.embeddings import LlamaCppEmbeddings

emb = LlamaCppEmbeddings(model_path=BERT, n_threads=THREADS, verbose=False)


@step("embed_documents")
def _():
    return emb.embed_documents(["hello world", "a completely different sentence"])


@step("embed_query")
def _():
    return {"query": emb.embed_query("hello world"), "document": emb.embed_documents(["hello world"])[0]}
'''

SCRIPTS["llama_index"] = '''
from llama_index.core.llms import ChatMessage
from llama_index.llms.llama_cpp import LlamaCPP

PROMPT = "Q: What is the capital of France?\\nA:"
llm = LlamaCPP(model_path=MODEL, temperature=0.0, max_new_tokens=16, context_window=512,
               model_kwargs={"n_threads": THREADS}, verbose=False)


@step("complete")
def _():
    response = llm.complete(PROMPT)
    return {"text": response.text, "raw_choice_keys": sorted(response.raw["choices"][0])}


@step("stream_complete")
def _():
    responses = list(llm.stream_complete(PROMPT))
    return {"deltas": [r.delta for r in responses], "final": responses[-1].text if responses else None,
            "complete": llm.complete(PROMPT).text}


@step("metadata")
def _():
    return {"context_window": llm.metadata.context_window, "n_ctx": llm._model.n_ctx()}


@step("chat")
def _():
    return llm.chat([ChatMessage(role="user", content="Say hello.")]).message.content
'''

SCRIPTS["outlines"] = '''
from typing import Literal

import outlines
from pydantic import BaseModel, Field
from llama_cpp import Llama


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int


llm = Llama(MODEL, n_ctx=1024, n_threads=THREADS, verbose=False)
chat_model = outlines.from_llamacpp(llm)                     # str prompts become a user message
text_model = outlines.from_llamacpp(llm, chat_mode=False)    # str prompts are completion prompts
ASK = "Give the name and age of Alice, who is 30 years old, as JSON."


@step("json_chat")
def _():
    raw = chat_model(ASK, Person, max_tokens=64, temperature=0)
    return {"raw": raw, "parsed": Person.model_validate_json(raw).model_dump()}


@step("json_text")
def _():
    raw = text_model("Alice is 30 years old. Her record as JSON: ", Person, max_tokens=64, temperature=0)
    return {"raw": raw, "parsed": Person.model_validate_json(raw).model_dump()}


@step("choice")
def _():
    return chat_model("Is Paris in France? Answer yes or no.", Literal["yes", "no"], max_tokens=4, temperature=0)


@step("stream")
def _():
    pieces = list(text_model.stream("Alice is 30 years old. Her record as JSON: ", Person, max_tokens=64,
                                    temperature=0))
    raw = "".join(pieces)
    return {"pieces": len(pieces), "parsed": Person.model_validate_json(raw).model_dump()}
'''

SCRIPTS["instructor"] = '''
import instructor
from pydantic import BaseModel, Field
from llama_cpp import Llama


class User(BaseModel):
    name: str = Field(max_length=20)
    age: int


llm = Llama(MODEL, n_ctx=1024, n_threads=THREADS, verbose=False)
MESSAGES = [{"role": "user", "content": "Extract the user: Jason is 25 years old."}]


@step("openai_v1_type")
def _():
    completion = llm.create_chat_completion_openai_v1(messages=MESSAGES, max_tokens=8, temperature=0)
    return {"type": type(completion).__module__ + "." + type(completion).__name__,
            "content": completion.choices[0].message.content}


@step("patch_json_schema")
def _():
    create = instructor.patch(create=llm.create_chat_completion_openai_v1, mode=instructor.Mode.JSON_SCHEMA)
    user = create(messages=MESSAGES, response_model=User, max_tokens=64, temperature=0)
    return {"type": type(user).__name__, "value": user.model_dump()}
'''


# --------------------------------------------------------------------------- running the scripts


@pytest.fixture(scope="module")
def tiny_bert_path(vocab_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_bert import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("compat-bert") / "tiny-bert.gguf")


@pytest.fixture(scope="module")
def library(smollm2_path: Path, tiny_bert_path: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict[str, Any]]:
    """``library(name)`` -> the steps' record of SCRIPTS[name], run once per module."""
    done: dict[str, dict[str, Any] | str] = {}

    def run(name: str) -> dict[str, Any]:
        if name not in done:
            workdir = tmp_path_factory.mktemp(f"compat-{name}")
            env = {
                "COMPAT_MODEL": str(smollm2_path),
                "COMPAT_BERT": str(tiny_bert_path),
                "COMPAT_THREADS": str(THREADS),
                "COMPAT_WORKDIR": str(workdir),
                # a session's Hub/offline settings must not change what these libraries do
                "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "NUMBA_CACHE_DIR": str(workdir / "numba-cache"),
            }
            code = PRELUDE + textwrap.dedent(SCRIPTS[name]) + EPILOGUE
            result = run_python_subprocess(code, timeout=TIMEOUT, env=env, cwd=workdir)
            lines = [ln for ln in result.stdout.splitlines() if ln.startswith("RESULT ")]
            if result.returncode != 0 or not lines:
                done[name] = (f"the {name} script exited {result.returncode} without its record\n"
                              f"--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-6000:]}")
            else:
                done[name] = json.loads(lines[-1][len("RESULT "):])
        record = done[name]
        if isinstance(record, str):
            pytest.fail(record, pytrace=False)
        assert record["_llama_cpp"].startswith("pyllama"), f"llama_cpp.Llama came from {record['_llama_cpp']}"
        return record

    return run


def step(record: dict[str, Any], name: str) -> Any:
    """The value of step `name`, or a failure that shows the step's traceback."""
    entry = record[name]
    if not entry["ok"]:
        pytest.fail(f"step {name!r} raised:\n{entry['error']}", pytrace=False)
    return entry["value"]


def _text(value: Any) -> str:
    assert isinstance(value, str), f"expected text, got {value!r}"
    assert value.strip(), "empty completion"
    return value


# --------------------------------------------------------------------------- langchain LlamaCpp


@pytest.fixture(scope="module")
def langchain_llm(library):
    _require("langchain_community")
    return library("langchain_llm")


def test_langchain_llamacpp_invoke(langchain_llm):
    _text(step(langchain_llm, "invoke"))


def test_langchain_llamacpp_stream_matches_invoke(langchain_llm):
    got = step(langchain_llm, "stream")
    assert len(got["chunks"]) > 1, "stream() gave one piece: not streamed"
    assert all(isinstance(c, str) for c in got["chunks"])
    assert "".join(got["chunks"]) == got["invoke"]


def test_langchain_llamacpp_chain(langchain_llm):
    _text(step(langchain_llm, "chain"))


def test_langchain_llamacpp_batch_from_threads(langchain_llm):
    got = step(langchain_llm, "batch")
    assert len(got) == 3
    for text in got:
        _text(text)


def test_langchain_llamacpp_stop(langchain_llm):
    got = step(langchain_llm, "stop")
    assert "," not in got, got


def test_langchain_llamacpp_get_num_tokens(langchain_llm):
    got = step(langchain_llm, "get_num_tokens")
    assert got["n"] == len(got["tokens"]) >= 2
    assert all(isinstance(t, int) for t in got["tokens"])


def test_langchain_llamacpp_grammar(langchain_llm):
    got = step(langchain_llm, "grammar")
    assert len(got) == 2 and all(text.strip() in ("yes", "no") for text in got), got


def test_langchain_llamacpp_grammar_path(langchain_llm):
    got = step(langchain_llm, "grammar_path")
    parts = [p.strip() for p in got.rstrip(", ").split(",")]  # max_tokens may cut it after a comma
    assert parts and all(p in ("red", "green", "blue") for p in parts), got


# --------------------------------------------------------------------------- langchain ChatLlamaCpp


@pytest.fixture(scope="module")
def langchain_chat(library):
    _require("langchain_community")
    return library("langchain_chat")


def test_langchain_chat_invoke(langchain_chat):
    got = step(langchain_chat, "invoke")
    assert got["type"] == "AIMessage"
    _text(got["content"])
    assert got["finish_reason"] in ("stop", "length")


def test_langchain_chat_stream_matches_invoke(langchain_chat):
    got = step(langchain_chat, "stream")
    assert len([c for c in got["chunks"] if c]) > 1, got["chunks"]
    assert "".join(got["chunks"]) == got["invoke"]


def test_langchain_chat_bind_tools_forced(langchain_chat):
    got = step(langchain_chat, "bind_tools")
    assert not got["invalid_tool_calls"], got
    assert len(got["tool_calls"]) == 1, got
    call = got["tool_calls"][0]
    assert call["name"] == "GetWeather"
    assert set(call["args"]) == {"city"} and isinstance(call["args"]["city"], str), call


def test_langchain_chat_with_structured_output(langchain_chat):
    got = step(langchain_chat, "with_structured_output")
    assert got["type"] == "Capital"
    assert set(got["value"]) == {"country", "capital"}


def test_langchain_chat_grammar(langchain_chat):
    assert step(langchain_chat, "grammar").strip() in ("yes", "no")


# --------------------------------------------------------------------------- langchain embeddings


@pytest.fixture(scope="module")
def langchain_embeddings(library):
    _require("langchain_community")
    return library("langchain_embeddings")


def test_langchain_embed_documents(langchain_embeddings):
    docs = step(langchain_embeddings, "embed_documents")
    assert len(docs) == 2
    assert len(docs[0]) == len(docs[1]) == 32  # tiny BERT: n_embd 32, one pooled vector per text
    assert all(isinstance(x, float) for x in docs[0] + docs[1])
    assert docs[0] != docs[1]


def test_langchain_embed_query_matches_documents(langchain_embeddings):
    got = step(langchain_embeddings, "embed_query")
    assert len(got["query"]) == 32
    assert max(abs(a - b) for a, b in zip(got["query"], got["document"])) < 1e-4


# --------------------------------------------------------------------------- llama-index


@pytest.fixture(scope="module")
def llama_index(library):
    _require("llama_index.llms.llama_cpp")
    return library("llama_index")


def test_llama_index_complete(llama_index):
    got = step(llama_index, "complete")
    _text(got["text"])
    assert {"text", "finish_reason"} <= set(got["raw_choice_keys"])


def test_llama_index_stream_complete(llama_index):
    got = step(llama_index, "stream_complete")
    assert len(got["deltas"]) > 1
    assert "".join(got["deltas"]) == got["final"] == got["complete"]


def test_llama_index_metadata(llama_index):
    got = step(llama_index, "metadata")
    assert got["context_window"] == got["n_ctx"] == 512


def test_llama_index_chat(llama_index):
    _text(step(llama_index, "chat"))


# --------------------------------------------------------------------------- outlines


@pytest.fixture(scope="module")
def outlines_run(library):
    _require("outlines", "numba")
    return library("outlines")


@pytest.mark.parametrize("name", ["json_chat", "json_text", "stream"])
def test_outlines_json_validates(outlines_run, name):
    got = step(outlines_run, name)
    assert set(got["parsed"]) == {"name", "age"}  # Person.model_validate_json passed in the script


def test_outlines_choice(outlines_run):
    assert step(outlines_run, "choice") in ("yes", "no")


# --------------------------------------------------------------------------- instructor


@pytest.fixture(scope="module")
def instructor_run(library):
    _require("instructor", "openai")
    return library("instructor")


def test_instructor_openai_v1_types(instructor_run):
    got = step(instructor_run, "openai_v1_type")
    assert got["type"] == "openai.types.chat.chat_completion.ChatCompletion"
    _text(got["content"])


def test_instructor_patch_json_schema(instructor_run):
    got = step(instructor_run, "patch_json_schema")
    assert got["type"] == "User"
    assert set(got["value"]) == {"name", "age"}
    assert isinstance(got["value"]["age"], int)


def test_scripts_do_not_leak_the_alias():
    """The libraries ran in child interpreters: this process never saw a `llama_cpp` module."""
    import sys

    assert "llama_cpp" not in sys.modules or not getattr(sys.modules["llama_cpp"], "__name__", "").startswith(
        "pyllama"), "install_as_llama_cpp() leaked into the test process"
    assert os.environ.get("COMPAT_MODEL") is None
