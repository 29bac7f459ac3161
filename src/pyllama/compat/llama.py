"""llama-cpp-python's ``Llama`` class (0.3.x API) on pyllama's engine.

    from pyllama.compat import Llama          # or, after pyllama.install_as_llama_cpp():
    from llama_cpp import Llama               # the same class

    llm = Llama(model_path="model.gguf", n_ctx=2048, verbose=False)
    out = llm("Q: Name the planets. A:", max_tokens=32, stop=["Q:"])
    print(out["choices"][0]["text"])

Every call runs on one :class:`pyllama.LLM` (``Llama.llm``): the shared continuous-batching
engine, with its prompt cache, samplers and Python hooks.  This module only translates
arguments and result shapes; it has no generation loop, cache or sampler of its own, and
holds no lock around generation, so several threads calling one ``Llama`` batch together
instead of waiting for each other.

What differs from llama-cpp-python is listed in :data:`DIFFERENCES` (and docs/compat.md).
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import numpy.typing as npt

from pyllama.compat.llama_cache import BaseLlamaCache, LlamaCache, LlamaDiskCache, LlamaRAMCache  # noqa: F401
from pyllama.compat.llama_cache import _longest_prefix
from pyllama.compat.llama_types import *  # noqa: F401,F403
from pyllama.compat.llama_types import (
    ChatCompletionFunction,
    ChatCompletionRequestFunctionCall,
    ChatCompletionRequestMessage,
    ChatCompletionRequestResponseFormat,
    ChatCompletionTool,
    ChatCompletionToolChoiceOption,
    CompletionLogprobs,
    CreateChatCompletionResponse,
    CreateChatCompletionStreamResponse,
    CreateCompletionResponse,
    CreateCompletionStreamResponse,
    CreateEmbeddingResponse,
)

__all__ = [
    "Llama", "LlamaState", "LogitsProcessor", "LogitsProcessorList", "StoppingCriteria",
    "StoppingCriteriaList", "MinTokensLogitsProcessor", "CHandleError", "DIFFERENCES",
    "LLAMA_DEFAULT_SEED", "LLAMA_SPLIT_MODE_NONE", "LLAMA_SPLIT_MODE_LAYER", "LLAMA_SPLIT_MODE_ROW",
]

DOCS = "docs/compat.md"

# llama.cpp's constants, as llama_cpp.llama_cpp spells them (the ones the constructor takes).
LLAMA_DEFAULT_SEED = 0xFFFFFFFF
LLAMA_SPLIT_MODE_NONE = 0
LLAMA_SPLIT_MODE_LAYER = 1
LLAMA_SPLIT_MODE_ROW = 2
LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED = -1
LLAMA_POOLING_TYPE_UNSPECIFIED = -1
LLAMA_POOLING_TYPE_NONE = 0
LLAMA_ATTENTION_TYPE_UNSPECIFIED = -1

_SPLIT_MODES = {LLAMA_SPLIT_MODE_NONE: "none", LLAMA_SPLIT_MODE_LAYER: "layer", LLAMA_SPLIT_MODE_ROW: "row"}
# ggml_type values (GGML_TYPE_*) of the KV cache types llama.cpp supports, by pyllama's names.
_GGML_KV_TYPES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 6: "q5_0", 7: "q5_1", 8: "q8_0", 30: "bf16"}

#: Sequences one Llama runs at once (threads calling it concurrently), unless
#: ``Llama(..., n_parallel=N)`` says otherwise; each gets the full ``n_ctx`` the caller asked
#: for, so the KV memory is ``n_ctx * n_parallel`` cells, kept within this budget.
DEFAULT_N_PARALLEL = 8
KV_CELLS_BUDGET = 16384

#: Everything that behaves differently from llama-cpp-python 0.3.36 (docs/compat.md lists it).
DIFFERENCES: Dict[str, str] = {
    # constructor
    "n_ctx": "n_ctx is the context of one call, as in llama-cpp-python; the KV memory holds "
             "n_parallel such contexts (n_ctx * n_parallel cells) so that threads calling one Llama "
             "batch together. n_parallel (a pyllama keyword) defaults to min(8, 16384 // n_ctx), at least 1; "
             "Llama(..., n_parallel=1) allocates exactly what llama-cpp-python does.",
    "seed": "as llama-cpp-python: a call without seed draws its seed from the previous one "
            "(random.Random(seed).randint), so a fresh Llama repeats its sampled outputs; samplers are "
            "pyllama's (llama.cpp's own chain), so sampled texts differ from llama-cpp-python's ones "
            "at temperature > 0 (greedy output is the same).",
    "rope_scaling_type, yarn_*, attention_type, pooling_type, op_offload, swa_full, offload_kqv, no_perf": 
        "accepted and ignored (pyllama uses the GGUF's values); a non-default value warns once.",
    "numa, lora_base, last_n_tokens_size": "numa and lora_base are accepted and ignored; "
        "last_n_tokens_size is the repeat-penalty window, as there.",
    "repeat_penalty": "as in llama-cpp-python, the penalties count generated tokens only (pyllama's own "
                      "LLM also counts the prompt, as llama.cpp's tools do: SamplingParams.penalize_prompt).",
    "logits_all": "accepted and ignored: log-probabilities work without it (pyllama computes them in the "
                  "engine), so logprobs= never raises for logits_all=False.",
    "draft_model": "LlamaPromptLookupDecoding(max_ngram_size, num_pred_tokens) turns on the engine's n-gram "
                   "speculation (spec_type='ngram-simple', spec_ngram_size_n=max_ngram_size, "
                   "draft_max=num_pred_tokens), batched with every other call; another LlamaDraftModel is "
                   "called by the engine with the tokens so far, as there, its proposal cut to at most "
                   "draft_max (16) tokens a step.",
    "verbose": "True turns on pyllama's logging of llama.cpp (logger 'pyllama') and prints timings after "
               "each call; the system-info and metadata dumps llama-cpp-python prints are not printed.",
    "**kwargs": "pyllama.LLM keyword arguments (n_parallel, cache_prompt, chat_template, mmproj_path, "
                "kv_unified, rpc_servers, ...) are passed to it; other unknown keywords warn "
                "(llama-cpp-python drops them silently).",
    # raw handles and low-level stepping
    "ctx, _model, batch, _batch, _candidates": "raise CHandleError (an AttributeError and a "
        "NotImplementedError): pyllama has no ctypes pointers. hasattr() is False for them.",
    "_ctx": "a stand-in whose .ctx is an opaque non-None token; any other attribute (its ctypes "
            "methods) raises CHandleError.",
    "llama_cpp._internals": "importable; its classes (LlamaModel, LlamaContext, LlamaBatch, LlamaSampler, "
                            "...) raise CHandleError when constructed.",
    "model": "an opaque handle that llama_cpp.llama_cpp's functions (llama_model_get_vocab, "
             "llama_token_to_piece, llama_n_vocab, ...) accept; ctypes calls on it fail.",
    "eval / sample / generate": "work on the engine: eval() appends tokens to input_ids (they are "
        "evaluated by the next sample, through the engine's prompt cache: only what is new is decoded); "
        "sample() runs a one-token request; generate() streams a request and restarts it when tokens are "
        "sent into it. An end-of-generation token is reported as token_eos().",
    "scores, _scores, eval_logits": "empty (0 x n_vocab): pyllama keeps no per-position logits; use "
        "logprobs= or a logits_processor.",
    "input_ids, n_tokens": "the tokens of this Llama's last call (prompt + completion); with several "
        "threads, the last one to finish.",
    "reset()": "forgets input_ids/n_tokens only; other calls in flight are not disturbed "
               "(Llama.llm.reset() clears the engine's caches).",
    "save_state / load_state": "LlamaState holds the sequence's token ids (llama_state is a "
        "pyllama-encoded byte string of them), the seed and n_tokens, not llama.cpp's KV bytes: the engine "
        "shares one context among all calls. Loading restores input_ids, n_tokens and the seed; the next "
        "call re-uses the engine's prompt cache or re-evaluates the prefix. It pickles.",
    "set_cache": "LlamaRAMCache/LlamaDiskCache store LlamaStates (as above) after each completion and "
        "restore the longest-prefix one before it, as in llama-cpp-python; KV reuse itself is the engine's "
        "prompt cache. LlamaDiskCache writes pickle files (no diskcache dependency).",
    # generation
    "stream=True errors": "a bad request (prompt over n_ctx, bad grammar, ...) raises when "
                          "create_completion(stream=True) is called, not at the first next().",
    "stream chunks": "a chunk carries whole characters, sometimes of more than one token (llama-cpp-python "
                     "yields one chunk per token).",
    "suffix": "fill-in-the-middle with the model's FIM tokens when it has them (llama-cpp-python 0.3.36 "
              "inserts token id 0 there); without FIM tokens the suffix is appended to the text.",
    "tfs_z": "ignored: llama.cpp removed tail-free sampling (llama-cpp-python ignores it too).",
    "mirostat": "as llama-cpp-python, mirostat samples the raw logits (no temperature).",
    "temperature < 0": "sample from the full distribution (temperature 1, no truncation), as there.",
    "echo with token prompts": "the echoed prompt is its detokenized text (llama-cpp-python raises "
                               "TypeError).",
    "response_format": "OpenAI's {'type': 'json_schema', 'json_schema': {'schema': ...}} constrains the "
                       "output too (llama-cpp-python ignores it).",
    "tools": "with the GGUF's own template, tool calls are parsed from the answer (tool_choice 'auto') or "
             "forced by a grammar (a named tool / 'required') and returned as OpenAI tool_calls; streamed "
             "tool calls arrive in one delta.",
    "embed": "pooling is the GGUF's (mean for decoder models); pooling_type NONE (per-token "
             "embeddings) is not supported.",
    "chat_handler": "a multimodal handler (Llava15ChatHandler and siblings) loads its clip_model_path as "
                    "pyllama's projector and chats through the GGUF's template; any other handler is called "
                    "as llama-cpp-python calls it.",
}


class CHandleError(AttributeError, NotImplementedError):
    """A llama-cpp-python ctypes handle (``Llama.ctx``, ``.model``, ...) was asked for:
    pyllama has none.  An AttributeError, so ``hasattr(llm, "ctx")`` is False."""


class _NoCHandle:
    """A class attribute that raises CHandleError on instances."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        raise CHandleError(
            f"Llama.{self.name} is a ctypes pointer in llama-cpp-python; pyllama has no ctypes handles (its "
            f"llama.cpp objects live in a Cython extension). Use Llama's methods, or Llama.llm (the "
            f"pyllama.LLM underneath) and its .model/.context; see {DOCS}")


class _ContextWrapper:
    """``Llama._ctx``: in llama-cpp-python a Python wrapper whose ``.ctx`` is the C pointer.
    Here ``.ctx`` is an opaque, non-None token (there is a context: the LLM's), and every other
    attribute raises CHandleError instead of pretending to be llama.cpp's context."""

    __slots__ = ("ctx",)

    def __init__(self, llama: "Llama") -> None:
        self.ctx = ("pyllama-context", id(llama))

    def __getattr__(self, name: str) -> Any:
        raise CHandleError(
            f"Llama._ctx.{name}: llama-cpp-python's context wrapper calls ctypes functions; pyllama has no ctypes "
            f"layer. Use Llama's methods (reset(), n_ctx(), ...) or Llama.llm; see {DOCS}")


# ---- the hook types llama-cpp-python defines here ----------------------------------------

LogitsProcessor = Callable[[npt.NDArray[np.intc], npt.NDArray[np.single]], npt.NDArray[np.single]]


class LogitsProcessorList(List[LogitsProcessor]):
    """Logits processors, called in order as ``processor(input_ids, scores) -> scores``."""

    def __call__(self, input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
        for processor in self:
            scores = processor(input_ids, scores)
        return scores


StoppingCriteria = Callable[[npt.NDArray[np.intc], npt.NDArray[np.single]], bool]


class StoppingCriteriaList(List[StoppingCriteria]):
    """Stopping criteria; any True stops the generation."""

    def __call__(self, input_ids: npt.NDArray[np.intc], logits: npt.NDArray[np.single]) -> bool:
        return any([criterion(input_ids, logits) for criterion in self])


class MinTokensLogitsProcessor:
    """Bans the end-of-sequence token until `min_tokens` tokens were generated."""

    def __init__(self, min_tokens: int, token_eos: int):
        self.min_tokens = min_tokens
        self.token_eos = token_eos
        self.prompt_tokens: Optional[int] = None

    def __call__(self, input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
        if self.prompt_tokens is None:
            self.prompt_tokens = len(input_ids)
        if len(input_ids) - self.prompt_tokens < self.min_tokens:
            scores[self.token_eos] = -np.inf
        return scores


class _Criteria:
    """llama-cpp-python's stopping criteria as pyllama hooks.

    llama-cpp-python asks its criteria, right after sampling token k, with the tokens
    evaluated so far (prompt + tokens 1..k-1), and on True drops token k.  pyllama asks its
    criteria after token k with ``input_ids`` ending in token k, and on True drops token k's
    text.  So each criterion sees ``input_ids[:-1]``: the same arguments at the same step, the
    same output.  `fired` records that the request ended this way (token k is still in the
    request's tokens; llama-cpp-python does not count it)."""

    def __init__(self, criteria: Sequence[Callable[..., Any]]):
        self.criteria = list(criteria)
        self.fired = False

    def __call__(self, input_ids: Any, scores: Any) -> bool:
        stop = False
        for crit in self.criteria:
            if crit(input_ids[:-1], scores):
                stop = True
        if stop:
            self.fired = True
        return stop


# ---- state ------------------------------------------------------------------------------

_STATE_MAGIC = b"PYLS1\0"



def _draft_model_adapter(draft_model: Any) -> Callable[[list, int], list]:
    """A llama-cpp-python draft model (``draft_model(input_ids) -> token ids``) as the engine's
    ``drafter(token_ids, limit)``."""

    def drafter(token_ids: list, limit: int) -> list:
        out = draft_model(np.asarray(token_ids, dtype=np.intc))
        return [int(t) for t in np.asarray(out).reshape(-1)[:limit]]

    return drafter

class LlamaState:
    """What ``Llama.save_state()`` returns (picklable).  Fields as llama-cpp-python's:
    ``input_ids`` (n_ctx int32), ``scores`` (empty: pyllama keeps no logits), ``n_tokens``,
    ``llama_state`` (bytes) and ``llama_state_size``, ``seed``.

    In pyllama a sequence's state is its token ids: the engine re-creates the KV cells from
    them through its prompt cache.  ``llama_state`` holds them (a small header and int32 ids)."""

    def __init__(self, input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single], n_tokens: int,
                 llama_state: bytes, llama_state_size: int, seed: int):
        self.input_ids = input_ids
        self.scores = scores
        self.n_tokens = n_tokens
        self.llama_state = llama_state
        self.llama_state_size = llama_state_size
        self.seed = seed

    def __repr__(self) -> str:
        return f"<LlamaState n_tokens={self.n_tokens} seed={self.seed}>"


class _Settings:
    """``Llama.context_params`` / ``Llama.model_params``: plain attributes with
    llama-cpp-python's field names (read them; writing changes nothing)."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"{type(self).__name__}({inner})"


class _ContextParams(_Settings):
    pass


class _ModelParams(_Settings):
    pass


def _finish(reason: Optional[str]) -> Optional[str]:
    if reason in ("eog", "stop"):
        return "stop"
    return reason


def _unsupported(grammar: Any) -> str:
    """GBNF text of a LlamaGrammar (its ``_grammar``), or of a plain string."""
    if isinstance(grammar, str):
        return grammar
    text = getattr(grammar, "_grammar", None)
    if not isinstance(text, str):
        raise TypeError(f"grammar must be a LlamaGrammar (or GBNF text), got {type(grammar).__name__}")
    return text


_LLM_PASSTHROUGH = frozenset({
    "n_parallel", "cache_prompt", "chat_template", "mmproj_path", "clip_model_path", "kv_unified",
    "rpc_servers", "f16_kv", "spec_type", "draft_max", "draft_min", "spec_ngram_size_n", "draft_p_min",
    "spec_cost_model",
})


class Llama:
    """llama-cpp-python's high-level ``Llama`` on pyllama's engine (see the module docstring
    and :data:`DIFFERENCES`).  ``Llama.llm`` is the :class:`pyllama.LLM` that runs everything."""

    ctx = _NoCHandle()
    _model = _NoCHandle()
    batch = _NoCHandle()
    _batch = _NoCHandle()
    _candidates = _NoCHandle()

    def __init__(
        self,
        model_path: str,
        *,
        # Model Params
        n_gpu_layers: int = 0,
        split_mode: int = LLAMA_SPLIT_MODE_LAYER,
        main_gpu: int = 0,
        tensor_split: Optional[List[float]] = None,
        vocab_only: bool = False,
        use_mmap: bool = True,
        use_mlock: bool = False,
        kv_overrides: Optional[Dict[str, Union[bool, int, float, str]]] = None,
        # Context Params
        seed: int = LLAMA_DEFAULT_SEED,
        n_ctx: int = 512,
        n_batch: int = 512,
        n_ubatch: int = 512,
        n_threads: Optional[int] = None,
        n_threads_batch: Optional[int] = None,
        rope_scaling_type: Optional[int] = LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED,
        pooling_type: int = LLAMA_POOLING_TYPE_UNSPECIFIED,
        attention_type: int = LLAMA_ATTENTION_TYPE_UNSPECIFIED,
        rope_freq_base: float = 0.0,
        rope_freq_scale: float = 0.0,
        yarn_ext_factor: float = -1.0,
        yarn_attn_factor: float = 1.0,
        yarn_beta_fast: float = 32.0,
        yarn_beta_slow: float = 1.0,
        yarn_orig_ctx: int = 0,
        logits_all: bool = False,
        embedding: bool = False,
        offload_kqv: bool = True,
        flash_attn: bool = False,
        op_offload: Optional[bool] = None,
        swa_full: Optional[bool] = None,
        # Sampling Params
        no_perf: bool = False,
        last_n_tokens_size: int = 64,
        # LoRA Params
        lora_base: Optional[str] = None,
        lora_scale: float = 1.0,
        lora_path: Optional[str] = None,
        # Backend Params
        numa: Union[bool, int] = False,
        # Chat Format Params
        chat_format: Optional[str] = None,
        chat_handler: Optional[Any] = None,
        # Speculative Decoding
        draft_model: Optional[Any] = None,
        # Tokenizer Override
        tokenizer: Optional[Any] = None,
        # KV cache quantization
        type_k: Optional[int] = None,
        type_v: Optional[int] = None,
        # Misc
        spm_infill: bool = False,
        verbose: bool = True,
        # Extra Params
        **kwargs: Any,
    ):
        """Load a GGUF model (llama-cpp-python's parameters; see :data:`DIFFERENCES` for the
        ones pyllama accepts and ignores).  ``n_parallel=N`` (pyllama) sets how many calls run
        at once; other pyllama.LLM keywords are passed on."""
        from pyllama.llm import LLM

        self._init_args = {k: v for k, v in locals().items() if k not in ("self", "LLM", "kwargs", "__class__")}
        self._init_args.update(kwargs)
        self.verbose = verbose
        self.model_path = os.fspath(model_path)
        if not os.path.exists(self.model_path):
            raise ValueError(f"Model path does not exist: {model_path}")

        ignored = {
            "rope_scaling_type": (rope_scaling_type, (LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED, None)),
            "pooling_type": (pooling_type, (LLAMA_POOLING_TYPE_UNSPECIFIED,)),
            "attention_type": (attention_type, (LLAMA_ATTENTION_TYPE_UNSPECIFIED,)),
            "yarn_ext_factor": (yarn_ext_factor, (-1.0,)), "yarn_attn_factor": (yarn_attn_factor, (1.0,)),
            "yarn_beta_fast": (yarn_beta_fast, (32.0,)), "yarn_beta_slow": (yarn_beta_slow, (1.0,)),
            "yarn_orig_ctx": (yarn_orig_ctx, (0,)), "op_offload": (op_offload, (None, True)),
            "swa_full": (swa_full, (None, False)), "offload_kqv": (offload_kqv, (True,)),
            "lora_base": (lora_base, (None,)),
            "numa": (numa, (False, 0)),
        }
        odd = [name for name, (value, defaults) in ignored.items() if value not in defaults]
        if odd:
            warnings.warn(f"Llama(): pyllama ignores {', '.join(odd)} (see {DOCS})", UserWarning, stacklevel=2)

        passthrough = {k: kwargs.pop(k) for k in list(kwargs) if k in _LLM_PASSTHROUGH}
        # llama-cpp-python's prompt-lookup drafting is n-gram self-speculation: pyllama's engine
        # does it natively (batched, in C), with the same two sizes.
        from pyllama.compat.llama_speculative import LlamaPromptLookupDecoding

        if isinstance(draft_model, LlamaPromptLookupDecoding) and "spec_type" not in passthrough:
            passthrough.update(spec_type="ngram-simple", draft_max=max(1, int(draft_model.num_pred_tokens)),
                               spec_ngram_size_n=max(1, int(draft_model.max_ngram_size)))
        elif draft_model is not None and "spec_type" not in passthrough:
            if not callable(draft_model):
                raise TypeError(f"draft_model must be a LlamaDraftModel (callable), got {type(draft_model).__name__}")
            # Any other LlamaDraftModel: the engine calls it with the tokens so far (a NumPy
            # intc array, as llama-cpp-python does) and verifies its proposal in the batch.
            passthrough.update(spec_type="draft", draft_model=_draft_model_adapter(draft_model))
        if kwargs:
            warnings.warn(f"Llama(): unknown keyword argument(s) ignored: {', '.join(sorted(kwargs))}",
                          UserWarning, stacklevel=2)

        if split_mode not in _SPLIT_MODES:
            raise ValueError(f"split_mode must be one of LLAMA_SPLIT_MODE_NONE/LAYER/ROW (0, 1, 2), got {split_mode!r}")
        kv_types = {}
        for name, value in (("type_k", type_k), ("type_v", type_v)):
            if value is None:
                continue
            if isinstance(value, str):
                kv_types[name] = value.lower()
            elif value in _GGML_KV_TYPES:
                kv_types[name] = _GGML_KV_TYPES[value]
            else:
                raise ValueError(f"{name}={value!r}: llama.cpp's KV cache takes GGML_TYPE_F32/F16/BF16/Q8_0/Q4_0/"
                                 f"Q4_1/Q5_0/Q5_1 ({sorted(_GGML_KV_TYPES)})")

        # The multimodal chat handlers carry the projector llama-cpp-python loads with them.
        clip = getattr(chat_handler, "clip_model_path", None) if chat_handler is not None else None
        if clip is not None and "mmproj_path" not in passthrough and "clip_model_path" not in passthrough:
            passthrough["mmproj_path"] = os.fspath(clip)
        template = getattr(chat_handler, "chat_template", None) if clip is not None else None
        if isinstance(template, str) and "chat_template" not in passthrough:
            passthrough["chat_template"] = template

        if n_ctx == 0:
            from pyllama import _core

            # The training context, from the GGUF's metadata (a vocab-only load reads no hparams).
            probe = _core.Model(self.model_path, vocab_only=True)
            try:
                train = probe.meta(f"{probe.architecture}.context_length")
                n_ctx = int(train) if train and str(train).isdigit() and int(train) > 0 else 2048
            finally:
                probe.close()
        self._n_ctx = int(n_ctx)
        self.n_batch = min(self._n_ctx, n_batch)
        n_parallel = passthrough.pop("n_parallel", None)
        if n_parallel is None:
            n_parallel = max(1, min(DEFAULT_N_PARALLEL, KV_CELLS_BUDGET // max(self._n_ctx, 1), self.n_batch))
        self.n_parallel = int(n_parallel)

        self.llm = LLM(
            self.model_path, n_ctx=self._n_ctx * self.n_parallel, n_batch=self.n_batch,
            n_ubatch=min(self.n_batch, n_ubatch), n_threads=n_threads, n_threads_batch=n_threads_batch,
            n_parallel=self.n_parallel, n_gpu_layers=n_gpu_layers, main_gpu=main_gpu, tensor_split=tensor_split,
            split_mode=_SPLIT_MODES[split_mode], use_mmap=use_mmap, use_mlock=use_mlock, vocab_only=vocab_only,
            kv_overrides=kv_overrides, flash_attn=bool(flash_attn), rope_freq_base=rope_freq_base,
            rope_freq_scale=rope_freq_scale, lora_path=lora_path, lora_scale=lora_scale, embedding=embedding,
            verbose=verbose, **kv_types, **passthrough)
        self._vocab = self.llm.vocab
        self._vocab_only = vocab_only
        self._embedding = embedding
        self._logits_all = logits_all
        self.last_n_tokens_size = last_n_tokens_size
        self.lora_base, self.lora_path, self.lora_scale = lora_base, lora_path, lora_scale
        self.spm_infill = spm_infill
        self.tensor_split = tensor_split
        self.kv_overrides = kv_overrides
        self.numa = numa
        self.draft_model = draft_model
        self._custom_tokenizer = tokenizer is not None
        self.tokenizer_ = tokenizer
        self.cache: Optional[BaseLlamaCache] = None
        self._seed = seed or LLAMA_DEFAULT_SEED
        self._seed_lock = threading.Lock()   # only the seed derivation; never held while generating
        self._n_vocab = self._vocab.n_tokens
        self._pieces: Dict[int, str] = {}

        ctx = self.llm.context if not vocab_only else None
        self.n_threads = ctx.n_threads if ctx is not None else (n_threads or max(os.cpu_count() or 1, 2) // 2)
        self.n_threads_batch = ctx.n_threads_batch if ctx is not None else (n_threads_batch or os.cpu_count() or 1)
        self.model_params = _ModelParams(
            n_gpu_layers=0x7FFFFFFF if n_gpu_layers == -1 else n_gpu_layers, split_mode=split_mode,
            main_gpu=main_gpu, tensor_split=tensor_split, vocab_only=vocab_only, use_mmap=use_mmap,
            use_mlock=use_mlock, kv_overrides=kv_overrides)
        self.context_params = _ContextParams(
            n_ctx=self._n_ctx, n_batch=self.n_batch, n_ubatch=min(self.n_batch, n_ubatch),
            n_seq_max=self.n_parallel, n_threads=self.n_threads, n_threads_batch=self.n_threads_batch,
            rope_scaling_type=rope_scaling_type, pooling_type=pooling_type, attention_type=attention_type,
            rope_freq_base=rope_freq_base, rope_freq_scale=rope_freq_scale, yarn_ext_factor=yarn_ext_factor,
            yarn_attn_factor=yarn_attn_factor, yarn_beta_fast=yarn_beta_fast, yarn_beta_slow=yarn_beta_slow,
            yarn_orig_ctx=yarn_orig_ctx, embeddings=embedding, offload_kqv=offload_kqv,
            flash_attn=bool(flash_attn), flash_attn_type=1 if flash_attn else 0, op_offload=op_offload,
            swa_full=swa_full, type_k=type_k if type_k is not None else 1,
            type_v=type_v if type_v is not None else 1, no_perf=no_perf)

        self.metadata: Dict[str, str] = dict(self.llm.metadata)
        self.chat_handler = chat_handler
        self._chat_handlers: Dict[str, Any] = {}
        if chat_format is None and chat_handler is None:
            # llama-cpp-python: the GGUF's template when it has one, else llama-2's format.
            chat_format = "chat_template.default" if "tokenizer.chat_template" in self.metadata else "llama-2"
        self.chat_format = chat_format

        self.n_tokens = 0
        self.input_ids: npt.NDArray[np.intc] = np.zeros((self._n_ctx,), dtype=np.intc)
        self._is_recurrent = bool(self.llm.model.is_recurrent)
        self._is_hybrid = bool(getattr(self.llm.model, "is_hybrid", False))
        if tokenizer is None:
            try:
                from pyllama.compat.llama_tokenizer import LlamaTokenizer
            except ImportError:   # pragma: no cover
                pass
            else:
                self.tokenizer_ = LlamaTokenizer(self)

    # ---- information -------------------------------------------------------------------

    @property
    def model(self) -> Any:
        """An opaque model handle for llama_cpp.llama_cpp's functions (``llama_model_get_vocab``,
        ``llama_token_to_piece``, ... as outlines calls them); not a ctypes pointer."""
        try:
            from pyllama.compat._lowlevel import model_handle
        except ImportError:   # pragma: no cover - the module ships with pyllama
            raise CHandleError(f"Llama.model: pyllama has no ctypes handles; see {DOCS}") from None
        return model_handle(self)

    @property
    def _ctx(self) -> _ContextWrapper:
        return _ContextWrapper(self)

    @property
    def scores(self) -> npt.NDArray[np.single]:
        """Empty (pyllama keeps no per-position logits; see DIFFERENCES)."""
        return np.zeros((0, self._n_vocab), dtype=np.single)

    @property
    def _scores(self) -> npt.NDArray[np.single]:
        return self.scores

    @property
    def _input_ids(self) -> npt.NDArray[np.intc]:
        return self.input_ids[: self.n_tokens]

    @property
    def eval_tokens(self) -> Any:
        from collections import deque

        return deque(self.input_ids[: self.n_tokens].tolist(), maxlen=self._n_ctx)

    @property
    def eval_logits(self) -> Any:
        from collections import deque

        return deque([], maxlen=1)

    def n_ctx(self) -> int:
        """The context window of one call."""
        return self._n_ctx

    def n_embd(self) -> int:
        return self.llm.model.n_embd

    def n_vocab(self) -> int:
        return self._n_vocab

    def token_eos(self) -> int:
        return self._vocab.eos

    def token_bos(self) -> int:
        return self._vocab.bos

    def token_nl(self) -> int:
        return self._vocab.nl

    def pooling_type(self) -> int:
        pooling = self.llm.model.meta(f"{self.llm.model.architecture}.pooling_type")
        return int(pooling) if pooling is not None else LLAMA_POOLING_TYPE_UNSPECIFIED

    def tokenizer(self) -> Any:
        """llama-cpp-python's LlamaTokenizer of this model."""
        from pyllama.compat.llama_tokenizer import LlamaTokenizer

        return LlamaTokenizer(self)

    def set_seed(self, seed: int) -> None:
        self._seed = seed

    def set_cache(self, cache: Optional[BaseLlamaCache]) -> None:
        """Keep states in `cache` (LlamaRAMCache / LlamaDiskCache), as llama-cpp-python does."""
        self.cache = cache

    def reset(self) -> None:
        """Forget this Llama's tokens (input_ids/n_tokens); other calls are not disturbed."""
        self.n_tokens = 0

    def close(self) -> None:
        """Free the model now."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:   # noqa: BLE001 - interpreter teardown
            pass

    def __getstate__(self) -> dict:
        return dict(self._init_args)

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    # ---- tokens --------------------------------------------------------------------------

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> List[int]:
        """Token ids of utf-8 `text` (``add_bos``: the model's BOS/EOS as it wants them;
        ``special``: text spelling a control token becomes that token)."""
        if self._custom_tokenizer:
            return self.tokenizer_.tokenize(text, add_bos, special)
        if isinstance(text, str):
            text = text.encode("utf-8")
        return self._vocab.tokenize(text, add_special=add_bos, parse_special=special)

    def detokenize(self, tokens: List[int], prev_tokens: Optional[List[int]] = None, special: bool = False) -> bytes:
        """The bytes of `tokens` (each token's piece; the space a leading BOS gives is removed,
        as llama-cpp-python does).  `prev_tokens` is accepted and unused, as there."""
        if self._custom_tokenizer:
            return self.tokenizer_.detokenize(tokens, prev_tokens=prev_tokens, special=special)
        vocab = self._vocab
        out = b"".join(vocab.token_to_piece(int(t), special) for t in tokens)
        if len(tokens) > 0 and int(tokens[0]) == vocab.bos and out[:1] == b" ":
            return out[1:]
        return out

    def _piece(self, tok: int) -> str:
        """One token's text, as llama-cpp-python's logprobs show it (memoised)."""
        s = self._pieces.get(tok)
        if s is None:
            s = self._vocab.token_to_piece(tok, False).decode("utf-8", errors="ignore")
            if len(self._pieces) < 65536:
                self._pieces[tok] = s
        return s

    @staticmethod
    def logits_to_logprobs(logits: Union[npt.NDArray[np.single], List], axis: int = -1) -> npt.NDArray[np.single]:
        logits_maxs = np.amax(logits, axis=axis, keepdims=True)
        if logits_maxs.ndim > 0:
            logits_maxs[~np.isfinite(logits_maxs)] = 0
        elif not np.isfinite(logits_maxs):
            logits_maxs = 0
        subtract_maxs = np.subtract(logits, logits_maxs, dtype=np.single)
        exp = np.exp(subtract_maxs)
        with np.errstate(divide="ignore"):
            summed = np.sum(exp, axis=axis, keepdims=True)
            out = np.log(summed)
        return subtract_maxs - out

    @staticmethod
    def longest_token_prefix(a: Sequence[int], b: Sequence[int]) -> int:
        return _longest_prefix(a, b)

    # ---- state -----------------------------------------------------------------------------

    def _remember(self, tokens: Sequence[int]) -> None:
        n = min(len(tokens), self._n_ctx)
        ids = np.zeros((self._n_ctx,), dtype=np.intc)
        ids[:n] = np.asarray(tokens[:n], dtype=np.intc)
        self.input_ids = ids      # one assignment: readers in other threads see old or new
        self.n_tokens = n

    def save_state(self) -> LlamaState:
        """This Llama's state: its tokens and seed (see LlamaState)."""
        ids = np.asarray(self.input_ids[: self.n_tokens], dtype="<i4")
        data = _STATE_MAGIC + ids.tobytes()
        return LlamaState(input_ids=self.input_ids.copy(), scores=self.scores, n_tokens=self.n_tokens,
                          llama_state=data, llama_state_size=len(data), seed=self._seed)

    def load_state(self, state: LlamaState) -> None:
        """Restore a state from save_state() (input_ids, n_tokens, seed)."""
        data = bytes(state.llama_state)
        if not data.startswith(_STATE_MAGIC):
            raise ValueError("this LlamaState was not made by pyllama's Llama.save_state() (llama-cpp-python's "
                             f"KV bytes cannot be loaded into pyllama's engine; see {DOCS})")
        tokens = np.frombuffer(data[len(_STATE_MAGIC):], dtype="<i4")
        if len(tokens) > self._n_ctx:
            raise ValueError(f"the state holds {len(tokens)} tokens, more than n_ctx={self._n_ctx}")
        self._vocab.check_tokens(tokens.tolist())
        self._remember(tokens.tolist())
        self._seed = state.seed

    # ---- building calls -----------------------------------------------------------------

    def _next_seed(self, seed: Optional[int]) -> int:
        """llama-cpp-python's seed rule: the given one, else one drawn from the last."""
        with self._seed_lock:
            if seed is not None:
                self._seed = seed
            else:
                self._seed = random.Random(self._seed).randint(0, 2**32)
            s = self._seed
        if s == -1 or s == LLAMA_DEFAULT_SEED:
            return -1
        return int(s) & 0xFFFFFFFF

    def _sampling(self, *, temperature: float, top_p: float, top_k: int, min_p: float, typical_p: float,
                  repeat_penalty: float, frequency_penalty: float, presence_penalty: float, mirostat_mode: int,
                  mirostat_tau: float, mirostat_eta: float, seed: Optional[int],
                  logit_bias: Optional[Dict[Any, float]]) -> dict:
        """pyllama sampling overrides equivalent to llama-cpp-python's sampler chain."""
        p: Dict[str, Any] = dict(
            temperature=float(temperature), top_p=float(top_p), top_k=int(top_k), min_p=float(min_p),
            typical_p=float(typical_p), repeat_penalty=float(repeat_penalty),
            frequency_penalty=float(frequency_penalty), presence_penalty=float(presence_penalty),
            mirostat_mode=int(mirostat_mode), mirostat_tau=float(mirostat_tau), mirostat_eta=float(mirostat_eta),
            last_n_tokens_size=self.last_n_tokens_size, seed=self._next_seed(seed),
            # llama-cpp-python's sampler chain only ever accepts the tokens it sampled: its
            # penalties count generated tokens, not the prompt (pyllama's native default does).
            penalize_prompt=False)
        if temperature < 0:
            # llama-cpp-python: a plain draw from the softmax of the logits.
            p.update(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, mirostat_mode=0)
        elif temperature > 0 and mirostat_mode:
            p["temperature"] = 1.0        # llama-cpp-python's mirostat has no temperature stage
        if p["top_p"] <= 0.0:           # llama.cpp keeps one token (min_keep) at p = 0
            p.update(top_p=1.0, top_k=1)
        if p["typical_p"] <= 0.0:
            p.update(typical_p=1.0, top_k=1)
        if p["top_k"] < 0:
            p["top_k"] = 0
        if logit_bias:
            p["logit_bias"] = {int(k): float(v) for k, v in logit_bias.items()}
        return p

    def _completion_tokens_of(self, prompt: Union[str, List[int]], suffix: Optional[str]) -> tuple:
        """(prompt tokens, suffix text to append) as llama-cpp-python builds them."""
        vocab = self._vocab
        if not isinstance(prompt, str):
            if suffix is None:
                return [int(t) for t in prompt], None
            body = [int(t) for t in prompt]
        else:
            body = self.tokenize(prompt.encode("utf-8"), add_bos=False, special=suffix is None) if prompt else []
        bos = [vocab.bos] if vocab.add_bos and vocab.bos != -1 else []
        eos: List[int] = []
        if vocab.add_eos or vocab.sep != -1:
            eos = [vocab.sep if vocab.sep != -1 else vocab.eos]
        if suffix is None:
            return bos + body + eos, None
        if vocab.fim_pre >= 0 and vocab.fim_suf >= 0 and vocab.fim_mid >= 0:
            suf = self.tokenize(suffix.encode("utf-8"), add_bos=False, special=False) if suffix else []
            pre = [vocab.fim_pre] + body
            mid = [vocab.fim_suf] + suf
            parts = (mid + pre) if self.spm_infill else (pre + mid)
            return bos + parts + [vocab.fim_mid], None
        return bos + body + eos, suffix

    def _hooks(self, logits_processor: Any, stopping_criteria: Any) -> tuple:
        procs = list(logits_processor) if logits_processor is not None else None
        crit = _Criteria(stopping_criteria) if stopping_criteria is not None else None
        return procs or None, crit

    # ---- completions --------------------------------------------------------------------

    def _create_completion(
        self,
        prompt: Union[str, List[int]],
        suffix: Optional[str] = None,
        max_tokens: Optional[int] = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        logprobs: Optional[int] = None,
        echo: bool = False,
        stop: Optional[Union[str, List[str]]] = [],
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        top_k: int = 40,
        stream: bool = False,
        seed: Optional[int] = None,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: Optional[str] = None,
        stopping_criteria: Optional[Any] = None,
        logits_processor: Optional[Any] = None,
        grammar: Optional[Any] = None,
        logit_bias: Optional[Dict[int, float]] = None,
        *,
        _json_schema: Any = None,
        _media: Any = None,
    ) -> Iterator[Any]:
        """A generator: the completion dict (stream=False) or its chunks (stream=True)."""
        del tfs_z   # llama.cpp has no tail-free sampling any more
        completion_id = f"cmpl-{uuid.uuid4()}"
        created = int(time.time())
        model_name = model if model is not None else self.model_path
        if _media is not None:
            prompt_tokens: Any = _media
            n_prompt = len(_media)
            extra_suffix = None
        else:
            prompt_tokens, extra_suffix = self._completion_tokens_of(prompt, suffix)
            if not prompt_tokens:
                prompt_tokens = [self._vocab.bos] if self._vocab.bos != -1 else []
            n_prompt = len(prompt_tokens)
            if prompt_tokens[:2] == [self._vocab.bos] * 2 and self._vocab.bos != -1:
                warnings.warn(f'Detected duplicate leading "{self._vocab.token_text(self._vocab.bos)}" in prompt, '
                              "this will likely reduce response quality, consider removing it...",
                              RuntimeWarning, stacklevel=3)
        if n_prompt >= self._n_ctx:
            raise ValueError(f"Requested tokens ({n_prompt}) exceed context window of {self._n_ctx}")
        if max_tokens is None or max_tokens <= 0:
            max_tokens = self._n_ctx - n_prompt
        max_tokens = min(max_tokens, self._n_ctx - n_prompt)
        stop = stop if isinstance(stop, list) else [stop] if isinstance(stop, str) else []
        stop = [s for s in stop if s]

        if self.cache is not None and _media is None:
            try:
                item = self.cache[prompt_tokens]
                if (Llama.longest_token_prefix(item.input_ids[: item.n_tokens].tolist(), prompt_tokens)
                        > Llama.longest_token_prefix(self._input_ids.tolist(), prompt_tokens)):
                    self.load_state(item)
            except KeyError:
                pass

        overrides = self._sampling(
            temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, typical_p=typical_p,
            repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
            mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, seed=seed,
            logit_bias=logit_bias)
        overrides["max_tokens"] = max_tokens
        overrides["stop"] = stop or None
        if grammar is not None:
            overrides["grammar"] = _unsupported(grammar)
        elif _json_schema is not None:
            overrides["json_schema"] = _json_schema
        procs, crit = self._hooks(logits_processor, stopping_criteria)
        lp = None if logprobs is None else int(logprobs)
        want_lp = lp is not None
        prompt_text = prompt if isinstance(prompt, str) else None

        if stream:
            return self._stream_completion(prompt_tokens, n_prompt, prompt_text, completion_id, created, model_name,
                                           overrides, procs, crit, lp)
        return self._whole_completion(prompt_tokens, n_prompt, prompt_text, echo, extra_suffix, completion_id,
                                      created, model_name, overrides, procs, crit, lp, want_lp)

    def _whole_completion(self, prompt_tokens, n_prompt, prompt_text, echo, extra_suffix, completion_id, created,
                          model_name, overrides, procs, crit, lp, want_lp) -> Iterator[Any]:
        media = not isinstance(prompt_tokens, list)
        echo_lp = bool(echo and want_lp and not media)
        comp = self.llm.complete(prompt_tokens, add_special=False, logprobs=True if want_lp else None,
                                 top_logprobs=min(lp, 20) if want_lp else None, echo=echo_lp,
                                 logits_processors=procs, stopping_criteria=[crit] if crit else None, **overrides)
        tokens = list(comp.tokens)
        fired = crit is not None and crit.fired
        if fired and tokens:
            tokens = tokens[:-1]
        text = comp.text
        if echo_lp:
            text = text[len(self.llm.detokenize(prompt_tokens, remove_special=True)):]
        if not media:
            self._remember(list(prompt_tokens) + tokens)
            if self.cache is not None:
                self.cache[list(prompt_tokens) + tokens] = self.save_state()

        text_out = text
        if echo:
            text_out = self._echo_prefix(prompt_tokens, prompt_text) + text
        if extra_suffix is not None:
            text_out = text_out + extra_suffix

        logprobs_dict = None
        if want_lp:
            logprobs_dict = self._logprobs_dict(comp, prompt_tokens, prompt_text, echo and not media, lp,
                                                fired)
        yield {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model_name,
            "choices": [{"text": text_out, "index": 0, "logprobs": logprobs_dict,
                         "finish_reason": "stop" if fired else _finish(comp.finish_reason)}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(tokens),
                      "total_tokens": n_prompt + len(tokens)},
        }

    def _echo_prefix(self, prompt_tokens: Any, prompt_text: Optional[str]) -> str:
        if prompt_text is not None:
            return prompt_text
        if not isinstance(prompt_tokens, list):
            return ""
        return self.detokenize(prompt_tokens).decode("utf-8", errors="ignore")

    def _top_dict(self, entry: Any, lp: int) -> Dict[str, float]:
        top = {self._piece(t.id): t.logprob for t in entry.top_logprobs[:lp]}
        top.update({self._piece(entry.id): entry.logprob})
        return top

    def _logprobs_dict(self, comp: Any, prompt_tokens: list, prompt_text: Optional[str], echo: bool, lp: int,
                       fired: bool) -> CompletionLogprobs:
        gen = list(comp.logprobs or [])
        if fired and gen and len(gen) >= len(comp.tokens):
            gen = gen[: max(len(comp.tokens) - 1, 0)]
        bos = self._vocab.bos
        tokens: List[str] = []
        offsets: List[int] = []
        token_lps: List[Optional[float]] = []
        tops: List[Optional[Dict[str, float]]] = []
        if echo:
            skip = 1 if prompt_tokens and prompt_tokens[0] == bos else 0
            shown = prompt_tokens[skip:]
            plp = list(comp.prompt_logprobs or [])[skip:]
            offset = 0
            for i, tok in enumerate(shown):
                s = self._piece(tok)
                tokens.append(s)
                offsets.append(offset)
                offset += len(s)
                if i == 0 or i - 1 >= len(plp):
                    token_lps.append(None)
                    tops.append(None)
                else:
                    e = plp[i - 1]
                    token_lps.append(e.logprob)
                    tops.append(self._top_dict(e, lp))
        else:
            offset = len(prompt_text) if prompt_text is not None else len(prompt_tokens)
        for e in gen:
            if e.id == bos:
                continue
            s = self._piece(e.id)
            tokens.append(s)
            offsets.append(offset)
            offset += len(s)
            token_lps.append(e.logprob)
            tops.append(self._top_dict(e, lp))
        return {"tokens": tokens, "text_offset": offsets, "token_logprobs": token_lps, "top_logprobs": tops}

    def _stream_completion(self, prompt_tokens, n_prompt, prompt_text, completion_id, created, model_name,
                           overrides, procs, crit, lp) -> Iterator[Any]:
        want_lp = lp is not None
        st = self.llm.stream(prompt_tokens, add_special=False, chunks=True, logprobs=True if want_lp else None,
                             top_logprobs=min(lp, 20) if want_lp else None, logits_processors=procs,
                             stopping_criteria=[crit] if crit else None, **overrides)
        offset = len(prompt_text) if prompt_text is not None else n_prompt
        generated: List[int] = []
        try:
            for ch in st:
                generated.extend(ch.token_ids)
                if not ch.text:
                    continue
                lp_dict = None
                if want_lp and ch.logprobs:
                    toks = [self._piece(e.id) for e in ch.logprobs]
                    offs = []
                    for s in toks:
                        offs.append(offset)
                        offset += len(s)
                    lp_dict = {"tokens": toks, "text_offset": offs,
                               "token_logprobs": [e.logprob for e in ch.logprobs],
                               "top_logprobs": [self._top_dict(e, lp) for e in ch.logprobs]}
                yield {
                    "id": completion_id,
                    "object": "text_completion",
                    "created": created,
                    "model": model_name,
                    "choices": [{"text": ch.text, "index": 0, "logprobs": lp_dict, "finish_reason": None}],
                }
            comp = st.completion
        finally:
            st.close()
        fired = crit is not None and crit.fired
        tokens = list(comp.tokens) if comp is not None else generated
        if fired and tokens:
            tokens = tokens[:-1]
        yield {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model_name,
            "choices": [{"text": "", "index": 0, "logprobs": None,
                         "finish_reason": "stop" if fired else _finish(comp.finish_reason if comp else "stop")}],
        }
        if isinstance(prompt_tokens, list):
            self._remember(list(prompt_tokens) + tokens)
            if self.cache is not None:
                self.cache[list(prompt_tokens) + tokens] = self.save_state()

    def create_completion(
        self,
        prompt: Union[str, List[int]],
        suffix: Optional[str] = None,
        max_tokens: Optional[int] = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        logprobs: Optional[int] = None,
        echo: bool = False,
        stop: Optional[Union[str, List[str]]] = [],
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        top_k: int = 40,
        stream: bool = False,
        seed: Optional[int] = None,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: Optional[str] = None,
        stopping_criteria: Optional[StoppingCriteriaList] = None,
        logits_processor: Optional[LogitsProcessorList] = None,
        grammar: Optional[Any] = None,
        logit_bias: Optional[Dict[int, float]] = None,
    ) -> Union[CreateCompletionResponse, Iterator[CreateCompletionStreamResponse]]:
        """Generate text from a prompt (text or token ids): llama-cpp-python's completion dict,
        or with ``stream=True`` an iterator of its chunk dicts.  ``max_tokens`` None or <= 0:
        until the context window is full.  ``logprobs=K``: the K most likely tokens at each
        position.  ``grammar``: a LlamaGrammar.  ``logits_processor``/``stopping_criteria``:
        llama-cpp-python's lists of ``f(input_ids, scores)`` callables (run inside pyllama's
        batch, for this call only)."""
        result = self._create_completion(
            prompt=prompt, suffix=suffix, max_tokens=-1 if max_tokens is None else max_tokens,
            temperature=temperature, top_p=top_p, min_p=min_p, typical_p=typical_p, logprobs=logprobs, echo=echo,
            stop=stop, frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
            repeat_penalty=repeat_penalty, top_k=top_k, stream=stream, seed=seed, tfs_z=tfs_z,
            mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, model=model,
            stopping_criteria=stopping_criteria, logits_processor=logits_processor, grammar=grammar,
            logit_bias=logit_bias)
        if stream:
            return result
        return next(result)

    def __call__(
        self,
        prompt: str,
        suffix: Optional[str] = None,
        max_tokens: Optional[int] = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        logprobs: Optional[int] = None,
        echo: bool = False,
        stop: Optional[Union[str, List[str]]] = [],
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        top_k: int = 40,
        stream: bool = False,
        seed: Optional[int] = None,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: Optional[str] = None,
        stopping_criteria: Optional[StoppingCriteriaList] = None,
        logits_processor: Optional[LogitsProcessorList] = None,
        grammar: Optional[Any] = None,
        logit_bias: Optional[Dict[int, float]] = None,
    ) -> Union[CreateCompletionResponse, Iterator[CreateCompletionStreamResponse]]:
        """create_completion()."""
        return self.create_completion(
            prompt=prompt, suffix=suffix, max_tokens=max_tokens, temperature=temperature, top_p=top_p, min_p=min_p,
            typical_p=typical_p, logprobs=logprobs, echo=echo, stop=stop, frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty, repeat_penalty=repeat_penalty, top_k=top_k, stream=stream, seed=seed,
            tfs_z=tfs_z, mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta,
            model=model, stopping_criteria=stopping_criteria, logits_processor=logits_processor, grammar=grammar,
            logit_bias=logit_bias)

    # ---- chat ----------------------------------------------------------------------------

    def create_chat_completion(
        self,
        messages: List[ChatCompletionRequestMessage],
        functions: Optional[List[ChatCompletionFunction]] = None,
        function_call: Optional[ChatCompletionRequestFunctionCall] = None,
        tools: Optional[List[ChatCompletionTool]] = None,
        tool_choice: Optional[ChatCompletionToolChoiceOption] = None,
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        stream: bool = False,
        stop: Optional[Union[str, List[str]]] = [],
        seed: Optional[int] = None,
        response_format: Optional[ChatCompletionRequestResponseFormat] = None,
        max_tokens: Optional[int] = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: Optional[str] = None,
        logits_processor: Optional[LogitsProcessorList] = None,
        grammar: Optional[Any] = None,
        logit_bias: Optional[Dict[int, float]] = None,
        logprobs: Optional[bool] = None,
        top_logprobs: Optional[int] = None,
    ) -> Union[CreateChatCompletionResponse, Iterator[CreateChatCompletionStreamResponse]]:
        """Answer a conversation: llama-cpp-python's chat completion dict (or chunks with
        ``stream=True``).  The prompt comes from ``chat_handler`` when given, else from the
        ``chat_format`` (``"chat_template.default"``, the default when the GGUF has a template,
        is the model's own template, run by pyllama).  ``response_format`` takes
        ``{"type": "json_object"[, "schema": {...}]}`` and OpenAI's ``{"type": "json_schema",
        "json_schema": {"schema": {...}}}``; ``tools``/``functions`` give OpenAI tool calls."""
        kwargs = dict(
            messages=messages, functions=functions, function_call=function_call, tools=tools,
            tool_choice=tool_choice, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
            typical_p=typical_p, logprobs=logprobs, top_logprobs=top_logprobs, stream=stream, stop=stop, seed=seed,
            response_format=response_format, max_tokens=max_tokens, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, repeat_penalty=repeat_penalty, tfs_z=tfs_z,
            mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, model=model,
            logits_processor=logits_processor, grammar=grammar, logit_bias=logit_bias)
        handler = self.chat_handler
        if handler is not None and getattr(handler, "clip_model_path", None) is None:
            return handler(llama=self, **kwargs)          # llama-cpp-python's handler protocol
        if handler is None and self.chat_format in self._chat_handlers:
            return self._chat_handlers[self.chat_format](llama=self, **kwargs)
        return self._chat(**kwargs)

    def _chat(self, *, messages, functions, function_call, tools, tool_choice, temperature, top_p, top_k, min_p,
              typical_p, logprobs, top_logprobs, stream, stop, seed, response_format, max_tokens, presence_penalty,
              frequency_penalty, repeat_penalty, tfs_z, mirostat_mode, mirostat_tau, mirostat_eta, model,
              logits_processor, grammar, logit_bias) -> Any:
        # Legacy functions / function_call become tools / tool_choice, as llama-cpp-python does.
        legacy = functions is not None and tools is None
        if functions is not None and tools is None:
            tools = [{"type": "function", "function": f} for f in functions]
        if function_call is not None and tool_choice is None:
            if function_call in ("none", "auto"):
                tool_choice = function_call
            elif isinstance(function_call, dict) and "name" in function_call:
                tool_choice = {"type": "function", "function": {"name": function_call["name"]}}
        sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, typical_p=typical_p,
                        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                        repeat_penalty=repeat_penalty, tfs_z=tfs_z, mirostat_mode=mirostat_mode,
                        mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, seed=seed, logit_bias=logit_bias)
        json_schema = _schema_of_response_format(response_format) if response_format is not None else None
        if json_schema is not None:
            grammar = None      # as llama-cpp-python: the response format wins over a grammar
            if response_format.get("type") == "json_object" and "schema" in response_format:
                # llama-cpp-python falls back to any JSON object when a schema cannot be converted.
                from pyllama.grammar import json_schema_to_gbnf

                try:
                    json_schema_to_gbnf(json_schema)
                except (ValueError, TypeError):
                    json_schema = {"type": "object"}
        lp = (top_logprobs or 0) if logprobs else None
        stop = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)

        from pyllama.compat.llama_chat_format import TOOL_CALLING_CHAT_FORMATS

        # The tool-calling formats (chatml-function-calling, functionary...) are served by the
        # model's own template and pyllama's tool calling (instructor's examples name them).
        if self.chat_format == "chat_template.default" or self.chat_format in TOOL_CALLING_CHAT_FORMATS \
                or self.chat_handler is not None:
            if tools and tool_choice != "none":
                return self._tool_chat(messages, tools, tool_choice, legacy, stream, stop, max_tokens, model,
                                       logits_processor, grammar, sampling, lp)
            prepare = getattr(self.chat_handler, "prepare_messages", None)
            if prepare is not None:
                messages = prepare(messages)
            prompt = self.llm.chat_prompt(messages)
            media = None if isinstance(prompt, list) else prompt
            completion = self._create_completion(
                prompt=prompt if media is None else "", max_tokens=-1 if max_tokens is None else max_tokens,
                stop=stop, stream=stream, model=model, logits_processor=logits_processor, grammar=grammar,
                logprobs=lp, _json_schema=json_schema, _media=media, **sampling)
            return _completion_to_chat(completion if stream else next(completion), stream)

        from pyllama.compat import llama_chat_format

        formatter = llama_chat_format.get_chat_format(self.chat_format)
        result = formatter(messages=messages, functions=functions, function_call=function_call, tools=tools,
                           tool_choice=tool_choice)
        tokens = self.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)
        if result.stop is not None:
            stop = stop + (result.stop if isinstance(result.stop, list) else [result.stop])
        tool = None
        if isinstance(tool_choice, dict) and tools:
            name = tool_choice["function"]["name"]
            tool = next((t for t in tools if t["function"]["name"] == name), None)
            if tool is None:
                raise ValueError(f"Tool choice '{name}' not found in tools.")
            json_schema = tool["function"].get("parameters") or {"type": "object"}
            grammar = None
        completion = self._create_completion(
            prompt=tokens, max_tokens=-1 if max_tokens is None else max_tokens, stop=stop, stream=stream,
            model=model, logits_processor=logits_processor, grammar=grammar, logprobs=lp,
            _json_schema=json_schema, **sampling)
        if tool is not None:
            return _completion_to_chat_function(tool["function"]["name"], completion if stream else next(completion),
                                                stream)
        return _completion_to_chat(completion if stream else next(completion), stream)

    def _tool_chat(self, messages, tools, tool_choice, legacy, stream, stop, max_tokens, model, logits_processor,
                   grammar, sampling, lp) -> Any:
        """Tools with the GGUF's template: pyllama's tool calling (calls parsed, or forced by a grammar)."""
        from pyllama import tools as tools_mod

        overrides = self._sampling(**{k: v for k, v in sampling.items() if k != "tfs_z"})
        overrides["stop"] = [s for s in stop if s] or None
        if grammar is not None:
            overrides["grammar"] = _unsupported(grammar)
        # pyllama's tool calling as a plan (prompt with the tools shown, grammar of a forced call,
        # parser), run as any other request of the engine.
        plan = tools_mod.plan_tool_chat(
            self.llm, messages, tools=tools, tool_choice=tool_choice or "auto",
            logprobs=True if lp is not None else None, top_logprobs=lp or None,
            logits_processors=list(logits_processor) if logits_processor else None, **overrides)
        if plan.tools is None:
            comp = self.llm.chat(plan.messages, **{**plan.options, "max_tokens": max_tokens or -1})
        else:
            n_prompt = len(plan.prompt)
            if n_prompt >= self._n_ctx:
                raise ValueError(f"Requested tokens ({n_prompt}) exceed context window of {self._n_ctx}")
            if max_tokens is None or max_tokens <= 0:
                max_tokens = self._n_ctx - n_prompt
            options = dict(plan.options, max_tokens=min(max_tokens, self._n_ctx - n_prompt))
            comp = plan.finish(self.llm.complete(plan.prompt, **options))
        cid = f"chatcmpl-{uuid.uuid4()}"
        created = int(time.time())
        model_name = model if model is not None else self.model_path
        calls = comp.tool_calls or None
        message: Dict[str, Any] = {"role": "assistant", "content": comp.content if calls else comp.text}
        if calls:
            message["tool_calls"] = calls
            if legacy:
                message["function_call"] = dict(calls[0]["function"])
        finish = "tool_calls" if calls else _finish(comp.finish_reason)
        logprobs = _chat_logprobs(comp) if lp is not None else None
        n_gen = len(comp.tokens)
        if not stream:
            return {"id": cid, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}],
                    "usage": {"prompt_tokens": comp.prompt_tokens, "completion_tokens": n_gen,
                              "total_tokens": comp.prompt_tokens + n_gen}}

        def chunks() -> Iterator[Any]:
            base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name}
            yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None,
                                        "finish_reason": None}]}
            if message.get("content"):
                yield {**base, "choices": [{"index": 0, "delta": {"content": message["content"]},
                                            "logprobs": logprobs, "finish_reason": None}]}
            if calls:
                delta = {"role": None, "content": None,
                         "tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}
                if legacy:
                    delta["function_call"] = dict(calls[0]["function"])
                yield {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}
            yield {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}]}

        return chunks()

    def create_chat_completion_openai_v1(self, *args: Any, **kwargs: Any) -> Any:
        """create_chat_completion() returning the ``openai`` package's ChatCompletion (or an
        iterator of ChatCompletionChunk with stream=True)."""
        try:
            from openai.types.chat import ChatCompletion, ChatCompletionChunk
        except ImportError:
            raise ImportError("To use create_chat_completion_openai_v1, you must install the openai package. "
                              "You can install it with `pip install openai`.") from None
        stream = kwargs.get("stream", False)
        assert isinstance(stream, bool)
        if stream:
            return (ChatCompletionChunk.model_validate(chunk) for chunk in self.create_chat_completion(*args, **kwargs))
        return ChatCompletion.model_validate(self.create_chat_completion(*args, **kwargs))

    # ---- embeddings -------------------------------------------------------------------------

    def embed(self, input: Union[str, List[str]], normalize: bool = False, truncate: bool = True,
              return_count: bool = False) -> Any:
        """Embeddings (lists of floats; not normalised unless asked, as llama-cpp-python).
        Needs Llama(..., embedding=True)."""
        if not self._embedding:
            raise RuntimeError("Llama model must be created with embedding=True to call this method")
        inputs = [input] if isinstance(input, str) else list(input)
        token_lists = []
        total = 0
        for text in inputs:
            tokens = self.tokenize(text.encode("utf-8"))
            if truncate:
                tokens = tokens[: self.n_batch]
            if len(tokens) > self.n_batch:
                raise ValueError(f"Requested tokens ({len(tokens)}) exceed batch size of {self.n_batch}")
            total += len(tokens)
            token_lists.append(tokens)
        data = [row.tolist() for row in self.llm.embed(token_lists, normalize=normalize)] if token_lists else []
        output = data[0] if isinstance(input, str) else data
        if return_count:
            return output, total
        return output

    def create_embedding(self, input: Union[str, List[str]], model: Optional[str] = None) -> CreateEmbeddingResponse:
        """llama-cpp-python's embedding response dict."""
        model_name = model if model is not None else self.model_path
        inputs = input if isinstance(input, list) else [input]
        embeds, total = self.embed(inputs, return_count=True)
        return {
            "object": "list",
            "data": [{"object": "embedding", "embedding": e, "index": i} for i, e in enumerate(embeds)],
            "model": model_name,
            "usage": {"prompt_tokens": total, "total_tokens": total},
        }

    # ---- low-level stepping, on the engine -------------------------------------------------

    def eval(self, tokens: Sequence[int]) -> None:
        """Append `tokens` to input_ids.  The engine evaluates them at the next sample() (only
        what its prompt cache does not hold already)."""
        tokens = [int(t) for t in tokens]
        self._vocab.check_tokens(tokens)
        if self.n_tokens + len(tokens) > self._n_ctx:
            raise ValueError(f"Requested tokens ({self.n_tokens + len(tokens)}) exceed context window of "
                             f"{self._n_ctx}")
        ids = self.input_ids.copy()
        ids[self.n_tokens: self.n_tokens + len(tokens)] = tokens
        self.input_ids = ids
        self.n_tokens += len(tokens)

    def _step_params(self, top_k, top_p, min_p, typical_p, temp, repeat_penalty, frequency_penalty, presence_penalty,
                     mirostat_mode, mirostat_tau, mirostat_eta) -> dict:
        return self._sampling(temperature=temp, top_p=top_p, top_k=top_k, min_p=min_p, typical_p=typical_p,
                              repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
                              presence_penalty=presence_penalty, mirostat_mode=mirostat_mode,
                              mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, seed=None, logit_bias=None)

    def sample(self, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, typical_p: float = 1.0,
               temp: float = 0.80, repeat_penalty: float = 1.0, frequency_penalty: float = 0.0,
               presence_penalty: float = 0.0, tfs_z: float = 1.0, mirostat_mode: int = 0, mirostat_eta: float = 0.1,
               mirostat_tau: float = 5.0, penalize_nl: bool = True, logits_processor: Optional[Any] = None,
               grammar: Optional[Any] = None, idx: Optional[int] = None) -> int:
        """The next token after input_ids (a one-token request on the engine; it is not
        appended: eval() it to continue).  An end-of-generation token comes back as token_eos()."""
        assert self.n_tokens > 0
        params = self._step_params(top_k, top_p, min_p, typical_p, temp, repeat_penalty, frequency_penalty,
                                   presence_penalty, mirostat_mode, mirostat_tau, mirostat_eta)
        if grammar is not None:
            params["grammar"] = _unsupported(grammar)
        n = self.n_tokens if idx is None else idx + 1
        comp = self.llm.complete(self.input_ids[:n].tolist(), add_special=False, max_tokens=1,
                                 logits_processors=list(logits_processor) if logits_processor else None, **params)
        return int(comp.tokens[0]) if comp.tokens else self.token_eos()

    def generate(self, tokens: Sequence[int], top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                 typical_p: float = 1.0, temp: float = 0.80, repeat_penalty: float = 1.0, reset: bool = True,
                 frequency_penalty: float = 0.0, presence_penalty: float = 0.0, tfs_z: float = 1.0,
                 mirostat_mode: int = 0, mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                 penalize_nl: bool = True, logits_processor: Optional[Any] = None,
                 stopping_criteria: Optional[Any] = None, grammar: Optional[Any] = None) -> Iterator[int]:
        """Yield tokens after `tokens` (after input_ids + `tokens` with reset=False), as
        llama-cpp-python's generator does: endless until the caller stops, the context is
        full or a stopping criterion fires; tokens sent into it are appended."""
        params = self._step_params(top_k, top_p, min_p, typical_p, temp, repeat_penalty, frequency_penalty,
                                   presence_penalty, mirostat_mode, mirostat_tau, mirostat_eta)
        if grammar is not None:
            params["grammar"] = _unsupported(grammar)
        seq = ([] if reset else self._input_ids.tolist()) + [int(t) for t in tokens]
        procs = list(logits_processor) if logits_processor else None
        while len(seq) < self._n_ctx:
            crit = _Criteria(stopping_criteria) if stopping_criteria is not None else None
            self._remember(seq)
            st = self.llm.stream(seq, add_special=False, chunks=True, max_tokens=self._n_ctx - len(seq),
                                 logits_processors=procs, stopping_criteria=[crit] if crit else None, **params)
            sent: Optional[List[int]] = None
            try:
                for ch in st:
                    ids = list(ch.token_ids)
                    if crit is not None and crit.fired and ids:
                        ids = ids[:-1]
                    for tok in ids:
                        sent = yield tok
                        seq.append(tok)
                        self._remember(seq)
                        if sent:
                            break
                    if sent:
                        break
                comp = None if sent else st.completion
            finally:
                st.close()
            if sent:
                seq.extend(int(t) for t in sent)
                continue
            if crit is not None and crit.fired:
                return
            if comp is None or comp.finish_reason != "eog":
                return
            eos = self.token_eos()
            sent = yield eos
            seq.append(eos)
            if sent:
                seq.extend(int(t) for t in sent)

    # ---- the Hub ------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, repo_id: str, filename: Optional[str], additional_files: Optional[List] = None,
                        local_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
                        local_dir_use_symlinks: Union[bool, str] = "auto",
                        cache_dir: Optional[Union[str, "os.PathLike[str]"]] = None, **kwargs: Any) -> "Llama":
        """Download `filename` (a name or glob) of a Hugging Face repository (and
        `additional_files`) and load it; needs huggingface_hub (``pip install 'pyllama[hf]'``)."""
        from pyllama import models

        del local_dir_use_symlinks   # huggingface_hub ignores it too
        if filename is None:
            pulled = models.pull_from_hub(repo_id, cache_dir=cache_dir, local_dir=local_dir)
            path = pulled.path
            if additional_files:
                models.fetch_from_hub(pulled.repo_id, pulled.filename, additional_files=list(additional_files),
                                      cache_dir=cache_dir, local_dir=local_dir)
        else:
            path = models.fetch_from_hub(repo_id, filename, additional_files=list(additional_files or ()),
                                         cache_dir=cache_dir, local_dir=local_dir)
        return cls(model_path=os.fspath(path), **kwargs)


# ---- result shapes ---------------------------------------------------------------------------

def _schema_of_response_format(fmt: Any) -> Any:
    """The JSON schema a response_format asks for ({} means any JSON object), or None."""
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        schema = fmt.get("schema")
        return schema if schema is not None else {"type": "object"}
    if kind == "json_schema":
        spec = fmt.get("json_schema") or {}
        schema = spec.get("schema", fmt.get("schema"))
        if schema is None:
            raise ValueError("response_format json_schema needs a 'schema'")
        return schema
    if kind in (None, "text"):
        return None
    raise ValueError(f"unknown response_format type {kind!r} (use 'text', 'json_object' or 'json_schema')")


def _chat_logprobs_of_completion(logprobs: Optional[CompletionLogprobs]) -> Any:
    if logprobs is None:
        return None
    return {
        "content": [
            {"token": token, "bytes": None, "logprob": logprob,
             "top_logprobs": [{"token": t, "logprob": l, "bytes": None} for t, l in (top or {}).items()]}
            for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"])
        ],
        "refusal": None,
    }


def _chat_logprobs(comp: Any) -> Any:
    if comp.logprobs is None:
        return None
    return {"content": [t.to_openai() for t in comp.logprobs], "refusal": None}


def _completion_to_chat(completion_or_chunks: Any, stream: bool) -> Any:
    if not stream:
        c = completion_or_chunks
        return {
            "id": "chat" + c["id"],
            "object": "chat.completion",
            "created": c["created"],
            "model": c["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": c["choices"][0]["text"]},
                         "logprobs": _chat_logprobs_of_completion(c["choices"][0]["logprobs"]),
                         "finish_reason": c["choices"][0]["finish_reason"]}],
            "usage": c["usage"],
        }

    def chunks() -> Iterator[Any]:
        for i, chunk in enumerate(completion_or_chunks):
            base = {"id": "chat" + chunk["id"], "model": chunk["model"], "created": chunk["created"],
                    "object": "chat.completion.chunk"}
            if i == 0:
                yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None,
                                            "finish_reason": None}]}
            choice = chunk["choices"][0]
            yield {**base, "choices": [{
                "index": 0,
                "delta": {"content": choice["text"]} if choice["finish_reason"] is None else {},
                "logprobs": _chat_logprobs_of_completion(choice["logprobs"]),
                "finish_reason": choice["finish_reason"]}]}

    return chunks()


def _completion_to_chat_function(tool_name: str, completion_or_chunks: Any, stream: bool) -> Any:
    """A completion constrained to one tool's arguments, as a tool call (llama-cpp-python's shape)."""
    if not stream:
        c = completion_or_chunks
        args = c["choices"][0]["text"]
        return {
            "id": "chat" + c["id"],
            "object": "chat.completion",
            "created": c["created"],
            "model": c["model"],
            "choices": [{"index": 0,
                         "message": {"role": "assistant", "content": None,
                                     "function_call": {"name": tool_name, "arguments": args},
                                     "tool_calls": [{"id": "call__0_" + tool_name + "_" + c["id"], "type": "function",
                                                     "function": {"name": tool_name, "arguments": args}}]},
                         "logprobs": _chat_logprobs_of_completion(c["choices"][0]["logprobs"]),
                         "finish_reason": "tool_calls"}],
            "usage": c["usage"],
        }

    def chunks() -> Iterator[Any]:
        first = True
        base: Dict[str, Any] = {}
        tool_id = ""
        for chunk in completion_or_chunks:
            if chunk["choices"][0]["finish_reason"] is not None:
                continue
            if first:
                base = {"id": "chat" + chunk["id"], "object": "chat.completion.chunk", "created": chunk["created"],
                        "model": chunk["model"]}
                tool_id = "call__0_" + tool_name + "_" + chunk["id"]
                yield {**base, "choices": [{"index": 0, "finish_reason": None, "logprobs": None,
                                            "delta": {"role": "assistant", "content": None, "function_call": None,
                                                      "tool_calls": None}}]}
                first = False
            text = chunk["choices"][0]["text"]
            yield {**base, "choices": [{
                "index": 0, "finish_reason": None,
                "logprobs": _chat_logprobs_of_completion(chunk["choices"][0]["logprobs"]),
                "delta": {"role": None, "content": None, "function_call": {"name": tool_name, "arguments": text},
                          "tool_calls": [{"index": 0, "id": tool_id, "type": "function",
                                          "function": {"name": tool_name, "arguments": text}}]}}]}
        if base:
            yield {**base, "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": None,
                                        "delta": {"role": None, "content": None, "function_call": None,
                                                  "tool_calls": None}}]}

    return chunks()


def __getattr__(name: str) -> Any:
    # What llama_cpp.llama imports from its siblings (code does `from llama_cpp.llama import
    # LlamaGrammar`), loaded on first use.
    import importlib

    siblings = {"LlamaGrammar": "llama_grammar", "LlamaTokenizer": "llama_tokenizer",
                "BaseLlamaTokenizer": "llama_tokenizer", "LlamaDraftModel": "llama_speculative"}
    if name in siblings:
        return getattr(importlib.import_module(f"pyllama.compat.{siblings[name]}"), name)
    if name in ("llama_chat_format", "llama_grammar", "llama_tokenizer", "llama_speculative"):
        return importlib.import_module(f"pyllama.compat.{name}")
    if name == "llama_cpp":
        return importlib.import_module("pyllama.compat._lowlevel")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
