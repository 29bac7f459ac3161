"""What a generation returns: Completion (one answer), Chunk (a streamed piece), Timings and
log-probabilities (TokenLogprob, TopLogprob), and how they are made from a finished engine request.

Plain data: nothing here touches the engine or the LLM that ran the request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Timings:
    """llama.cpp-style timings of one call (milliseconds)."""

    load_ms: float = 0.0
    prompt_n: int = 0          # prompt tokens evaluated (cached ones excluded)
    prompt_ms: float = 0.0
    cached_n: int = 0          # prompt tokens reused from the KV cache
    predicted_n: int = 0
    predicted_ms: float = 0.0
    sample_n: int = 0
    sample_ms: float = 0.0
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    draft_n: int = 0           # speculative decoding: tokens drafted (llama-server's names)
    draft_n_accepted: int = 0  # and accepted by the sampler chain

    @property
    def prompt_per_second(self) -> float:
        return 1000.0 * self.prompt_n / self.prompt_ms if self.prompt_ms > 0 else 0.0

    @property
    def predicted_per_second(self) -> float:
        return 1000.0 * self.predicted_n / self.predicted_ms if self.predicted_ms > 0 else 0.0

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["prompt_per_second"] = self.prompt_per_second
        d["predicted_per_second"] = self.predicted_per_second
        return d

    def __getitem__(self, key: str) -> Any:  # timings["predicted_ms"] works too
        return self.as_dict()[key]

    def format(self) -> str:
        """The lines llama.cpp prints after a run."""

        def rate(ms: float, n: int, unit: str) -> str:
            if n <= 0 or ms <= 0:
                return f"{ms:10.2f} ms / {n:5d} {unit}"
            return (f"{ms:10.2f} ms / {n:5d} {unit} ({ms / n:8.2f} ms per token, "
                    f"{1000.0 * n / ms:8.2f} tokens per second)")

        lines = [
            f"llama_perf_context_print:        load time = {self.load_ms:10.2f} ms",
            f"llama_perf_sampler_print:    sampling time = {rate(self.sample_ms, self.sample_n, 'runs  ')}",
            f"llama_perf_context_print: prompt eval time = {rate(self.prompt_ms, self.prompt_n, 'tokens')}",
            f"llama_perf_context_print:        eval time = {rate(self.predicted_ms, self.predicted_n, 'runs  ')}",
            f"llama_perf_context_print:       total time = {self.total_ms:10.2f} ms / "
            f"{self.prompt_n + self.predicted_n:5d} tokens",
        ]
        if self.draft_n:
            lines.append(f"draft acceptance rate = {self.draft_n_accepted / self.draft_n:.5f} "
                         f"({self.draft_n_accepted:5d} accepted / {self.draft_n:5d} generated)")
        return "\n".join(lines)


@dataclass
class TopLogprob:
    """One of the most likely tokens at a position."""

    token: str
    id: int
    logprob: float
    bytes: Optional[list]

    def to_openai(self) -> dict:
        return {"token": self.token, "logprob": self.logprob, "bytes": self.bytes}


@dataclass
class TokenLogprob:
    """A generated (or prompt) token with its log-probability under the model's raw
    distribution (before the sampler chain), and the most likely alternatives there."""

    token: str
    id: int
    logprob: float
    bytes: Optional[list]
    top_logprobs: list = field(default_factory=list)

    def to_openai(self) -> dict:
        """The shape of one entry of OpenAI's ``choices[].logprobs.content``."""
        return {"token": self.token, "logprob": self.logprob, "bytes": self.bytes,
                "top_logprobs": [t.to_openai() for t in self.top_logprobs]}


@dataclass
class Completion:
    """The result of one generation."""

    text: str
    tokens: list
    finish_reason: str            # "stop" | "length" | "eog" | "tool_calls"
    prompt_tokens: int
    timings: Timings = field(default_factory=Timings)
    index: int = 0                # which of n answers (or which prompt of generate())
    logprobs: Optional[list] = None          # list[TokenLogprob], with logprobs=True
    prompt_logprobs: Optional[list] = None   # list[TokenLogprob] for prompt tokens 2..n (echo)
    tool_calls: Optional[list] = None        # OpenAI-shaped tool calls (chat with tools)
    content: Optional[str] = None            # the text outside tool calls (chat with tools)
    reasoning: Optional[str] = None          # a reasoning model's thinking (chat); None when there was none
    n_discarded: int = 0                     # tokens context shifts dropped from its slot (LLM(context_shift=True))

    @property
    def usage(self) -> dict:
        n = len(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n,
                "prompt_tokens_details": {"cached_tokens": self.timings.cached_n}}

    def logprobs_openai(self) -> Optional[dict]:
        """``{"content": [...]}`` as in OpenAI's chat completion choices, or None."""
        if self.logprobs is None:
            return None
        return {"content": [t.to_openai() for t in self.logprobs]}

    def __str__(self) -> str:
        return self.text


@dataclass
class Chunk:
    """A piece of a streamed answer: new text, the tokens behind it, their log-probabilities
    (with logprobs=True) and, on the last chunk of an answer, its finish_reason.  In a chat
    with a reasoning model, `reasoning` holds new thinking text (None when the piece has
    none) and `text` the answer's only.  An async stream opened with ``prompt_progress=True``
    also yields chunks with no text whose `prompt_progress` says how far the prompt's
    evaluation is, in llama-server's names: ``{"total", "cache", "processed", "time_ms"}``."""

    index: int
    text: str
    token_ids: list
    logprobs: Optional[list] = None
    finish_reason: Optional[str] = None
    reasoning: Optional[str] = None
    prompt_progress: Optional[dict] = None


def token_text(vocab: Any, tok: int) -> tuple:
    """(text, utf-8 bytes) of one token, as OpenAI reports it (special tokens rendered)."""
    piece = vocab.token_to_piece(tok, True)
    return piece.decode("utf-8", "replace"), list(piece)


def token_logprob(vocab: Any, entry: tuple) -> TokenLogprob:
    """A TokenLogprob of one engine entry ``(token, logprob, [(alternative, logprob), ...])``."""
    tok, lp, top = entry
    text, raw = token_text(vocab, tok)
    tops = []
    for t, l in top:
        t_text, t_raw = token_text(vocab, t)
        tops.append(TopLogprob(token=t_text, id=t, logprob=l, bytes=t_raw))
    return TokenLogprob(token=text, id=tok, logprob=lp, bytes=raw, top_logprobs=tops)


def completion_from(req: Any, vocab: Any, *, t_start: float, load_ms: float = 0.0, index: int = 0,
                    echo_text: Optional[str] = None) -> Completion:
    """The Completion of a finished GenerationRequest (its timings measured from `t_start`;
    `load_ms` is reported by an LLM's first call only)."""
    n_gen = len(req.tokens)
    prompt_n = req.n_prompt_evaluated
    timings = Timings(
        load_ms=load_ms,
        prompt_n=prompt_n, prompt_ms=req.t_prompt_ms if prompt_n else 0.0,
        cached_n=req.n_cached_tokens if prompt_n else req.n_prompt,
        predicted_n=max(n_gen - 1, 0) if req.finish_reason != "eog" else n_gen, predicted_ms=req.t_gen_ms,
        sample_n=n_gen + (1 if req.finish_reason == "eog" else 0), sample_ms=req.t_sample_ms,
        ttft_ms=req.t_first_token_ms, total_ms=(time.perf_counter() - t_start) * 1000.0,
        draft_n=req.n_drafted, draft_n_accepted=req.n_draft_accepted)
    logprobs = [token_logprob(vocab, e) for e in req.logprobs] if req.n_logprobs >= 0 else None
    prompt_logprobs = None
    if req.prompt_logprobs:
        prompt_logprobs = [token_logprob(vocab, e) for e in req.prompt_logprobs_list]
    text = req.text if echo_text is None else echo_text + req.text
    return Completion(text=text, tokens=req.tokens, finish_reason=req.finish_reason, prompt_tokens=req.n_prompt,
                      timings=timings, index=index, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                      n_discarded=req.n_discarded)
