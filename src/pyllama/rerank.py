"""Reranking (LLM.rerank): relevance scores of (query, document) pairs from a reranker model,
as llama-server's ``/rerank`` computes them.

A reranker is a GGUF with a classification head (``cls`` / ``cls.output`` tensors) whose
``{arch}.pooling_type`` is RANK (4), or that is loaded with ``LLM(..., pooling="rank")``
(llama-server's ``--reranking``): llama.cpp pools each sequence (its CLS token, or the last
one for a causal reranker such as Qwen3-Reranker), runs the head, and
``llama_get_embeddings_seq`` gives the scores; the relevance score is the first of them, raw
(a logit, not a probability), as llama-server reports it.

Each pair is one sequence, laid out as llama-server's ``format_prompt_rerank`` does:

* the model's ``rerank`` chat template (``tokenizer.chat_template.rerank``) when the GGUF has
  one, with ``{query}`` and ``{document}`` replaced, tokenized with special tokens parsed;
* else ``[BOS] query [EOS] [SEP] document [EOS]``, each special token only where the
  vocabulary adds it (add_bos, add_eos, add_sep; SEP stands in for a missing EOS): a BERT
  reranker gets ``[CLS] query [SEP] document``.

The pairs run through LLM.embed's batching (pyllama.embeddings), on its context.
"""

from __future__ import annotations

import functools
import mmap
import os
import re
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, FrozenSet, List, Optional, Sequence

from pyllama import embeddings

if TYPE_CHECKING:
    from pyllama._core import Model
    from pyllama.llm import LLM

__all__ = ["RerankResult", "pair_tokens", "rank_unsupported", "rerank"]

#: {arch}.pooling_type values (llama_pooling_type) by name.
POOLING_NAMES = {"0": "none", "1": "mean", "2": "cls", "3": "last", "4": "rank"}


@dataclass(frozen=True)
class RerankResult:
    """One document's place in a ranking."""

    #: Position of the document in the list given to rerank().
    index: int
    #: The classifier's first output for (query, document): higher is more relevant.
    relevance_score: float
    #: The document's text.
    document: str
    #: Tokens the pair took (llama-server's ``tokens_evaluated``).
    n_tokens: int

    def to_dict(self) -> Dict[str, Any]:
        return {"index": self.index, "relevance_score": self.relevance_score, "document": self.document}


def rerank(llm: "LLM", query: str, documents: Sequence[str], top_n: Optional[int] = None) -> List[RerankResult]:
    """LLM.rerank: the documents by relevance to `query`, best first (ties keep their order)."""
    if not isinstance(query, str):
        raise TypeError(f"query must be a str, got {type(query).__name__}")
    if isinstance(documents, (str, bytes)):
        raise TypeError("documents must be a list of strings, not one string")
    docs = list(documents)
    for i, d in enumerate(docs):
        if not isinstance(d, str):
            raise TypeError(f"documents[{i}] must be a str, got {type(d).__name__}")
    if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 1):
        raise ValueError(f"top_n must be an int >= 1 (or None for all), got {top_n!r}")
    llm._check_open()
    reason = rank_unsupported(llm)
    if reason is not None:
        raise ValueError(reason)
    if not docs:
        return []
    pairs = [pair_tokens(llm, query, d) for d in docs]
    scores = embeddings.embed(llm, pairs, normalize=False)   # one row of n_cls_out floats per pair
    results = [RerankResult(i, float(scores[i][0]), docs[i], len(pairs[i])) for i in range(len(docs))]
    results.sort(key=lambda r: -r.relevance_score)            # stable: equal scores keep their order
    return results if top_n is None else results[:top_n]


def pair_tokens(llm: "LLM", query: str, document: str) -> List[int]:
    """The tokens of one (query, document) pair, as llama-server's format_prompt_rerank lays
    them out (see the module's docstring)."""
    vocab = llm.vocab
    template = llm.model.chat_template("rerank")
    if template is not None:
        # (sequential, as llama-server's string_replace_all: a "{document}" inside the query
        # is replaced too)
        prompt = template.replace("{query}", query).replace("{document}", document)
        return vocab.tokenize(prompt, add_special=False, parse_special=True)
    eos = vocab.eos if vocab.eos != -1 else vocab.sep
    tokens: List[int] = []
    if vocab.add_bos:
        tokens.append(vocab.bos)
    tokens += vocab.tokenize(query, add_special=False, parse_special=False)
    if vocab.add_eos:
        tokens.append(eos)
    if _adds_sep(llm.model):
        tokens.append(vocab.sep)
    tokens += vocab.tokenize(document, add_special=False, parse_special=False)
    if vocab.add_eos:
        tokens.append(eos)
    return tokens


def rank_unsupported(llm: "LLM") -> Optional[str]:
    """Why `llm` cannot rerank (a sentence for the user), or None when it can."""
    model = llm.model
    # LLM(pooling=...) (llama-server's --pooling / --reranking) when given, else the GGUF's
    pooling = getattr(llm, "pooling", None) or POOLING_NAMES.get(
        str(model.meta(f"{model.architecture}.pooling_type")), "none")
    if pooling != "rank":
        return (f"this model cannot rerank: it pools with {pooling!r}, not 'rank' (a reranker GGUF, e.g. "
                "bge-reranker or jina-reranker, has a classification head and says 'rank'; "
                "LLM(..., pooling='rank') asks for it)")
    names = _tensor_names(llm.model_path)
    if names is not None and not names & _HEAD_TENSORS:
        return ("this model cannot rerank: it has no classification head (no cls.weight or cls.output.weight "
                "tensor), so rank pooling would score nothing")
    # What llama.cpp's common_init_from_params refuses for rank pooling.
    vocab = llm.vocab
    has_template = model.chat_template("rerank") is not None
    if vocab.bos == -1:
        return "this model cannot rerank: its vocabulary has no BOS token"
    if vocab.eos == -1 and vocab.sep == -1 and not has_template:
        return "this model cannot rerank: its vocabulary has no EOS or SEP token, and the GGUF no rerank template"
    if not llm.embedding:
        return "load the reranker with LLM(..., embedding=True) to rerank (as llama-server needs --reranking)"
    return None


def _adds_sep(model: "Model") -> bool:
    """llama_vocab_get_add_sep (which the extension does not expose), as llama.cpp's
    vocabulary loader decides it: tokenizer.ggml.add_sep_token when the GGUF has it, else true
    for WordPiece (BERT) vocabularies and the BPE ones of jina-v1-en, jina-v2-code and RoBERTa."""
    value = model.meta("tokenizer.ggml.add_sep_token")
    if value is not None:
        return value == "true"
    tok_model = model.meta("tokenizer.ggml.model")
    pre = model.meta("tokenizer.ggml.pre")
    return tok_model == "bert" or (tok_model == "gpt2" and pre in ("jina-v1-en", "jina-v2-code", "roberta-bpe"))


# ---- the classification head: tensor names from the GGUF header -------------------------------

#: Either makes llama.cpp's rank pooling run a head (llm_graph_context::build_pooling); with
#: neither, "rank" pooling returns the first float of the CLS embedding.
_HEAD_TENSORS = frozenset({"cls.weight", "cls.output.weight"})
_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")


def _tensor_names(path: str) -> Optional[FrozenSet[str]]:
    """Tensor names of a GGUF model (every part of a split one), or None if they cannot be
    read (then nothing is refused on their account)."""
    try:
        m = _SPLIT.match(os.path.basename(path))
        paths = [path]
        if m:
            n = int(m.group("n"))
            stem = os.path.join(os.path.dirname(path), m.group("stem"))
            paths = [f"{stem}-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
        names: FrozenSet[str] = frozenset()
        for p in paths:
            st = os.stat(p)
            part = _tensor_names_of_file(p, st.st_mtime_ns, st.st_size)
            if part is None:
                return None
            names |= part
        return names
    except (OSError, ValueError):   # (mmap of an empty file: ValueError)
        return None


#: GGUF value types -> struct format (8 string and 9 array are handled apart).
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                 12: "<d"}


@functools.lru_cache(maxsize=8)
def _tensor_names_of_file(path: str, mtime_ns: int, size: int) -> Optional[FrozenSet[str]]:
    """Walk the header of one GGUF file (v2/v3, little-endian) up to its tensor infos.  The
    metadata's strings are skipped by their lengths: a 150k-token vocabulary takes ~50 ms, once
    per file (cached by path, mtime and size)."""
    del mtime_ns, size   # (cache keys only)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            if data[:4] != b"GGUF":
                return None
            version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
            if version < 2 or version > 3:
                return None
            pos = 24

            def skip_value(vtype: int, pos: int) -> int:
                if vtype == 8:
                    (n,) = struct.unpack_from("<Q", data, pos)
                    return pos + 8 + n
                return pos + struct.calcsize(_GGUF_SCALARS[vtype])

            for _ in range(n_kv):
                (klen,) = struct.unpack_from("<Q", data, pos)
                pos += 8 + klen
                (vtype,) = struct.unpack_from("<I", data, pos)
                pos += 4
                if vtype == 9:
                    sub, n = struct.unpack_from("<IQ", data, pos)
                    pos += 12
                    if sub == 8:
                        for _ in range(n):
                            (slen,) = struct.unpack_from("<Q", data, pos)
                            pos += 8 + slen
                    else:
                        pos += n * struct.calcsize(_GGUF_SCALARS[sub])
                else:
                    pos = skip_value(vtype, pos)
            names = set()
            for _ in range(n_tensors):
                (nlen,) = struct.unpack_from("<Q", data, pos)
                pos += 8
                names.add(bytes(data[pos:pos + nlen]).decode("utf-8", "replace"))
                pos += nlen
                (n_dims,) = struct.unpack_from("<I", data, pos)
                pos += 4 + 8 * n_dims + 4 + 8     # dims, type, offset
            return frozenset(names)
        except (struct.error, KeyError, ValueError):
            return None
