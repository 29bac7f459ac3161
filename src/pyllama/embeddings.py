"""Embeddings (LLM.embed): texts packed into batches on a context of their own, pooled as the
GGUF says, one row per text.

The embeddings context is separate from the generation context (pooling and outputs differ),
made on first use and grown when a call needs more sequences; the LLM's lock guards it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence, Union

from pyllama import _core
from pyllama._requests import is_chat
from pyllama.errors import ContextLengthError

if TYPE_CHECKING:
    from pyllama.llm import LLM


#: llama.cpp's pooling types by name (LLM(pooling=...), llama-server's --pooling).
POOLING_TYPES = ("none", "mean", "cls", "last", "rank")


def check_pooling(pooling: Any) -> Any:
    """`pooling` if it is None (the GGUF's own) or one of POOLING_TYPES; else ValueError."""
    if pooling is not None and pooling not in POOLING_TYPES:
        raise ValueError(f"pooling must be one of {', '.join(POOLING_TYPES)} (or None: the model's own), "
                         f"got {pooling!r}")
    return pooling


def pooling_of(llm: "LLM") -> str:
    """The pooling embed() uses: LLM(pooling=...), else the GGUF's ({arch}.pooling_type: 1 mean,
    2 cls, 3 last, 4 rank) when it names one other than none, else mean (decoder LMs name none)."""
    if getattr(llm, "pooling", None) is not None:
        return llm.pooling
    return {"1": "mean", "2": "cls", "3": "last", "4": "rank"}.get(
        str(llm._model.meta(f"{llm._model.architecture}.pooling_type")), "mean")


def embed(llm: "LLM", texts: Union[str, Sequence[str]], normalize: bool = True) -> Any:
    """LLM.embed: a 1-D array for one text, a 2-D array (one row per text) for many."""
    if llm.embedding and pooling_of(llm) == "none":
        raise ValueError("this model is loaded with pooling='none': its embeddings are one vector per token "
                         "(pyllama.embeddings.embed_tokens), not one per text")
    return _embed(llm, texts, normalize, per_token=False)


def embed_tokens(llm: "LLM", texts: Sequence[Any]) -> list:
    """With LLM(pooling="none"): for each text (or token list), a 2-D array with one row per
    token, not normalized (llama-server's /embedding with --pooling none)."""
    if pooling_of(llm) != "none":
        raise ValueError(f"embed_tokens() needs LLM(pooling='none'), this one pools with {pooling_of(llm)!r}")
    return _embed(llm, list(texts), False, per_token=True)


def _embed(llm: "LLM", texts: Any, normalize: bool, per_token: bool) -> Any:
    import numpy as np

    llm._check_open()
    if not llm.embedding:
        raise ValueError("load the model with LLM(..., embedding=True) to compute embeddings")
    single = isinstance(texts, str)
    items = [texts] if single else list(texts)
    if not items:
        return np.zeros((0, llm._model.n_embd), dtype=np.float32)
    if any(isinstance(t, _core.MediaPrompt) or is_chat(t) for t in items):
        raise TypeError("embed() takes texts (or token lists), not chats or prompts with images")
    with llm._lock:
        toks = [llm._prompt_tokens(t) for t in items]
        n_batch = llm._ctx_params["n_batch"]
        # One round's tokens must fit the batch and the KV memory together (the context
        # below is unified: every sequence may use any of its n_ctx cells).
        budget = min(llm._ctx_params["n_ctx"], n_batch)
        for t in toks:
            if len(t) > budget:
                raise ContextLengthError(
                    f"a text of {len(t)} tokens exceeds the embedding limit of {budget} tokens "
                    f"(the smaller of n_batch={n_batch} and n_ctx={llm._ctx_params['n_ctx']})")
        pooling = pooling_of(llm)
        if pooling == "mean":
            # llama.cpp needs its worst-case micro-batch to split evenly over the sequences
            # (see embed_slots); with non-causal attention (encoders) that micro-batch is
            # n_batch or n_ctx padded to 256, so take a divisor of all of them.
            split = budget
            if llm._model.meta(f"{llm._model.architecture}.attention.causal") == "false":
                split = math.gcd(budget, n_batch, 256)
            n_seq = embed_slots(min(len(items), 64), split)
        else:
            n_seq = min(len(items), 64, budget)
        if llm._embed_ctx is None or llm._embed_ctx.n_seq_max < n_seq:
            if llm._embed_ctx is not None:
                llm._embed_ctx.close()
                llm._embed_ctx = None
            params = dict(llm._ctx_params)
            params["n_ubatch"] = params["n_batch"]
            # kv_unified: with per-sequence KV buffers (kv_unified=False) each sequence would
            # get only n_ctx / n_seq_max cells and one long text of a round would not fit.
            params["kv_unified"] = True
            llm._embed_ctx = _core.Context(llm._model, embeddings=True, pooling=pooling, n_seq_max=n_seq,
                                           **params)
        ctx = llm._embed_ctx
        out = None
        i = 0
        while i < len(toks):
            batch = _core.Batch(budget, ctx.n_seq_max)
            seqs = []
            n_tokens = 0
            while i < len(toks) and len(seqs) < ctx.n_seq_max and n_tokens + len(toks[i]) <= budget:
                n_tokens += len(toks[i])
                seqs.append(i)
                i += 1
            batch.add_sequences([toks[j] for j in seqs], logits_all=True)   # sequence s = seqs[s]
            ctx.kv_clear()   # (a no-op for an encoder: it keeps no KV memory)
            ctx.decode(batch)
            llm._stats.add_embedding_decode(n_tokens)
            if per_token:       # pooling none: every token is an output, in batch order
                if out is None:
                    out = [None] * len(items)
                first = 0
                for idx in seqs:
                    out[idx] = np.stack([ctx.embeddings(first + k) for k in range(len(toks[idx]))])
                    first += len(toks[idx])
                continue
            for s, idx in enumerate(seqs):
                row = ctx.embeddings_seq(s)
                if out is None:   # n_embd floats, or n_cls_out scores for a reranker
                    out = np.empty((len(items), len(row)), dtype=np.float32)
                out[idx] = row
        if normalize:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out = out / np.where(norms == 0, 1.0, norms)
        return out[0] if single else out


def embed_slots(wanted: int, n_tokens: int) -> int:
    """n_seq_max for an embeddings context: llama.cpp (mean pooling) aborts in ggml_mul_mat
    (GGML_ASSERT ggml_can_mul_mat) unless its worst-case ubatch of min(n_ctx, n_ubatch) tokens
    splits evenly across the sequences, so take the nearest divisor of n_tokens (up to 64
    sequences; fewer slots just mean more rounds)."""
    for d in range(wanted, 65):
        if n_tokens % d == 0:
            return d
    for d in range(min(wanted, 64), 0, -1):
        if n_tokens % d == 0:
            return d
    return 1
