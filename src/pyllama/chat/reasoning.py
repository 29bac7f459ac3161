"""Reasoning ("thinking") models: telling the thinking apart from the answer.

Models such as Qwen3, DeepSeek-R1, QwQ, Magistral, Command-A Reasoning, Seed-OSS or gpt-oss
write their chain of thought before the answer, between markers (``<think>...</think>``,
``[THINK]...[/THINK]``, ``<|START_THINKING|>...<|END_THINKING|>``, gpt-oss's analysis
channel ...).  llama-server returns that text as ``message.reasoning_content`` and the rest as
``message.content``; this module is how pyllama does the same:

* :data:`SYNTAXES`: the markers llama.cpp's chat parsers know, and :func:`resolve` which of
  them apply to a chat (``reasoning_format``, the template, a prompt that opens the thinking
  itself: "thinking forced open");
* :class:`ReasoningSplitter`: the split, incremental (a marker may be cut anywhere across
  streamed pieces) and whole (:func:`partition`), with the same result either way;
* :class:`ReasoningBudget`: ``reasoning_budget``, a logits processor that counts the thinking
  tokens of one request and, when the budget is spent, forces the end marker's tokens (as
  llama.cpp's reasoning-budget sampler does);
* :class:`ReasoningStream` / :class:`AsyncReasoningStream`: a chat stream whose chunks carry
  the thinking (``Chunk.reasoning``) apart from the answer (``Chunk.text``).

Pure Python: nothing here touches the engine (the budget edits a NumPy row it is handed).
"""

from __future__ import annotations

import codecs
import dataclasses
import math
from collections import deque
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "REASONING_FORMATS",
    "SYNTAXES",
    "ThinkingSyntax",
    "ReasoningConfig",
    "ReasoningSplitter",
    "ReasoningBudget",
    "ReasoningStream",
    "AsyncReasoningStream",
    "check_reasoning_args",
    "resolve",
    "partition",
    "apply_to_completion",
    "answer_callback",
]

#: llama-server's ``--reasoning-format`` values.  "none": the thinking stays in the text;
#: "deepseek": it goes to ``reasoning`` (``reasoning_content``); "auto" (the default): as
#: "deepseek", for the templates that think; "deepseek-legacy": the text keeps the thinking
#: (markers included) and ``reasoning`` has it too (streamed, it stays in the text only).
REASONING_FORMATS = ("none", "auto", "deepseek", "deepseek-legacy")


@dataclasses.dataclass(frozen=True)
class ThinkingSyntax:
    """How one family of models marks its thinking.

    ``start`` opens it, any of ``ends`` closes it (the first is what a reasoning budget
    forces); ``content_prefixes`` are headers between the thinking and the answer that are
    neither (gpt-oss's ``<|start|>assistant<|channel|>final<|message|>``); ``detect``: text
    whose presence in a chat template says the template uses this syntax.
    """

    name: str
    start: str
    ends: Tuple[str, ...]
    content_prefixes: Tuple[str, ...] = ()
    detect: Tuple[str, ...] = ()

    def detect_strings(self) -> Tuple[str, ...]:
        return self.detect or (self.start, self.ends[0])


#: The thinking markers of llama.cpp's chat parsers (common/chat-diff-analyzer.cpp and
#: common/parsers/*.cpp).
SYNTAXES: Tuple[ThinkingSyntax, ...] = (
    ThinkingSyntax("think", "<think>", ("</think>",)),                      # DeepSeek-R1, Qwen3, QwQ, ...
    ThinkingSyntax("seed", "<seed:think>", ("</seed:think>",)),             # Seed-OSS
    ThinkingSyntax("minimax", "<mm:think>", ("</mm:think>",)),              # MiniMax
    ThinkingSyntax("command", "<|START_THINKING|>", ("<|END_THINKING|>",)),  # Command-A Reasoning
    ThinkingSyntax("mistral", "[THINK]", ("[/THINK]",)),                    # Magistral, Ministral 3
    ThinkingSyntax("gemma4", "<|channel>thought", ("<channel|>",)),         # Gemma 4
    # gpt-oss (harmony): <|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>...
    # (<|end|> is a control token, absent from the text unless special tokens are rendered).
    ThinkingSyntax("gpt-oss", "<|channel|>analysis<|message|>", ("<|end|>", "<|start|>assistant"),
                   content_prefixes=("<|start|>assistant", "<|channel|>final<|message|>"),
                   detect=("<|channel|>analysis", "<|channel|>final")),
)


# --------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class ReasoningConfig:
    """How the thinking of one chat is handled: the format, the syntaxes that apply, the
    syntax the prompt leaves open (the answer starts inside the thinking), the budget."""

    format: str = "auto"
    syntaxes: Tuple[ThinkingSyntax, ...] = ()
    open_syntax: Optional[ThinkingSyntax] = None
    budget: int = -1

    @property
    def active(self) -> bool:
        """Some syntax applies (else the text is the answer, whatever the format)."""
        return bool(self.syntaxes)

    @property
    def separates(self) -> bool:
        """The text holds the answer only (the thinking goes to ``reasoning``)."""
        return self.active and self.format in ("auto", "deepseek")

    @property
    def reports(self) -> bool:
        """``reasoning`` is filled (auto, deepseek, deepseek-legacy)."""
        return self.active and self.format != "none"

    def splitter(self) -> "ReasoningSplitter":
        return ReasoningSplitter(self.syntaxes, self.open_syntax)


def check_reasoning_args(reasoning_format: Any, reasoning_budget: Any,
                         chat_template_kwargs: Any) -> Dict[str, Any]:
    """Validate the reasoning arguments of a chat; returns the template variables (a copy)."""
    if reasoning_format not in REASONING_FORMATS:
        raise ValueError(f"reasoning_format must be one of {', '.join(map(repr, REASONING_FORMATS))}, "
                         f"got {reasoning_format!r}")
    if not isinstance(reasoning_budget, int) or isinstance(reasoning_budget, bool) or reasoning_budget < -1:
        raise ValueError(f"reasoning_budget must be an int >= -1 (-1: unlimited, 0: no thinking, N: at most N "
                         f"thinking tokens), got {reasoning_budget!r}")
    if chat_template_kwargs is None:
        return {}
    if not isinstance(chat_template_kwargs, Mapping):
        raise TypeError(f"chat_template_kwargs must be a dict of template variables, not "
                        f"{type(chat_template_kwargs).__name__}")
    out: Dict[str, Any] = {}
    for key, value in chat_template_kwargs.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"chat_template_kwargs: {key!r} is not a template variable name")
        if key in _RESERVED_VARIABLES:
            raise ValueError(f"chat_template_kwargs: {key!r} is set by the chat itself; pass it as its own argument")
        out[key] = value
    if "enable_thinking" in out and not isinstance(out["enable_thinking"], bool):
        raise ValueError(f"chat_template_kwargs: enable_thinking must be true or false, "
                         f"got {out['enable_thinking']!r}")
    return out


#: Variables the chat sets itself (and LLM.chat_prompt's own keyword arguments).
_RESERVED_VARIABLES = frozenset(("messages", "tools", "add_generation_prompt", "continue_final_message",
                                 "prefill_assistant", "allow_special_in_messages", "allow_files"))


def resolve(reasoning_format: str, template_source: Optional[str], prompt_tail: str, *,
            budget: int = -1, constrained: bool = False) -> ReasoningConfig:
    """The :class:`ReasoningConfig` of one chat.

    Syntaxes: with "deepseek" every known one; otherwise those the chat template uses
    (its source holds their markers) or the prompt shows.  ``prompt_tail`` is the end of the
    rendered prompt: when it ends with a start marker, the template opened the thinking and
    the answer starts inside it ("thinking forced open").  ``constrained`` (a grammar decides
    the output, e.g. a JSON schema): the output is the answer, whatever the prompt opened.
    """
    source = (template_source or "") + "\n" + prompt_tail
    if reasoning_format == "deepseek":
        syntaxes = SYNTAXES
    else:
        syntaxes = tuple(s for s in SYNTAXES if any(d in source for d in s.detect_strings()))
    open_syntax = None
    tail = prompt_tail.rstrip()
    if not constrained:
        for syn in syntaxes:
            if tail.endswith(syn.start):
                open_syntax = syn
                break
    return ReasoningConfig(reasoning_format, syntaxes, open_syntax, budget)


# --------------------------------------------------------------------------- the split

_START, _LEAD, _REASONING, _AFTER, _CONTENT = range(5)


class ReasoningSplitter:
    """Splits generated text into thinking and answer, piece by piece.

    :meth:`feed` takes the next piece of text and returns the ``(reasoning, content)`` text
    that is certain now; text that may be the beginning of a marker, and whitespace that may
    end the thinking, is held until the next piece decides (or :meth:`finish`).  The thinking
    counts only at the start of the output (after whitespace), or from the first piece when
    the prompt opened it (``open_syntax``); it ends at its syntax's end marker.  The thinking
    is stripped of surrounding whitespace and the answer of leading whitespace (as llama.cpp's
    parsers do), so the pieces joined equal :func:`partition` of the whole text.
    """

    def __init__(self, syntaxes: Sequence[ThinkingSyntax], open_syntax: Optional[ThinkingSyntax] = None) -> None:
        self._syntaxes = tuple(syntaxes)
        self._syntax: Optional[ThinkingSyntax] = open_syntax
        self._buf = ""
        self.saw_thinking = open_syntax is not None
        if open_syntax is not None:
            self._state = _LEAD
        elif self._syntaxes:
            self._state = _START
        else:
            self._state = _CONTENT
        self._openers = tuple(m for s in self._syntaxes for m in (s.start, *s.content_prefixes))

    @property
    def in_reasoning(self) -> bool:
        """Inside the thinking (its start marker seen, its end marker not yet)."""
        return self._state in (_LEAD, _REASONING)

    @property
    def in_end_marker(self) -> bool:
        """Inside the thinking, with text held that may be the start of its end marker."""
        return self._state == _REASONING and bool(self._buf.strip())

    @property
    def syntax(self) -> Optional[ThinkingSyntax]:
        """The syntax of the thinking seen (or opened by the prompt), if any."""
        return self._syntax

    def feed(self, text: str) -> Tuple[str, str]:
        """The next piece of generated text -> ``(reasoning, content)`` released now."""
        if self._state == _CONTENT and not self._buf:
            return "", text
        self._buf += text
        return self._run(final=False)

    def finish(self) -> Tuple[str, str]:
        """The end of the text: releases what was held."""
        return self._run(final=True)

    def _run(self, final: bool) -> Tuple[str, str]:
        reasoning: List[str] = []
        content: List[str] = []
        while True:
            state = self._state
            if state == _CONTENT:
                content.append(self._buf)
                self._buf = ""
                break
            if state == _START:
                s = self._buf.lstrip()
                if not s:
                    if final:
                        self._state = _CONTENT
                        continue
                    break
                syn = next((x for x in self._syntaxes if s.startswith(x.start)), None)
                if syn is not None:
                    self._syntax, self.saw_thinking = syn, True
                    self._buf = s[len(syn.start):]
                    self._state = _LEAD
                    continue
                syn = next((x for x in self._syntaxes if any(s.startswith(p) for p in x.content_prefixes)), None)
                if syn is not None:          # an answer header without thinking (gpt-oss's final channel)
                    self._syntax = syn
                    self._buf = s
                    self._state = _AFTER
                    continue
                if not final and any(m.startswith(s) for m in self._openers):
                    break                    # may still become a marker
                self._state = _CONTENT       # the answer, leading whitespace included
                continue
            if state == _LEAD:               # whitespace right after the start marker is dropped
                self._buf = self._buf.lstrip()
                if not self._buf:
                    break
                self._state = _REASONING
                continue
            if state == _REASONING:
                assert self._syntax is not None
                ends = self._syntax.ends
                at, marker = _earliest(self._buf, ends)
                if marker is not None and (final or not _longer_possible(self._buf, at, marker, ends)):
                    reasoning.append(self._buf[:at].rstrip())
                    self._buf = self._buf[at + len(marker):]
                    self._state = _AFTER
                    continue
                if final:
                    reasoning.append(self._buf.rstrip())
                    self._buf = ""
                    break
                hold = at if marker is not None else _partial_start(self._buf, ends)
                keep = len(self._buf[:hold].rstrip())    # trailing whitespace waits: it may end the thinking
                reasoning.append(self._buf[:keep])
                self._buf = self._buf[keep:]
                break
            if state == _AFTER:               # whitespace and answer headers before the answer are dropped
                assert self._syntax is not None
                s = self._buf.lstrip()
                prefix = next((p for p in self._syntax.content_prefixes if s.startswith(p)), None)
                if prefix is not None:
                    self._buf = s[len(prefix):]
                    continue
                self._buf = s
                if not s:
                    break
                if not final and any(p.startswith(s) for p in self._syntax.content_prefixes):
                    break
                self._state = _CONTENT
                continue
        return "".join(reasoning), "".join(content)


def _earliest(text: str, markers: Iterable[str]) -> Tuple[int, Optional[str]]:
    """(position, marker) of the first marker in text (the longest one at that position)."""
    best, found = len(text), None
    for m in markers:
        i = text.find(m)
        if i >= 0 and (i < best or (i == best and found is not None and len(m) > len(found))):
            best, found = i, m
    return best, found


def _longer_possible(text: str, at: int, marker: str, markers: Iterable[str]) -> bool:
    """A longer marker could still match where `marker` matched (it needs more text)."""
    rest = text[at:]
    return any(len(m) > len(marker) and m.startswith(rest) for m in markers)


def _partial_start(text: str, markers: Iterable[str]) -> int:
    """Where the longest suffix of text that begins some marker starts (len(text): none)."""
    longest = max((len(m) for m in markers), default=0)
    for j in range(max(0, len(text) - longest + 1), len(text)):
        tail = text[j:]
        if any(m.startswith(tail) for m in markers):
            return j
    return len(text)


def partition(text: str, config: ReasoningConfig) -> Tuple[str, Optional[str], str]:
    """``(head, reasoning, answer)`` of a whole generated text: ``head + answer == text``
    (the head is the thinking with its markers), ``reasoning`` the thinking itself (None
    when there was none, or it was empty)."""
    if not config.active:
        return "", None, text
    splitter = config.splitter()
    r1, c1 = splitter.feed(text)
    r2, c2 = splitter.finish()
    answer = c1 + c2
    reasoning = (r1 + r2) if splitter.saw_thinking else ""
    return text[:len(text) - len(answer)], reasoning or None, answer


def apply_to_completion(comp: Any, config: Optional[ReasoningConfig],
                        parts: Optional[Tuple[str, Optional[str], str]] = None) -> Any:
    """The Completion with the thinking moved to ``reasoning`` as the format says (a copy;
    the same object when nothing changes).  `parts`: its :func:`partition`, if known."""
    if config is None or not config.reports:
        return comp
    head, reasoning, answer = parts if parts is not None else partition(comp.text, config)
    if config.separates:
        return dataclasses.replace(comp, text=answer, reasoning=reasoning)
    return dataclasses.replace(comp, reasoning=reasoning)     # deepseek-legacy: the text keeps it


# --------------------------------------------------------------------------- the budget


class ReasoningBudget:
    """A logits processor (``processor(input_ids, scores)``) that limits one request's
    thinking to `budget` tokens, as llama.cpp's reasoning-budget sampler does: it watches the
    generated tokens (their text, special tokens rendered, so a marker made of several tokens
    counts too) and, once `budget` tokens were spent inside the thinking, forces the end
    marker's tokens one by one (every other token gets -inf), after completing a character
    cut across tokens (or an end marker the model has begun to write); then generation goes
    on with the answer.  `budget` 0 ends the thinking
    as soon as it starts (or at once, when the prompt opened it).

    One request's state: :meth:`for_request` gives each request of a call (n > 1) its own.
    """

    def __init__(self, vocab: Any, config: ReasoningConfig, budget: int) -> None:
        if budget < 0:
            raise ValueError("ReasoningBudget needs a budget >= 0")
        self.vocab = vocab
        self.config = config
        self.budget = budget
        self._splitter = config.splitter()
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._seen: Optional[int] = None        # tokens of input_ids already looked at
        self._count = 0                         # thinking tokens so far
        self._forced: List[int] = []            # tokens still to force
        self._done = False                      # the thinking ended (naturally or forced)
        self._end_tokens: Dict[str, List[int]] = {}

    def for_request(self) -> "ReasoningBudget":
        """A fresh copy for one request (its own count and state)."""
        fresh = ReasoningBudget(self.vocab, self.config, self.budget)
        fresh._end_tokens = self._end_tokens     # tokenizations are shared
        return fresh

    def __repr__(self) -> str:
        return f"ReasoningBudget(budget={self.budget})"

    def _end_marker_tokens(self) -> List[int]:
        syntax = self._splitter.syntax or (self.config.syntaxes[0] if self.config.syntaxes else None)
        if syntax is None:
            return []
        marker = syntax.ends[0]
        toks = self._end_tokens.get(marker)
        if toks is None:
            toks = self._end_tokens[marker] = list(self.vocab.tokenize(marker, add_special=False, parse_special=True))
        return toks

    def _accept(self, tok: int) -> None:
        piece = self.vocab.token_to_piece(tok, True)
        text = self._decoder.decode(piece)
        was_inside = self._splitter.in_reasoning
        if self._forced:
            self._forced.pop(0)
        self._splitter.feed(text)
        if was_inside and self._splitter.in_reasoning and not self._forced:
            self._count += 1
        if was_inside and not self._splitter.in_reasoning:
            self._done = True

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        n = len(input_ids)
        if self._seen is None:
            self._seen = n                      # the first call sees the prompt only
        if n > self._seen:
            for tok in input_ids[self._seen:n].tolist():
                self._accept(tok)
            self._seen = n
        # As llama.cpp, a character cut across tokens is completed first; and so is an end
        # marker the model has begun (forcing the marker after "</" would spell "<//think>").
        if (not self._forced and not self._done and self._splitter.in_reasoning
                and self._count >= self.budget and not self._decoder.getstate()[0]
                and not self._splitter.in_end_marker):
            self._forced = self._end_marker_tokens()
            if not self._forced:
                self._done = True
        if self._forced:
            tok = self._forced[0]
            keep = float(scores[tok])
            scores.fill(-math.inf)
            # Finite even when an earlier processor banned it: the end marker must come.
            scores[tok] = keep if math.isfinite(keep) else 0.0
            if len(self._forced) == 1:
                self._done = True
        return scores


# --------------------------------------------------------------------------- streams


def answer_callback(callback: Callable[[str], Any], config: ReasoningConfig) -> Tuple[Callable[[str], None],
                                                                                     Callable[[], None]]:
    """A chat's `callback` that sees the answer only (the thinking is held back), and the
    function that hands it what is left at the end of the text."""
    splitter = config.splitter()

    def answer(piece: str) -> None:
        content = splitter.feed(piece)[1]
        if content:
            callback(content)

    def flush() -> None:
        content = splitter.finish()[1]
        if content:
            callback(content)

    return answer, flush


class _Split:
    """Per-answer splitters of one stream, and how its items are split."""

    def __init__(self, config: Optional[ReasoningConfig]) -> None:
        self.config = config
        self.splitters: Dict[int, ReasoningSplitter] = {}

    def _splitter(self, index: int) -> Optional[ReasoningSplitter]:
        if self.config is None or not self.config.reports:
            return None
        s = self.splitters.get(index)
        if s is None:
            s = self.splitters[index] = self.config.splitter()
        return s

    def item(self, item: Any) -> Optional[Any]:
        """A stream item (a str in text mode, a Chunk otherwise) split, or None (nothing left)."""
        if isinstance(item, str):
            s = self._splitter(0)
            if s is None:
                return item
            reasoning, content = s.feed(item)
            if not self.config.separates:    # deepseek-legacy: the stream keeps the thinking inline
                return item
            return content or None
        s = self._splitter(item.index)
        if s is None:
            return item
        reasoning, content = s.feed(item.text)
        if item.finish_reason is not None:
            r2, c2 = s.finish()
            reasoning, content = reasoning + r2, content + c2
        if not self.config.separates:
            return item
        return dataclasses.replace(item, text=content, reasoning=reasoning or None)

    def flush_text(self) -> str:
        """Text mode, at the end: the answer text still held."""
        s = self.splitters.get(0)
        if s is None or self.config is None or not self.config.separates:
            return ""
        self.splitters.pop(0)
        return s.finish()[1]


class ReasoningStream:
    """A chat stream (pyllama.streams.Stream) with the thinking split from the answer:
    text pieces are the answer's only; Chunks carry the thinking in ``reasoning`` and the
    answer in ``text``.  ``completion``/``completions`` (with ``reasoning``), ``close()``
    and the context manager are the wrapped stream's."""

    def __init__(self, inner: Any, config: Optional[ReasoningConfig]) -> None:
        self._inner = inner
        self._split = _Split(config)
        self._pending: deque = deque()
        self._ended = False

    def __iter__(self) -> "ReasoningStream":
        return self

    def __next__(self) -> Any:
        while not self._pending:
            if self._ended:
                raise StopIteration
            try:
                item = next(self._inner)
            except StopIteration:
                self._ended = True
                rest = self._split.flush_text()
                if rest:
                    self._pending.append(rest)
                continue
            out = self._split.item(item)
            if out is not None:
                self._pending.append(out)
        return self._pending.popleft()

    @property
    def completion(self) -> Any:
        return self._inner.completion

    @property
    def completions(self) -> Any:
        return self._inner.completions

    def close(self) -> None:
        self._ended = True
        self._pending.clear()
        self._inner.close()

    def __enter__(self) -> "ReasoningStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncReasoningStream:
    """:class:`ReasoningStream` for asyncio (wraps pyllama.streams.AsyncStream).  The
    configuration is known once the chat is prepared (in the stream's first step):
    `config_of()` returns it then."""

    def __init__(self, inner: Any, config_of: Callable[[], Optional[ReasoningConfig]]) -> None:
        self._inner = inner
        self._config_of = config_of
        self._split: Optional[_Split] = None
        self._pending: deque = deque()
        self._ended = False

    def __aiter__(self) -> "AsyncReasoningStream":
        return self

    async def __anext__(self) -> Any:
        while not self._pending:
            if self._ended:
                raise StopAsyncIteration
            try:
                item = await self._inner.__anext__()
            except StopAsyncIteration:
                self._ended = True
                if self._split is not None:
                    rest = self._split.flush_text()
                    if rest:
                        self._pending.append(rest)
                continue
            if self._split is None:
                self._split = _Split(self._config_of())
            out = self._split.item(item)
            if out is not None:
                self._pending.append(out)
        return self._pending.popleft()

    @property
    def completion(self) -> Any:
        return self._inner.completion

    @property
    def completions(self) -> Any:
        return self._inner.completions

    async def aclose(self) -> None:
        self._ended = True
        self._pending.clear()
        await self._inner.aclose()
