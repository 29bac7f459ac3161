"""Draft models for speculative decoding: a small model with the target's vocabulary proposes
the next tokens, the target verifies them in its own batch (docs/speculative.md).

The engine (``_core.Engine``) asks a :class:`DraftModel` for the drafts of every speculating
request at once (``draft_batch``), so drafting costs one draft-model decode per drafted
position for all of them together, not one per request.  Each engine slot has its own sequence
in the draft model's context, kept in step with the request's tokens: only what changed since
the last step is evaluated (the accepted tokens, usually one to a few), and a request that moved
to another slot, or a new one, has its history evaluated there once.

Drafting is greedy: the draft model's most likely token, while its probability is at least
``p_min`` (llama.cpp's ``--spec-draft-p-min``) and for at most the length the engine asks for.
Whether the draft is right only changes the speed: the target's own sampler chain decides every
token it emits.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Optional, Sequence, Union

import numpy as np

from pyllama import _core
from pyllama.errors import DecodeAborted, KVCacheFullError

logger = logging.getLogger("pyllama")

__all__ = ["DraftModel", "check_draft_vocab", "synth_acceptance"]

# llama.cpp's common_speculative_are_compatible: vocabularies may differ in size by this much
# (added tokens), and the first tokens (control tokens that models number differently) are not
# compared.
VOCAB_MAX_SIZE_DIFFERENCE = 128
VOCAB_CHECK_START_TOKEN_ID = 5


def synth_acceptance(rates: Optional[Sequence[float]], length: Optional[float], n_max: int) -> Optional[tuple]:
    """llama-server's synthetic acceptance (``--spec-synth-rates`` / ``--spec-synth-len``, for
    benchmarking the drafting path: the text it produces is not valid).  `rates[i]` is the
    unconditional probability that drafted token i is kept; `length` asks instead for that mean
    acceptance length, the target's token included (geometric rates, as llama.cpp's
    common_speculative_synth_rates_resolve finds them).  Returns each position's probability
    given that the one before it was kept, or None when neither is set."""
    if rates is None and length is None:
        return None
    if rates is not None and length is not None:
        raise ValueError("synthetic acceptance length and rates are mutually exclusive")
    if rates is not None:
        rates = [float(x) for x in rates]
        if len(rates) != n_max:
            raise ValueError(f"synthetic acceptance rates must contain {n_max} values (draft_max), got {len(rates)}")
        if not all(np.isfinite(x) and 0.0 <= x <= 1.0 for x in rates):
            raise ValueError("synthetic acceptance rates must be finite and within [0, 1]")
        if any(b > a for a, b in zip(rates, rates[1:])):
            raise ValueError("synthetic acceptance rates must be monotonically non-increasing")
    else:
        length = float(length)
        if not np.isfinite(length) or not 1.0 <= length <= n_max + 1.0:
            raise ValueError(f"synthetic acceptance length must be finite and within [1, {n_max + 1}]")
        p = 1.0 if length == n_max + 1.0 else 0.0
        if 1.0 < length < n_max + 1.0:
            lo, hi = 0.0, 1.0      # the p whose p + p^2 + ... + p^n_max is length - 1, by bisection
            for _ in range(32):
                mid = 0.5 * (lo + hi)
                if sum(mid ** (j + 1) for j in range(n_max)) < length - 1.0:
                    lo = mid
                else:
                    hi = mid
            p = 0.5 * (lo + hi)
        rates = [p ** (j + 1) for j in range(n_max)]
    conditional, before = [], 1.0
    for rate in rates:
        conditional.append(rate / before if before > 0.0 else 0.0)
        before = rate
    return tuple(conditional)


def load_draft_weights(target: "_core.Vocab", path: Any, n_gpu_layers: int,
                       vocab_only: bool) -> Optional["_core.Model"]:
    """LLM(draft_model=...)'s weights, checked against the target's vocabulary before anything
    else is made (llama.cpp's rules: check_draft_vocab); None, with a warning, for a recurrent
    or hybrid draft model (its drafts would have to leave its own memory after each
    rejection: it cannot)."""
    import warnings

    from pyllama.models import resolve_model

    if vocab_only:
        raise ValueError("draft_model needs the target's weights; it cannot be used with vocab_only=True")
    weights = _core.Model(str(resolve_model(path)), n_gpu_layers=n_gpu_layers)
    try:
        check_draft_vocab(target, weights.vocab)
    except BaseException:
        weights.close()
        raise
    if weights.is_recurrent or weights.is_hybrid:
        weights.close()
        warnings.warn("draft_model is ignored: it is a recurrent or hybrid model (its memory cannot drop "
                      "rejected draft tokens); generating without speculative decoding", RuntimeWarning,
                      stacklevel=3)
        return None
    return weights


def check_draft_vocab(target: "_core.Vocab", draft: "_core.Vocab") -> None:
    """Raise ValueError, naming the first difference, unless `draft` can draft for `target`:
    llama.cpp's rules (same tokenizer type, same BOS/EOS handling, sizes within 128, and every
    token from id 5 on spelled the same in both)."""
    if target.type != draft.type:
        raise ValueError(f"the draft model's vocabulary is of type {draft.type!r}, the target's {target.type!r}: "
                         "a draft model must share the target's tokenizer")
    if target.add_bos != draft.add_bos or (target.add_bos and target.bos != draft.bos):
        raise ValueError(f"the draft model's BOS handling differs from the target's (add_bos {draft.add_bos} "
                         f"bos {draft.bos} vs add_bos {target.add_bos} bos {target.bos})")
    if target.add_eos != draft.add_eos or target.eos != draft.eos:
        raise ValueError(f"the draft model's EOS differs from the target's (add_eos {draft.add_eos} eos "
                         f"{draft.eos} vs add_eos {target.add_eos} eos {target.eos})")
    n_t, n_d = target.n_tokens, draft.n_tokens
    if abs(n_t - n_d) > VOCAB_MAX_SIZE_DIFFERENCE:
        raise ValueError(f"the draft model has {n_d} tokens and the target {n_t}: more than "
                         f"{VOCAB_MAX_SIZE_DIFFERENCE} apart, so not the same vocabulary")
    for i in range(VOCAB_CHECK_START_TOKEN_ID, min(n_t, n_d)):
        a, b = target.token_text(i), draft.token_text(i)
        if a != b:
            raise ValueError(f"the draft model's vocabulary differs from the target's: token {i} is {b!r} in the "
                             f"draft model and {a!r} in the target")


class DraftModel:
    """A draft model loaded beside a target model (``LLM(draft_model=...)`` makes one).

    ``model``: a path or a loaded ``_core.Model``.  ``n_seq``: one sequence per engine slot;
    ``n_ctx``: the draft context's KV cells, shared by its sequences (the target's n_ctx: it
    holds what the target holds); ``p_min``: stop drafting at a token the draft model gives
    less than this probability.
    Called by the engine from its stepping thread, one call at a time (a lock makes sure).
    """

    def __init__(self, model: Union[str, os.PathLike, "_core.Model"], *, target_vocab: Optional["_core.Vocab"] = None,
                 n_seq: int = 1, n_ctx: int = 4096, n_batch: int = 512, n_threads: Optional[int] = None,
                 p_min: float = 0.0, n_gpu_layers: int = 0, **context_kwargs: Any) -> None:
        if not isinstance(p_min, (int, float)) or isinstance(p_min, bool) or not 0.0 <= p_min <= 1.0:
            raise ValueError(f"draft_p_min must be a number in [0, 1], got {p_min!r}")
        if not isinstance(n_seq, int) or n_seq < 1:
            raise ValueError(f"n_seq must be an int >= 1, got {n_seq!r}")
        self._owns_model = not isinstance(model, _core.Model)
        self.model = _core.Model(os.fspath(model), n_gpu_layers=n_gpu_layers) if self._owns_model else model
        try:
            if target_vocab is not None:
                check_draft_vocab(target_vocab, self.model.vocab)
            self.n_vocab_target = target_vocab.n_tokens if target_vocab is not None else self.model.vocab.n_tokens
            n_batch = max(int(n_batch), n_seq)
            self.context = _core.Context(self.model, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                                         n_seq_max=n_seq, n_threads=n_threads, kv_unified=True, **context_kwargs)
        except BaseException:
            if self._owns_model:
                self.model.close()
            raise
        self.p_min = float(p_min)
        self.n_seq = n_seq
        self.n_batch = self.context.n_batch      # llama.cpp caps it at n_ctx
        self._batch = _core.Batch(self.n_batch, n_seq)
        self.failed: Optional[BaseException] = None   # drafting stopped after this error
        self._seq_tokens: list = [[] for _ in range(n_seq)]   # what each draft sequence holds, in order
        self._lock = threading.Lock()
        self.n_draft_calls = 0      # draft_batch calls, and the requests they drafted for
        self.n_draft_items = 0
        self.n_clears = 0           # times the draft context was cleared (full, or an error)

    # The engine's per-request hook (GenerationRequest(drafter=...)) accepts any callable; a
    # DraftModel used that way drafts for one history on sequence 0.
    def __call__(self, history: Sequence[int], limit: int) -> list:
        return self.draft_batch([(0, history, limit)])[0]

    def draft_batch(self, items: Sequence[tuple]) -> list:
        """``items``: (slot, token history, limit) per request; returns a draft (list of token
        ids, perhaps empty) per item.  Slots outside the draft context's sequences, or two
        items on one slot, share nothing: such items get no draft."""
        with self._lock:
            if self.failed is not None:
                return [[] for _ in items]
            self.n_draft_calls += 1
            self.n_draft_items += len(items)
            try:
                return self._draft(items)
            except (KVCacheFullError, DecodeAborted) as exc:
                # The draft context is full (histories longer than it holds), or LLM.close()
                # stopped its decode: start over, and let this step go without drafts rather
                # than fail anyone's request (drafts only ever change the speed).
                logger.debug("draft model: %s; drafting starts over", exc)
                self._clear()
                return [[] for _ in items]
            except Exception as exc:   # noqa: BLE001 - reported once, requests go on undrafted
                logger.warning("the draft model failed (%s: %s); decoding goes on without drafts",
                               type(exc).__name__, exc, exc_info=True)
                self.failed = exc
                self._clear()
                return [[] for _ in items]
            except BaseException:
                # Ctrl-C mid-way: what the sequences hold is unknown now.
                self._clear()
                raise

    def close(self) -> None:
        with self._lock:
            self.context.close()
            if self._owns_model:
                self.model.close()

    # ------------------------------------------------------------------ internals

    def _clear(self) -> None:
        self.n_clears += 1
        self.context.kv_clear()
        self._seq_tokens = [[] for _ in range(self.n_seq)]

    def _draft(self, items: Sequence[tuple]) -> list:
        ctx, batch = self.context, self._batch
        drafts: list = [[] for _ in items]
        live: list = []        # [item index, seq, next position, limit]
        seen: set = set()
        feeds: list = []       # (item index, seq, first position, tokens to evaluate)
        n_pos = ctx.n_ctx_seq
        for i, (slot, history, limit) in enumerate(items):
            # Drafted positions must fit the draft context's window too (it may be smaller).
            limit = min(limit, n_pos - len(history))
            if not 0 <= slot < self.n_seq or slot in seen or limit <= 0 or not history:
                continue
            seen.add(slot)
            held = self._seq_tokens[slot]
            keep = _common_prefix(held, history)
            keep = min(keep, len(history) - 1)     # the last token is evaluated again for its logits
            if keep < len(held):
                ctx.kv_seq_rm(slot, keep, -1)
                del held[keep:]
            feeds.append((i, slot, keep, list(history[keep:])))
            live.append([i, slot, len(history), limit])
        if not live:
            return drafts
        # Bring every sequence up to date: as few decodes as the batch allows, logits only at
        # each history's last token.
        out_idx = self._evaluate(feeds)
        while live:
            batch.clear()
            still = []
            for entry in live:
                i, slot, pos, limit = entry
                logits = ctx.logits(out_idx[i])[: self.n_vocab_target]
                tok = int(np.argmax(logits))
                top = float(logits[tok])
                # probability of the top token: 1 / sum(exp(l - max))
                p = 1.0 / float(np.exp(logits - top, dtype=np.float64).sum()) if self.p_min > 0 else 1.0
                if p < self.p_min:
                    continue
                drafts[i].append(tok)
                if len(drafts[i]) >= limit:
                    continue
                out_idx[i] = batch.add(tok, pos, slot, True)
                self._seq_tokens[slot].append(tok)
                entry[2] = pos + 1
                still.append(entry)
            live = still
            if live:
                ctx.decode(batch)
        return drafts

    def _evaluate(self, feeds: list) -> dict:
        """Decode each feed's tokens into its sequence; returns each item's batch index of its
        last token, all of them in the final decode (whose logits are the ones still there).
        Usually one decode: after a step the feeds are the accepted tokens, one to a few."""
        ctx, batch = self.context, self._batch
        if sum(len(toks) for _i, _s, _p, toks in feeds) > self.n_batch:
            # Long feeds (a new request's history): everything but the last tokens first.
            pending = [(slot, pos, toks[:-1]) for _i, slot, pos, toks in feeds if len(toks) > 1]
            while pending:
                batch.clear()
                room, rest = self.n_batch, []
                for slot, pos, toks in pending:
                    take = min(room, len(toks))
                    if take > 0:
                        batch.add_sequence(toks[:take], pos, slot, logits_last=False)
                        self._seq_tokens[slot].extend(toks[:take])
                        room -= take
                    if take < len(toks):
                        rest.append((slot, pos + take, toks[take:]))
                ctx.decode(batch)
                pending = rest
            feeds = [(i, slot, pos + len(toks) - 1, toks[-1:]) for i, slot, pos, toks in feeds]
        batch.clear()
        out_idx: dict = {}
        for i, slot, pos, toks in feeds:
            for k, tok in enumerate(toks):
                idx = batch.add(tok, pos + k, slot, k == len(toks) - 1)
            out_idx[i] = idx
            self._seq_tokens[slot].extend(toks)
        ctx.decode(batch)
        return out_idx


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two token lists (the usual case, a prefix of b, in C)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n      # binary search on the first difference: a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo
