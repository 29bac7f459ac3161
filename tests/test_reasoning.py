"""Reasoning models: the thinking apart from the answer, in the library and the server.

* the splitter (pyllama.chat.reasoning) on markers cut anywhere across pieces;
* LLM.chat / achat / streams on tiny random models whose chat templates think (the model is
  made to write ``<think> ... </think>`` by a scripted logits processor or a grammar: its
  greedy output is deterministic);
* reasoning_budget (0 and N), chat_template_kwargs reaching the template, tool calls after
  the thinking;
* the server's chat route with the real `openai` package (in-process app).
"""

from __future__ import annotations

import asyncio
import itertools
import math

import pytest

from pyllama import LLM
from pyllama.chat import reasoning as rs
from pyllama.chat.reasoning import ReasoningConfig, ReasoningSplitter, partition, resolve

# --------------------------------------------------------------------------- tiny models

THINKS = (   # ChatML; the model writes <think>...</think> itself; enable_thinking=false skips it
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}")
OPENS = (    # the generation prompt opens the thinking ("thinking forced open", QwQ / R1 style)
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}")
OPENS_LLAMA = (   # QwQ / DeepSeek-R1 as llama.cpp ships them: open unless enable_thinking is false
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n"
    "{% if not enable_thinking %}</think>{% endif %}{% endif %}")
PLAIN = (    # a template that knows nothing of thinking
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

MSGS = [{"role": "user", "content": "What is two plus two?"}]


@pytest.fixture(scope="module")
def think_vocab(vocab_dir, tmp_path_factory):
    from tiny_model import TOKEN_TYPE_USER_DEFINED, make_vocab_with_tokens

    # <think> / </think> are user-defined tokens (rendered as text), as in Qwen3 and DeepSeek-R1.
    return make_vocab_with_tokens(tmp_path_factory.mktemp("think") / "vocab.gguf",
                                  [("<think>", TOKEN_TYPE_USER_DEFINED), ("</think>", TOKEN_TYPE_USER_DEFINED),
                                   "<|im_start|>", "<|im_end|>"])


def _llm(tmp_path_factory, vocab, template, **kw):
    from tiny_model import make_tiny_llama

    path = make_tiny_llama(tmp_path_factory.mktemp("think") / "model.gguf", vocab_from=vocab, chat_template=template)
    return LLM(path, n_ctx=1024, n_threads=2, temperature=0, **kw)


@pytest.fixture(scope="module")
def think_llm(think_vocab, tmp_path_factory):
    llm = _llm(tmp_path_factory, think_vocab, THINKS, n_parallel=2)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def open_llm(think_vocab, tmp_path_factory):
    llm = _llm(tmp_path_factory, think_vocab, OPENS, n_parallel=2)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def plain_llm(think_vocab, tmp_path_factory):
    llm = _llm(tmp_path_factory, think_vocab, PLAIN)
    yield llm
    llm.close()


def tok(llm, text):
    return llm.vocab.tokenize(text, add_special=False, parse_special=True)


def think_ids(llm):
    (start,) = tok(llm, "<think>")
    (end,) = tok(llm, "</think>")
    return start, end


class Script:
    """A logits processor that makes the model write `tokens` first, then lets it go on
    freely, never writing the `ban`ned tokens (the same for every request it serves: its
    position is each request's own, from len(input_ids))."""

    def __init__(self, tokens, ban=()):
        self.tokens = list(tokens)
        self.ban = list(ban)
        self.start = None

    def __call__(self, input_ids, scores):
        if self.start is None:
            self.start = len(input_ids)
        k = len(input_ids) - self.start
        if k < len(self.tokens):
            keep = scores[self.tokens[k]]
            scores.fill(-math.inf)
            scores[self.tokens[k]] = keep
        elif self.ban:
            scores[self.ban] = -math.inf
        return scores


def thinking_script(llm, thought="two and two", answer=None, eos=False):
    """<think> thought </think> [answer [EOS]], then free text without thinking markers.
    (The vocabulary is SentencePiece's: a piece's text comes back with a space before it.)"""
    start, end = think_ids(llm)
    tokens = [start, *tok(llm, thought), end]
    if answer is not None:
        tokens += tok(llm, answer)
    if eos:
        tokens.append(llm.vocab.eos)
    return Script(tokens, ban=[start, end])


# --------------------------------------------------------------------------- the splitter

THINK = rs.SYNTAXES[0]
ALL = ReasoningConfig("deepseek", rs.SYNTAXES)


def split_whole(text, config=ALL):
    _, reasoning, answer = partition(text, config)
    return reasoning, answer


def split_pieces(pieces, config=ALL):
    s = config.splitter()
    r, c = [], []
    for p in pieces:
        a, b = s.feed(p)
        r.append(a)
        c.append(b)
    a, b = s.finish()
    return "".join(r + [a]), "".join(c + [b]), r + [a]


@pytest.mark.parametrize("text, reasoning, answer", [
    ("<think>\nTwo and two.\n</think>\n\nFour.", "Two and two.", "Four."),
    ("  <think>a</think>b", "a", "b"),
    ("<think></think>\n\nFour.", None, "Four."),
    ("<think>unclosed thinking ", "unclosed thinking", ""),
    ("Four. <think>not at the start</think>", None, "Four. <think>not at the start</think>"),
    ("<thinking is not a marker", None, "<thinking is not a marker"),
    ("\n\nplain answer\n", None, "\n\nplain answer\n"),
    ("<seed:think>s</seed:think>a", "s", "a"),
    ("<mm:think>m</mm:think>a", "m", "a"),
    ("<|START_THINKING|>c<|END_THINKING|>a", "c", "a"),
    ("[THINK]m[/THINK]a", "m", "a"),
    ("<|channel>thought g<channel|>a", "g", "a"),
    ("<|channel|>analysis<|message|>plan<|end|><|start|>assistant<|channel|>final<|message|>Hi", "plan", "Hi"),
    # gpt-oss's <|end|> is a control token, absent from the text unless rendered
    ("<|channel|>analysis<|message|>plan<|start|>assistant<|channel|>final<|message|>Hi", "plan", "Hi"),
    ("<|channel|>final<|message|>Hi", None, "Hi"),
])
def test_split_known_markers(text, reasoning, answer):
    assert split_whole(text) == (reasoning, answer)


SAMPLES = ["<think>\nTwo and <b>two</b>.\n</think>\n\nFour </think>.",
           "  <think>a <\n</think>  b < c",
           "<|channel|>analysis<|message|>x <|e<|end|><|start|>assistant<|channel|>final<|message|> y",
           "no thinking at all </think>",
           "<thin"]


@pytest.mark.parametrize("text", SAMPLES)
def test_split_is_the_same_for_any_cut_into_pieces(text):
    """A marker (or the whitespace around the thinking) cut anywhere across pieces: the
    joined pieces equal the split of the whole text, and no piece of thinking carries a
    fragment of a marker."""
    want_r, want_c = split_whole(text)
    want_r = want_r or ""
    for cuts in itertools.combinations(range(1, len(text)), 2):
        pieces = [text[:cuts[0]], text[cuts[0]:cuts[1]], text[cuts[1]:]]
        r, c, _ = split_pieces(pieces)
        assert (r, c) == (want_r, want_c), pieces
    r, c, deltas = split_pieces(list(text))          # one character at a time
    assert (r, c) == (want_r, want_c)
    ends = [m for syn in rs.SYNTAXES for m in syn.ends]
    for d in deltas:      # a marker is never thinking, even the pieces of one
        assert not any(m in d for m in ends), d
    if "</think>" in text:
        assert not any(d.endswith(("</", "</t", "</th", "</thi", "</thin", "</think")) for d in deltas)


def test_split_holds_a_possible_marker_until_decided():
    s = ReasoningSplitter([THINK])
    assert s.feed("<th") == ("", "")           # may be <think>
    assert s.feed("ink>Let me") == ("Let me", "")
    assert s.feed(" see </thi") == (" see", "")    # " </thi" is held
    assert s.in_end_marker
    assert s.feed("nk>\n\nFour") == ("", "Four")
    assert not s.in_reasoning
    assert s.feed(" <think>") == ("", " <think>")   # the answer passes through
    s = ReasoningSplitter([THINK])
    assert s.feed("<tr") == ("", "<tr")        # decided: no marker


def test_split_forced_open():
    s = ReasoningSplitter([THINK], open_syntax=THINK)
    assert s.in_reasoning
    assert s.feed("\nplanning") == ("planning", "")
    assert s.feed("\n</think>\n\nanswer") == ("", "answer")
    config = ReasoningConfig("auto", (THINK,), THINK)
    assert partition("x</think>y", config) == ("x</think>", "x", "y")


def test_resolve():
    tmpl = "{{ '<think>' }}"
    assert resolve("auto", None, "<|im_start|>assistant\n").syntaxes == ()
    assert resolve("auto", tmpl, "").syntaxes == (THINK,)
    assert resolve("deepseek", None, "").syntaxes == rs.SYNTAXES
    opened = resolve("auto", tmpl, "<|im_start|>assistant\n<think>\n")
    assert opened.open_syntax is THINK
    assert resolve("auto", tmpl, "assistant\n<think>\n\n</think>\n\n").open_syntax is None
    # a grammar decides the output: it is the answer, whatever the prompt opened
    assert resolve("auto", tmpl, "assistant\n<think>\n", constrained=True).open_syntax is None
    assert not resolve("none", tmpl, "").separates and resolve("none", tmpl, "").active


@pytest.mark.parametrize("args, exc", [
    (("bogus", -1, None), ValueError),
    (("auto", -2, None), ValueError),
    (("auto", 1.5, None), ValueError),
    (("auto", -1, "x"), TypeError),
    (("auto", -1, {"enable_thinking": "false"}), ValueError),
    (("auto", -1, {"messages": []}), ValueError),
    (("auto", -1, {"not a name": 1}), ValueError),
])
def test_reasoning_args_checked(args, exc):
    with pytest.raises(exc):
        rs.check_reasoning_args(*args)


# --------------------------------------------------------------------------- the library


def test_completion_reasoning(think_llm):
    llm = think_llm
    start, end = think_ids(llm)
    comp = llm.chat(MSGS, max_tokens=24, logits_processors=[thinking_script(llm, "two and two", "Four")])
    assert comp.tokens[0] == start and end in comp.tokens
    assert comp.reasoning == "two and two"
    assert comp.text.startswith("Four") and "<think>" not in comp.text and "</think>" not in comp.text
    # the same generation with the thinking left in the text
    raw = llm.chat(MSGS, max_tokens=24, reasoning_format="none",
                   logits_processors=[thinking_script(llm, "two and two", "Four")])
    assert raw.tokens == comp.tokens and raw.reasoning is None
    assert raw.text.startswith("<think> two and two</think>") and raw.text.endswith(comp.text)
    legacy = llm.chat(MSGS, max_tokens=24, reasoning_format="deepseek-legacy",
                      logits_processors=[thinking_script(llm, "two and two", "Four")])
    assert legacy.text == raw.text and legacy.reasoning == "two and two"


def test_plain_answer_is_untouched(think_llm):
    ban = list(think_ids(think_llm))
    comp = think_llm.chat(MSGS, max_tokens=12, logits_processors=[Script([], ban)])
    raw = think_llm.chat(MSGS, max_tokens=12, reasoning_format="none", logits_processors=[Script([], ban)])
    assert comp.reasoning is None and comp.text == raw.text and comp.text


def test_auto_only_for_templates_that_think(plain_llm):
    llm = plain_llm
    auto = llm.chat(MSGS, max_tokens=16, logits_processors=[thinking_script(llm, "hm", "Four")])
    assert auto.reasoning is None and auto.text.startswith("<think> hm</think> Four")
    forced = llm.chat(MSGS, max_tokens=16, reasoning_format="deepseek",
                      logits_processors=[thinking_script(llm, "hm", "Four")])
    assert forced.reasoning == "hm" and forced.text == auto.text[len("<think> hm</think> "):]


def test_stream_chunks_carry_the_thinking(think_llm):
    llm = think_llm
    comp = llm.chat(MSGS, max_tokens=24, logits_processors=[thinking_script(llm, "two and two", "Four")])
    stream = llm.chat(MSGS, max_tokens=24, stream=True, chunks=True,
                      logits_processors=[thinking_script(llm, "two and two", "Four")])
    chunks = list(stream)
    assert "".join(c.reasoning or "" for c in chunks) == comp.reasoning
    assert "".join(c.text for c in chunks) == comp.text
    assert [t for c in chunks for t in c.token_ids] == comp.tokens
    assert sum(1 for c in chunks if c.reasoning) >= 2      # streamed as it came, not at the end
    assert chunks[-1].finish_reason == "length"
    assert stream.completion.reasoning == comp.reasoning and stream.completion.text == comp.text
    # text pieces: the answer only
    pieces = list(llm.chat(MSGS, max_tokens=24, stream=True,
                           logits_processors=[thinking_script(llm, "two and two", "Four")]))
    assert "".join(pieces) == comp.text
    seen = []
    llm.chat(MSGS, max_tokens=24, callback=seen.append,
             logits_processors=[thinking_script(llm, "two and two", "Four")])
    assert "".join(seen) == comp.text


def test_async_stream_and_achat(think_llm):
    llm = think_llm
    comp = llm.chat(MSGS, max_tokens=20, logits_processors=[thinking_script(llm, "so", "Four")])

    async def run():
        stream = llm.astream_chat(MSGS, max_tokens=20, chunks=True,
                                  logits_processors=[thinking_script(llm, "so", "Four")])
        chunks = [c async for c in stream]
        whole = await llm.achat(MSGS, max_tokens=20, logits_processors=[thinking_script(llm, "so", "Four")])
        return chunks, stream.completion, whole

    chunks, streamed, whole = asyncio.run(run())
    assert "".join(c.reasoning or "" for c in chunks) == comp.reasoning == "so"
    assert "".join(c.text for c in chunks) == comp.text
    assert streamed.reasoning == whole.reasoning == "so" and whole.text == comp.text


def test_enable_thinking_reaches_the_template(think_llm):
    llm = think_llm
    off = llm.chat(MSGS, max_tokens=2, chat_template_kwargs={"enable_thinking": False})
    on = llm.chat(MSGS, max_tokens=2)
    prompt_off = llm.chat_tokens(MSGS, enable_thinking=False)
    assert off.prompt_tokens == len(prompt_off) > on.prompt_tokens
    assert llm.detokenize(prompt_off).rstrip().endswith("</think>")
    # any variable: a template that reads it
    assert llm.chat(MSGS, max_tokens=1, chat_template_kwargs={"custom_flag": 1}).prompt_tokens == on.prompt_tokens


def test_enable_thinking_defaults_to_true(think_vocab, tmp_path_factory):
    # As llama.cpp: every template gets enable_thinking=true unless the chat turns thinking off
    # (reasoning_budget=0, or chat_template_kwargs); a template reading `not enable_thinking`
    # keeps the thinking open by default.
    llm = _llm(tmp_path_factory, think_vocab, OPENS_LLAMA)
    try:
        start, end = think_ids(llm)
        opened = llm.chat_tokens(MSGS)
        assert start in opened[-3:] and end not in opened
        closed = llm.chat_tokens(MSGS, enable_thinking=False)
        assert closed[-1] == end
        free = llm.chat(MSGS, max_tokens=4, logits_processors=[Script([], [start, end])])
        assert free.prompt_tokens == len(llm.chat_tokens(MSGS)) and free.text == "" and free.reasoning
        for off in ({"reasoning_budget": 0}, {"chat_template_kwargs": {"enable_thinking": False}}):
            comp = llm.chat(MSGS, max_tokens=4, logits_processors=[Script([], [start, end])], **off)
            assert comp.prompt_tokens == len(closed) and comp.reasoning is None and comp.text
        on = llm.chat(MSGS, max_tokens=1, reasoning_budget=0, chat_template_kwargs={"enable_thinking": True})
        assert on.prompt_tokens == free.prompt_tokens          # the caller's variable wins
    finally:
        llm.close()


def test_budget_n_forces_the_end_marker(think_llm):
    llm = think_llm
    start, end = think_ids(llm)

    def script():   # <think>, then free text that never ends the thinking by itself
        return Script([start], ban=[start, end])

    free = llm.chat(MSGS, max_tokens=16, logits_processors=[script()])
    assert end not in free.tokens and free.text == "" and free.reasoning
    comp = llm.chat(MSGS, max_tokens=16, reasoning_budget=4, logits_processors=[script()])
    assert comp.tokens[:5] == free.tokens[:5]
    assert comp.tokens[5] == end                 # 4 thinking tokens, then the end marker
    assert comp.reasoning == llm.detokenize(comp.tokens[1:5]).strip()
    assert comp.text and comp.finish_reason == "length"   # the answer goes on after it
    # each of n answers counts its own thinking
    pair = llm.chat(MSGS, max_tokens=10, n=2, reasoning_budget=2, logits_processors=[script()])
    assert [c.tokens.index(end) for c in pair] == [3, 3]


def test_budget_zero(think_llm, open_llm):
    start, end = think_ids(think_llm)
    comp = think_llm.chat(MSGS, max_tokens=8, reasoning_budget=0, logits_processors=[Script([start], [start, end])])
    assert comp.tokens[:2] == [start, end] and comp.reasoning is None and comp.text
    # budget 0 asks the template not to think (enable_thinking=False) ...
    assert comp.prompt_tokens == len(think_llm.chat_tokens(MSGS, enable_thinking=False))
    # ... and when the prompt opened the thinking anyway, the end marker comes first
    opened = open_llm.chat(MSGS, max_tokens=6, reasoning_budget=0, chat_template_kwargs={"enable_thinking": True},
                           logits_processors=[Script([], [start, end])])
    assert opened.tokens[0] == end and opened.reasoning is None and opened.text


def test_thinking_forced_open(open_llm):
    llm = open_llm
    start, end = think_ids(llm)
    free = llm.chat(MSGS, max_tokens=12, logits_processors=[Script([], [start, end])])
    assert free.text == "" and free.reasoning       # the whole output is thinking
    comp = llm.chat(MSGS, max_tokens=12, reasoning_budget=3, logits_processors=[Script([], [start, end])])
    assert comp.tokens[3] == end and comp.tokens[:3] == free.tokens[:3]
    assert comp.reasoning == llm.detokenize(comp.tokens[:3]).strip() and comp.text
    chunks = list(llm.chat(MSGS, max_tokens=12, reasoning_budget=3, stream=True, chunks=True,
                           logits_processors=[Script([], [start, end])]))
    assert "".join(c.reasoning or "" for c in chunks) == comp.reasoning
    assert "".join(c.text for c in chunks) == comp.text
    # a grammar decides the output: it is the answer, not thinking
    constrained = llm.chat(MSGS, max_tokens=12, grammar='root ::= "yes" | "no"')
    assert constrained.text in ("yes", "no") and constrained.reasoning is None


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_tool_calls_after_thinking(think_llm):
    llm = think_llm
    thought = 'maybe {"name": "get_weather", "arguments": {"city": "Rome"}} no'
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'

    def script():
        return thinking_script(llm, thought, call, eos=True)

    comp = llm.chat(MSGS, max_tokens=120, tools=[WEATHER], logits_processors=[script()])
    assert comp.finish_reason == "tool_calls"
    assert [c["function"]["arguments"] for c in comp.tool_calls] == ['{"city": "Paris"}']   # not Rome
    assert "Rome" in comp.reasoning and comp.content is None
    raw = llm.chat(MSGS, max_tokens=120, tools=[WEATHER], reasoning_format="none", logits_processors=[script()])
    assert [c["function"]["arguments"] for c in raw.tool_calls] == ['{"city": "Paris"}']
    assert raw.reasoning is None and raw.content.startswith("<think>") and "Rome" in raw.content


def test_bad_reasoning_arguments(think_llm):
    with pytest.raises(ValueError, match="reasoning_format"):
        think_llm.chat(MSGS, max_tokens=1, reasoning_format="bogus")
    with pytest.raises(ValueError, match="reasoning_budget"):
        think_llm.chat(MSGS, max_tokens=1, reasoning_budget=-5)
    with pytest.raises(TypeError, match="chat_template_kwargs"):
        think_llm.chat(MSGS, max_tokens=1, chat_template_kwargs=["enable_thinking"])
    with pytest.raises(ValueError, match="enable_thinking"):
        think_llm.chat(MSGS, max_tokens=1, chat_template_kwargs={"enable_thinking": "false"})


# --------------------------------------------------------------------------- the server


openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

#: The model thinks (" hello" and a few letters), then answers, as this grammar says.
GRAMMAR = 'root ::= "<think>" " hello" [a-z ]{2,12} "</think>" [a-z ]{2,12}'
#: Thinking that never ends by itself: only a budget ends it.
ENDLESS = 'root ::= "<think>" " hello" [a-z ]* "</think>" [a-z ]{2,12}'


def serve(llm, coro_fn, **settings):
    """Run `coro_fn(client)` against the in-process app with the real openai client."""
    from pyllama.server import create_app

    async def main():
        app = create_app(llm, **settings)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as h:
            client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=h, max_retries=0)
            return await coro_fn(client)

    return asyncio.run(main())


def ask(**extra):
    return dict(model="tiny", messages=MSGS, max_tokens=30, extra_body=extra)


def test_server_reasoning_content(think_llm):
    lib = think_llm.chat(MSGS, max_tokens=30, grammar=GRAMMAR)
    assert lib.reasoning and lib.text

    async def run(client):
        whole = await client.chat.completions.create(**ask(grammar=GRAMMAR))
        stream = await client.chat.completions.create(stream=True, **ask(grammar=GRAMMAR))
        deltas = [c.choices[0].delta async for c in stream if c.choices]
        raw = await client.chat.completions.create(**ask(grammar=GRAMMAR, reasoning_format="none"))
        return whole, deltas, raw

    whole, deltas, raw = serve(think_llm, run)
    msg = whole.choices[0].message
    assert msg.model_extra["reasoning_content"] == lib.reasoning and msg.content == lib.text
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == lib.reasoning
    assert sum(1 for d in deltas if (d.model_extra or {}).get("reasoning_content")) >= 2
    assert "".join(d.content or "" for d in deltas) == lib.text
    assert "reasoning_content" not in (raw.choices[0].message.model_extra or {})
    assert raw.choices[0].message.content.startswith("<think>")


def test_server_defaults_and_overrides(think_llm):
    async def run(client):
        default = await client.chat.completions.create(**ask(grammar=GRAMMAR))
        asked = await client.chat.completions.create(**ask(grammar=GRAMMAR, reasoning_format="deepseek"))
        plain = await client.chat.completions.create(**ask())
        thinking_on = await client.chat.completions.create(**ask(chat_template_kwargs={"enable_thinking": True}))
        effort_none = await client.chat.completions.create(reasoning_effort="none", **ask())
        return default, asked, plain, thinking_on, effort_none

    # the server's flags: --reasoning-format none, --chat-template-kwargs '{"enable_thinking": false}'
    default, asked, plain, on, effort_none = serve(think_llm, run, reasoning_format="none",
                                                   chat_template_kwargs={"enable_thinking": False})
    assert default.choices[0].message.content.startswith("<think>")
    assert "reasoning_content" not in (default.choices[0].message.model_extra or {})
    assert asked.choices[0].message.model_extra["reasoning_content"]
    n_off = len(think_llm.chat_tokens(MSGS, enable_thinking=False))
    assert plain.usage.prompt_tokens == n_off                         # the server's kwargs reach the template
    assert on.usage.prompt_tokens == len(think_llm.chat_tokens(MSGS)) < n_off   # the request's win
    assert effort_none.usage.prompt_tokens == n_off


def test_server_reasoning_budget(think_llm):
    lib = think_llm.chat(MSGS, max_tokens=30, grammar=ENDLESS, reasoning_budget=2)
    assert lib.reasoning and lib.text

    async def run(client):
        asked = await client.chat.completions.create(**ask(grammar=ENDLESS, reasoning_budget_tokens=2))
        older = await client.chat.completions.create(**ask(grammar=ENDLESS, thinking_budget_tokens=2))
        free = await client.chat.completions.create(**ask(grammar=ENDLESS, reasoning_budget_tokens=-1))
        return asked, older, free

    asked, older, free = serve(think_llm, run)
    for r in (asked, older):
        assert r.choices[0].message.model_extra["reasoning_content"] == lib.reasoning
        assert r.choices[0].message.content == lib.text
    assert free.choices[0].message.content == "" and free.choices[0].finish_reason == "length"
    # --reasoning-budget 2 as the server's default; -1 in a request means "the server's"
    served, = serve(think_llm, lambda c: asyncio.gather(
        c.chat.completions.create(**ask(grammar=ENDLESS, reasoning_budget_tokens=-1))), reasoning_budget=2)
    assert served.choices[0].message.model_extra["reasoning_content"] == lib.reasoning


@pytest.mark.parametrize("extra, param", [
    ({"reasoning_format": "bogus"}, "reasoning_format"),
    ({"reasoning_budget_tokens": -2}, "reasoning_budget_tokens"),
    ({"chat_template_kwargs": "enable_thinking"}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"enable_thinking": "false"}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ({"reasoning_budget": 3}, "reasoning_budget"),
])
def test_server_bad_reasoning_fields(think_llm, extra, param):
    async def run(client):
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(**ask(**extra))
        return info.value

    err = serve(think_llm, run)
    assert err.status_code == 400 and err.body["param"] == param
