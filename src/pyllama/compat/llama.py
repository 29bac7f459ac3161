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

This module holds the ``Llama`` class itself (loading, model information, tokens, state,
embeddings, low-level stepping, the Hub) and is the public home of every name below; the
rest lives next to it:

* ``_llama_completion.py`` -- ``create_completion``/``__call__``: sampling options, prompt
  tokens, the completion dict and its stream chunks (a base class of ``Llama``);
* ``_llama_chat.py`` -- ``create_chat_completion``: handlers, formats, tools,
  ``response_format`` and the chat-shaped results (a base class of ``Llama``);
* ``_llama_hooks.py`` -- logits processors, stopping criteria, draft-model adapter;
* ``_llama_handles.py`` -- stand-ins for ctypes handles, ``LlamaState``, the params records;
* ``_llama_constants.py`` -- llama.cpp's constants, sizing defaults, :data:`DIFFERENCES`.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import numpy.typing as npt

# Everything below is re-exported: code written for llama-cpp-python (and its own tests)
# imports these names, private ones included, from llama_cpp.llama.
from pyllama.compat._llama_chat import (  # noqa: F401
    _ChatMixin,
    _chat_logprobs,
    _chat_logprobs_of_completion,
    _completion_to_chat,
    _completion_to_chat_function,
    _schema_of_response_format,
)
from pyllama.compat._llama_completion import _CompletionMixin, _finish, _unsupported  # noqa: F401
from pyllama.compat._llama_constants import (  # noqa: F401
    _GGML_KV_TYPES,
    _LLM_PASSTHROUGH,
    _SPLIT_MODES,
    DEFAULT_N_PARALLEL,
    DIFFERENCES,
    DOCS,
    KV_CELLS_BUDGET,
    LLAMA_ATTENTION_TYPE_UNSPECIFIED,
    LLAMA_DEFAULT_SEED,
    LLAMA_POOLING_TYPE_NONE,
    LLAMA_POOLING_TYPE_UNSPECIFIED,
    LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED,
    LLAMA_SPLIT_MODE_LAYER,
    LLAMA_SPLIT_MODE_NONE,
    LLAMA_SPLIT_MODE_ROW,
)
from pyllama.compat._llama_handles import (  # noqa: F401
    _STATE_MAGIC,
    CHandleError,
    LlamaState,
    _ContextParams,
    _ContextWrapper,
    _ModelParams,
    _NoCHandle,
    _Settings,
)
from pyllama.compat._llama_hooks import (  # noqa: F401
    LogitsProcessor,
    LogitsProcessorList,
    MinTokensLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    _Criteria,
    _draft_model_adapter,
)
from pyllama.compat.llama_cache import BaseLlamaCache, LlamaCache, LlamaDiskCache, LlamaRAMCache  # noqa: F401
from pyllama.compat.llama_cache import _longest_prefix
from pyllama.compat.llama_types import *  # noqa: F401,F403
from pyllama.compat.llama_types import (  # noqa: F401
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


class Llama(_ChatMixin, _CompletionMixin):
    """llama-cpp-python's high-level ``Llama`` on pyllama's engine (see the module docstring
    and :data:`DIFFERENCES`).  ``Llama.llm`` is the :class:`pyllama.LLM` that runs everything.

    This class holds loading, model information, tokens, state, embeddings, low-level
    stepping and the Hub; completions come from :class:`_CompletionMixin`
    (``_llama_completion.py``) and chats from :class:`_ChatMixin` (``_llama_chat.py``)."""

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
        # One KV stream of n_ctx cells per slot, as llama-cpp-python gives each call n_ctx, and as
        # llama-server does with -np N: a shared memory would buy a call nothing it could use,
        # while its attention would span every slot's cells (12% slower with eight calls, BENCHMARKS.md).
        kv_unified = bool(passthrough.pop("kv_unified", False))

        self.llm = LLM(
            self.model_path, n_ctx=self._n_ctx * self.n_parallel, n_batch=self.n_batch,
            n_ubatch=min(self.n_batch, n_ubatch), n_threads=n_threads, n_threads_batch=n_threads_batch,
            n_parallel=self.n_parallel, n_gpu_layers=n_gpu_layers, main_gpu=main_gpu, tensor_split=tensor_split,
            split_mode=_SPLIT_MODES[split_mode], use_mmap=use_mmap, use_mlock=use_mlock, vocab_only=vocab_only,
            kv_overrides=kv_overrides, flash_attn=bool(flash_attn), rope_freq_base=rope_freq_base,
            rope_freq_scale=rope_freq_scale, lora_path=lora_path, lora_scale=lora_scale, embedding=embedding,
            kv_unified=kv_unified, verbose=verbose, **kv_types, **passthrough)
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
