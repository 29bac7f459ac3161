"""Type stubs for pyllama._core, the Cython layer over llama.h.

Every class here owns exactly one C pointer (or none, for plain records).
Objects that depend on another keep it alive: a Vocab keeps its Model, a
Context its Model, a SamplerChain its Vocab.  Long calls release the GIL.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from pyllama.errors import BatchCapacityError as BatchCapacityError
from pyllama.errors import ContextLengthError as ContextLengthError
from pyllama.errors import DecodeAborted as DecodeAborted
from pyllama.errors import DecodeError as DecodeError
from pyllama.errors import GrammarError as GrammarError
from pyllama.errors import InvalidSequenceError as InvalidSequenceError
from pyllama.errors import InvalidTokenError as InvalidTokenError
from pyllama.errors import KVCacheFullError as KVCacheFullError
from pyllama.errors import MediaError as MediaError
from pyllama.errors import ModelLoadError as ModelLoadError
from pyllama.errors import OutOfMemoryError as OutOfMemoryError

__llama_cpp_commit__: str

def system_info() -> str:
    """llama.cpp's one-line system info (compiled-in CPU features and backends).

    Portable builds append ``CPU_VARIANT = <name> |``: the CPU backend variant chosen at run time.
    """

def backends() -> list[dict[str, Any]]:
    """Compiled-in backends with the devices each found.

    Each entry: {"name": str, "devices": [{"name", "description", "type",
    "memory_free", "memory_total"}], "library": str | None}.  "type" is "cpu", "gpu",
    "igpu" or "accel".  "library" is the shared library the backend was loaded from
    (portable builds; None when linked into the extension); a portable build's CPU entry
    also has "variant" (e.g. "haswell").
    """

def supports_gpu_offload() -> bool: ...
def supports_mmap() -> bool: ...
def supports_mlock() -> bool: ...
def supports_rpc() -> bool: ...
def max_devices() -> int: ...
def max_parallel_sequences() -> int: ...

def set_log_level(level: int) -> None:
    """Forward llama.cpp/ggml log records at or above this `logging` level to the
    "pyllama" logger.  The default (logging.CRITICAL + 10) forwards nothing and never
    takes the GIL from a llama.cpp thread."""

def get_log_level() -> int: ...

def validate_grammar(vocab: Vocab, grammar: str, root: str = "root") -> None:
    """Parse a GBNF grammar against a vocabulary; raise GrammarError with llama.cpp's message."""

def chat_builtin_templates() -> list[str]:
    """Names of the chat templates llama.cpp knows by itself."""

def apply_builtin_chat_template(template: str, messages: Sequence[dict[str, str]], add_assistant: bool = True) -> str:
    """Render messages with llama.cpp's built-in template engine (name such as "chatml",
    or a Jinja template string that llama.cpp recognises heuristically)."""

def rpc_start_server(endpoint: str, *, threads: int = 0, cache_dir: str | None = None,
                     devices: Sequence[str] | None = None) -> None:
    """Run ggml's RPC server in this thread until the process is interrupted.

    threads=0 computes on as many threads as a Context does by default (the physical cores,
    capped by CPU affinity and the cgroup CPU quota)."""

def rpc_add_server(endpoint: str) -> list[str]:
    """Register a remote RPC server; returns the names of the devices it added.

    The process keeps one registry: a later call with the same endpoint returns the device
    names of the first registration without contacting the server again (thread-safe).
    Raises OSError when the server cannot be reached."""


class Model:
    """A loaded GGUF model (weights + vocabulary)."""

    path: str
    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        n_gpu_layers: int = 0,
        split_mode: str = "layer",
        main_gpu: int = 0,
        tensor_split: Sequence[float] | None = None,
        use_mmap: bool | None = None,
        use_mlock: bool = False,
        vocab_only: bool = False,
        check_tensors: bool = False,
        kv_overrides: dict[str, int | float | bool | str] | None = None,
        devices: Sequence[str] | None = None,
        progress_callback: Callable[[float], bool | None] | None = None,
    ) -> None:
        """Load a model.  FileNotFoundError for a missing path, ModelLoadError for a
        directory, an empty, truncated, non-GGUF or corrupt file.  A progress callback
        returning False cancels the load (ModelLoadError)."""
    @property
    def vocab(self) -> Vocab: ...
    @property
    def metadata(self) -> dict[str, str]: ...
    def meta(self, key: str) -> str | None: ...
    @property
    def description(self) -> str: ...
    @property
    def architecture(self) -> str: ...
    @property
    def ftype(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def n_params(self) -> int: ...
    @property
    def n_ctx_train(self) -> int: ...
    @property
    def n_embd(self) -> int: ...
    @property
    def n_layer(self) -> int: ...
    @property
    def n_head(self) -> int: ...
    @property
    def n_head_kv(self) -> int: ...
    @property
    def has_encoder(self) -> bool: ...
    @property
    def has_decoder(self) -> bool: ...
    @property
    def is_recurrent(self) -> bool: ...
    @property
    def is_hybrid(self) -> bool: ...
    def chat_template(self, name: str | None = None) -> str | None: ...
    @property
    def closed(self) -> bool: ...
    def close(self) -> None: ...
    def __enter__(self) -> Model: ...
    def __exit__(self, *exc: object) -> None: ...


class Vocab:
    """The tokenizer of a Model (kept alive by it)."""

    @property
    def model(self) -> Model: ...
    @property
    def n_tokens(self) -> int: ...
    @property
    def type(self) -> str: ...
    def tokenize(self, text: str | bytes, add_special: bool = True, parse_special: bool = False) -> list[int]: ...
    def detokenize(self, tokens: Sequence[int], remove_special: bool = False, unparse_special: bool = False) -> str:
        """Tokens to text; invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD."""
    def detokenize_bytes(self, tokens: Sequence[int], remove_special: bool = False,
                         unparse_special: bool = False) -> bytes: ...
    def token_to_piece(self, token: int, special: bool = False, lstrip: int = 0) -> bytes: ...
    def token_text(self, token: int) -> str: ...
    def token_score(self, token: int) -> float: ...
    def token_attr(self, token: int) -> int: ...
    def is_eog(self, token: int) -> bool: ...
    def is_control(self, token: int) -> bool: ...
    # Special tokens; -1 when the model has none.
    bos: int
    eos: int
    eot: int
    sep: int
    nl: int
    pad: int
    mask: int
    fim_pre: int
    fim_suf: int
    fim_mid: int
    fim_pad: int
    fim_rep: int
    fim_sep: int
    add_bos: bool
    add_eos: bool
    def check_tokens(self, tokens: Sequence[int]) -> None:
        """Raise InvalidTokenError unless every id is in [0, n_tokens)."""


class Batch:
    """Tokens for one llama_decode call, over any number of sequences."""

    def __init__(self, capacity: int, n_seq_max: int = 1) -> None: ...
    @property
    def capacity(self) -> int: ...
    @property
    def n_tokens(self) -> int: ...
    @property
    def n_seq_max(self) -> int: ...
    def clear(self) -> None: ...
    def add(self, token: int, pos: int, seq_ids: int | Sequence[int] = 0, logits: bool = False) -> int:
        """Append one token; returns its index in the batch (the idx for sampling/logits)."""
    def add_sequence(self, tokens: Sequence[int] | np.ndarray, pos0: int = 0, seq_id: int = 0,
                     logits_last: bool = True) -> int:
        """Append a run of tokens of one sequence at positions pos0, pos0+1, ...;
        returns the index of the last one."""
    def add_sequences(self, sequences: Sequence[Sequence[int] | np.ndarray], seq_ids: Sequence[int] | None = None,
                      pos0: int = 0, *, logits_all: bool = False) -> int:
        """Append several sequences in one call (sequences[j] for sequence seq_ids[j], default j,
        at positions pos0, pos0+1, ...); logits on every token with logits_all, else on the
        last of each.  Returns the index of the last token appended (-1 if none); all or nothing."""
    @classmethod
    def from_arrays(cls, tokens: Sequence[int] | np.ndarray, pos: Sequence[int] | np.ndarray,
                    seq_ids: Sequence[int] | np.ndarray, logits: Sequence[bool] | np.ndarray | None = None,
                    n_seq_max: int = 1) -> Batch: ...
    def tokens(self) -> list[int]: ...


class LoraAdapter:
    """A LoRA adapter file loaded for a model (apply it with Context.set_lora_adapters)."""

    def __init__(self, model: Model, path: str | os.PathLike[str]) -> None: ...
    @property
    def model(self) -> Model: ...
    @property
    def path(self) -> str: ...


class Context:
    """An inference context (KV memory, threads, logits) over a Model."""

    model: Model
    kv_unified: bool
    def __init__(
        self,
        model: Model,
        *,
        n_ctx: int = 0,
        n_batch: int = 512,
        n_ubatch: int = 512,
        n_seq_max: int = 1,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        type_k: str = "f16",
        type_v: str = "f16",
        flash_attn: bool | str | None = None,
        embeddings: bool = False,
        pooling: str | None = None,
        rope_freq_base: float = 0.0,
        rope_freq_scale: float = 0.0,
        offload_kqv: bool = True,
        kv_unified: bool = True,
        swa_full: bool = False,
        no_perf: bool = False,
    ) -> None: ...
    @property
    def n_ctx(self) -> int: ...
    @property
    def n_ctx_seq(self) -> int:
        """KV cells one sequence can use (n_ctx, or n_ctx / n_seq_max with kv_unified=False)."""
    @property
    def has_memory(self) -> bool:
        """False for encoder models (BERT-family embedders, rerankers): no KV memory, each
        batch is evaluated on its own; kv_clear/kv_seq_rm/kv_seq_keep do nothing, kv_seq_pos_*
        give -1, kv_seq_cp/kv_seq_add raise ValueError."""
    @property
    def lock(self) -> Any:
        """The lock that serialises use of this context across threads."""
    def set_lora_adapters(self, adapters: Sequence[tuple[LoraAdapter, float]]) -> None:
        """Apply LoRA adapters (adapter, scale) to this context; [] removes them."""
    @property
    def n_batch(self) -> int: ...
    @property
    def n_ubatch(self) -> int: ...
    @property
    def n_seq_max(self) -> int: ...
    @property
    def n_vocab(self) -> int: ...
    @property
    def n_threads(self) -> int: ...
    @property
    def n_threads_batch(self) -> int: ...
    def set_threads(self, n_threads: int, n_threads_batch: int | None = None) -> None: ...
    def decode(self, batch: Batch) -> None:
        """Evaluate a batch.  Raises KVCacheFullError (no room), DecodeError, or
        KeyboardInterrupt (Ctrl-C; tokens of this batch are removed from memory)."""
    def encode(self, batch: Batch) -> None: ...
    def logits(self, idx: int = -1, copy: bool = True) -> np.ndarray:
        """Logits of output `idx` of the last decode (negative counts from the end):
        a read-only float32 view valid until the next decode, or a copy."""
    def embeddings(self, idx: int = -1, copy: bool = True) -> np.ndarray: ...
    def embeddings_seq(self, seq_id: int = 0, copy: bool = True) -> np.ndarray: ...
    # KV memory
    def kv_clear(self, data: bool = True) -> None: ...
    def kv_seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool: ...
    def kv_seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None: ...
    def kv_seq_keep(self, seq_id: int) -> None: ...
    def kv_seq_add(self, seq_id: int, p0: int, p1: int, delta: int) -> None: ...
    def kv_seq_pos_min(self, seq_id: int) -> int: ...
    def kv_seq_pos_max(self, seq_id: int) -> int: ...
    def kv_can_shift(self) -> bool: ...
    def kv_can_truncate(self) -> bool:
        """Can kv_seq_rm drop the end of a sequence?  False for recurrent and hybrid models."""
    # State
    def state_get(self) -> bytes: ...
    def state_set(self, data: bytes) -> None: ...
    def state_save_file(self, path: str | os.PathLike[str], tokens: Sequence[int] = ()) -> None: ...
    def state_load_file(self, path: str | os.PathLike[str]) -> list[int]: ...
    def seq_state_get(self, seq_id: int) -> bytes: ...
    def seq_state_set(self, data: bytes, seq_id: int) -> None: ...
    def seq_state_save_file(self, path: str | os.PathLike[str], seq_id: int, tokens: Sequence[int] = ()) -> None: ...
    def seq_state_load_file(self, path: str | os.PathLike[str], seq_id: int) -> list[int]: ...
    # Performance counters (llama_perf_context)
    def perf(self) -> dict[str, float]: ...
    def perf_reset(self) -> None: ...
    def memory_breakdown(self) -> list[dict[str, Any]]:
        """Bytes per buffer type: model weights, context (KV), compute buffers."""
    def abort(self) -> None:
        """Ask a running decode (in another thread) to stop; it raises DecodeAborted."""
    @property
    def closed(self) -> bool: ...
    def close(self) -> None: ...
    def __enter__(self) -> Context: ...
    def __exit__(self, *exc: object) -> None: ...


class UnsupportedTensorTypeError(ModelLoadError, ValueError):
    """A tensor is stored in a type llama.cpp cannot compute with (e.g. F16 norm weights)."""


class SamplerChain:
    """llama.cpp's sampler chain.  Add stages in order; the last one must select a
    token (greedy, dist, mirostat)."""

    # True when the chain is exactly [logit-bias ->] greedy: the engine then takes the argmax
    # of the logits itself instead of running llama.cpp's samplers (the same token).
    _plain_greedy: bool
    def __init__(self, vocab: Vocab, no_perf: bool = False) -> None: ...
    @property
    def vocab(self) -> Vocab: ...
    @property
    def has_grammar(self) -> bool: ...
    def add_greedy(self) -> SamplerChain: ...
    def add_dist(self, seed: int = 0xFFFFFFFF) -> SamplerChain: ...
    def add_top_k(self, k: int) -> SamplerChain: ...
    def add_top_p(self, p: float, min_keep: int = 1) -> SamplerChain: ...
    def add_min_p(self, p: float, min_keep: int = 1) -> SamplerChain: ...
    def add_typical(self, p: float, min_keep: int = 1) -> SamplerChain: ...
    def add_temp(self, t: float) -> SamplerChain: ...
    def add_temp_ext(self, t: float, delta: float, exponent: float) -> SamplerChain: ...
    def add_xtc(self, p: float, t: float, min_keep: int = 1, seed: int = 0xFFFFFFFF) -> SamplerChain: ...
    def add_top_n_sigma(self, n: float) -> SamplerChain: ...
    def add_mirostat(self, seed: int, tau: float, eta: float, m: int = 100) -> SamplerChain: ...
    def add_mirostat_v2(self, seed: int, tau: float, eta: float) -> SamplerChain: ...
    def add_penalties(self, last_n: int = 64, repeat: float = 1.0, frequency: float = 0.0,
                      presence: float = 0.0, *, n_ctx: int = 0) -> SamplerChain:
        """last_n=-1: the whole context (n_ctx, or the model's training context when 0)."""
    def add_dry(self, multiplier: float, base: float = 1.75, allowed_length: int = 2, last_n: int = -1,
                seq_breakers: Sequence[str] = ("\n", ":", '"', "*"), *, n_ctx: int = 0) -> SamplerChain: ...
    @property
    def stage_params(self) -> list[tuple[str, dict[str, Any]]]:
        """(name, parameters handed to llama.cpp) per stage: penalty windows resolved, seeds as
        the 32-bit value llama.cpp got (0xFFFFFFFF: random), logit biases as {token: bias}."""
    def add_logit_bias(self, bias: dict[int, float]) -> SamplerChain: ...
    def add_grammar(self, grammar: str, root: str = "root") -> SamplerChain:
        """GBNF grammar; GrammarError (with llama.cpp's parser message) if it does not parse."""
    def add_grammar_lazy(self, grammar: str, root: str = "root", trigger_patterns: Sequence[str] = (),
                         trigger_tokens: Sequence[int] = ()) -> SamplerChain: ...
    def sample(self, ctx: Context, idx: int = -1) -> int:
        """Sample (and accept) a token from output `idx` of ctx's last decode."""
    def accept(self, token: int) -> None: ...
    def accept_context(self, tokens: Iterable[int]) -> None:
        """Show the stages the prompt (penalties and DRY count its repetitions); negative
        keys are skipped; chains with a grammar stage refuse."""
    def reset(self) -> None: ...
    def clone(self) -> SamplerChain: ...
    @property
    def names(self) -> list[str]: ...
    def __len__(self) -> int: ...
    @property
    def seed(self) -> int: ...
    def perf(self) -> dict[str, float]: ...
    def perf_reset(self) -> None: ...


# Python hooks of a GenerationRequest (llama-cpp-python's LogitsProcessor / StoppingCriteria).
_LogitsProcessor = Callable[[np.ndarray, np.ndarray], np.ndarray]
_StoppingCriterion = Callable[[np.ndarray, np.ndarray], bool]

class GenerationRequest:
    """One prompt to run through an Engine, with its own sampler and stop conditions.

    `logprobs=K` (True = 0, up to 20) records each generated token's log-probability under the
    raw distribution and the K most likely alternatives; `prompt_logprobs=True` does the same
    for every prompt token after the first (the prompt is then not taken from a cache).

    `logits_processors`: `processor(input_ids, scores) -> scores`, called once per sampled token
    before the sampler chain and the grammar (input_ids: read-only int32 array of the tokens so
    far; scores: writable float32 view of this position's logits, valid during the call only).
    `stopping_criteria`: `criterion(input_ids, scores) -> bool`, called after each token the
    request keeps (that token last in input_ids); True ends it with finish_reason "stop" (the
    token stays in `tokens`, its text is dropped, as in llama-cpp-python).  An exception in a
    hook ends this request only (finish_reason "error").

    Speculative decoding: `draft_max > 0` drafts up to that many tokens per step from the
    prompt and output (the continuation of the latest earlier occurrence of the last
    `ngram_n` tokens, llama.cpp's ngram-simple); one decode scores them with everyone's
    tokens, the request's own sampler chain accepts them while it picks exactly the drafted
    token, and the rest leave the KV memory.  Drafts shorter than `draft_min` are not made.
    `drafter(token_ids, limit) -> tokens` replaces the n-gram lookup with a draft source of
    the caller's (called in the stepping thread, prompt + output so far, at most `limit`
    tokens used); if it raises, the request ends with that exception.  A drafter that also has
    `draft_batch([(slot, token_ids, limit), ...]) -> [tokens, ...]` (a
    pyllama.speculative.DraftModel) is called once per step for all the requests that share
    it, so a draft model drafts for every slot in the same decodes.  `synth_probs` (for
    benchmarks, pyllama.speculative.synth_acceptance) keeps drafted token i with that
    probability whatever the model says, drawn from random.Random(synth_seed).

    `n_keep`/`n_discard`: what an engine with context_shift keeps and drops when this
    request's sequence outgrows its slot (llama-server's request fields).
    """

    def __init__(
        self,
        prompt_tokens: Sequence[int] | MediaPrompt,
        sampler: SamplerChain,
        *,
        grammar: SamplerChain | None = None,
        max_tokens: int = -1,
        stop: str | Sequence[str] = (),
        stop_tokens: Sequence[int] = (),
        ignore_eos: bool = False,
        render_special: bool = False,
        tag: Any = None,
        logprobs: bool | int | None = None,
        prompt_logprobs: bool = False,
        cache_prompt: bool = True,
        logits_processors: Iterable[_LogitsProcessor] | None = None,
        stopping_criteria: Iterable[_StoppingCriterion] | None = None,
        draft_max: int = 0,
        draft_min: int = 0,
        ngram_n: int = 3,
        drafter: Callable[[list[int], int], Sequence[int] | None] | None = None,
        post_sampling_probs: bool = False,
        synth_probs: Sequence[float] | None = None,
        synth_seed: int | None = None,
        n_keep: int = 0,
        n_discard: int = 0,
    ) -> None: ...
    media: MediaPrompt | None
    n_keep: int                # the context shift keeps these after BOS (-1: the prompt)
    n_discard: int             # ... and drops these (0: half of the rest)
    tag: Any
    # Sharing (settable from any thread between steps):
    paused: bool
    cancel_requested: bool
    listener: Callable[[GenerationRequest], Any] | None
    report_progress: bool      # an event after each prompt chunk it evaluates (prompt_progress)
    @property
    def post_sampling_probs(self) -> bool:
        """Its logprobs are under the distribution the sampler chain left."""
    error: BaseException | None
    def add_follower(self, other: GenerationRequest) -> None:
        """Let `other` (same prompt) share this request's prompt evaluation (n answers)."""
    @property
    def followers(self) -> list[GenerationRequest]: ...
    @property
    def leader(self) -> GenerationRequest | None: ...
    @property
    def sampler(self) -> SamplerChain: ...
    @property
    def grammar(self) -> SamplerChain | None: ...
    @property
    def prompt_tokens(self) -> list[int]: ...
    @property
    def max_tokens(self) -> int: ...
    @property
    def stop(self) -> tuple[str, ...]: ...
    @property
    def ignore_eos(self) -> bool: ...
    @property
    def draft_max(self) -> int: ...
    @property
    def draft_min(self) -> int: ...
    @property
    def ngram_n(self) -> int: ...
    @property
    def n_discarded(self) -> int:
        """Tokens context shifts dropped from its sequence (Engine.context_shift)."""
    @property
    def n_drafted(self) -> int:
        """Tokens drafted for this request so far (speculative decoding)."""
    @property
    def n_draft_accepted(self) -> int:
        """Drafted tokens its sampler chain accepted."""
    @property
    def n_draft_steps(self) -> int:
        """Verification steps of its drafts (llama-server's spec_decode_num_drafts_total)."""
    @property
    def drafter(self) -> Callable[[list[int], int], Sequence[int] | None] | None: ...
    @property
    def n_logprobs(self) -> int: ...
    @property
    def prompt_logprobs(self) -> bool:
        """Is the prompt scored?  A follower answers for its leader (they share the prompt)."""
    @property
    def cache_prompt(self) -> bool: ...
    @property
    def logits_processors(self) -> tuple[_LogitsProcessor, ...]: ...
    @property
    def stopping_criteria(self) -> tuple[_StoppingCriterion, ...]: ...
    # Results, filled in as the request runs:
    @property
    def stopped_by_criterion(self) -> bool:
        """A stopping criterion ended the request (finish_reason "stop")."""
    @property
    def text(self) -> str: ...
    @property
    def tokens(self) -> list[int]: ...
    @property
    def n_tokens(self) -> int: ...
    @property
    def n_parts(self) -> int: ...
    def parts_since(self, start: int) -> list[str]:
        """Text pieces produced since piece `start` (a cursor: O(new pieces))."""
    def tokens_since(self, start: int) -> list[int]: ...
    def logprobs_since(self, start: int) -> list[tuple[int, float, tuple[tuple[int, float], ...]]]: ...
    @property
    def logprobs(self) -> list[tuple[int, float, tuple[tuple[int, float], ...]]]:
        """(token, logprob, ((id, logprob), ...top K)) per generated token."""
    @property
    def prompt_logprobs_list(self) -> list[tuple[int, float, tuple[tuple[int, float], ...]]]:
        """(token, logprob, top) per prompt token after the first; a follower's are its leader's."""
    @property
    def finish_reason(self) -> str | None:
        """None while running; then "eog", "stop" (stop string or stop token), "length",
        "cancelled" or "error" (see `error`)."""
    @property
    def done(self) -> bool: ...
    @property
    def running(self) -> bool: ...
    @property
    def n_prompt(self) -> int: ...
    @property
    def n_prompt_evaluated(self) -> int:
        """Prompt tokens actually evaluated (the rest came from the prompt cache / shared prefix)."""
    @property
    def n_cached_tokens(self) -> int: ...
    @property
    def prompt_progress(self) -> tuple[int, int, int]:
        """(total, cached, processed) prompt tokens; processed counts the cached ones."""
    @property
    def t_prompt_ms(self) -> float: ...
    @property
    def t_gen_ms(self) -> float: ...
    @property
    def t_sample_ms(self) -> float: ...
    @property
    def t_first_token_ms(self) -> float: ...


class PromptCache:
    """Host-memory copies of slot sequences (llama-server's ``--cache-ram``), oldest first;
    Engine.prompt_cache holds one.  A slot's prompt is copied in when the slot is about to lose
    most of it, when its cells are freed for KV room, and (``idle_slots``) for every idle slot
    when a request starts (emptied after, on a unified KV cache).  A new request's slot loads
    the entry that covers more of its prompt than the slot does (llama-server's rule)."""

    def __init__(self, limit_mib: int, limit_tokens: int = 0, idle_slots: bool = True) -> None: ...
    idle_slots: bool
    @property
    def limit_bytes(self) -> int: ...
    @property
    def limit_tokens(self) -> int: ...
    @property
    def n_saved(self) -> int: ...
    @property
    def n_restored(self) -> int: ...
    @property
    def size_bytes(self) -> int: ...
    @property
    def n_tokens(self) -> int: ...
    def __len__(self) -> int: ...
    def clear(self) -> None: ...
    def info(self) -> dict[str, int | bool]: ...


class Engine:
    """Decode -> sample -> detokenize -> stop check, for one or many sequences.

    All live sequences advance in one llama_decode per step; prompt prefill of
    new requests shares batches with running ones; a finished slot takes the
    next waiting request at once (continuous batching).  Each slot keeps the
    tokens in its KV memory: a new request goes to the free slot with the longest
    common prefix and evaluates only the rest (`cache_prompt`).  Stepped by one
    thread at a time (pyllama.scheduler); paused requests are skipped and give
    their slot up when another request needs it.
    """

    def __init__(self, context: Context, n_slots: int | None = None, *, cache_prompt: bool = True,
                 spec_cost_model: bool = True) -> None: ...
    cache_prompt: bool
    #: A sequence about to outgrow its slot drops the older half of its tokens (BOS kept) and
    #: goes on, as llama-server's --context-shift; False (default): its answer ends ("length").
    context_shift: bool
    #: The host-memory prompt cache (None: only the slots' own KV cells cache prompts).
    prompt_cache: PromptCache | None
    #: A new request takes the free slot whose cache it reuses most only if that is more than this
    #: share of its prompt (llama-server's --slot-prompt-similarity, default 0.1; 0: never);
    #: otherwise an empty slot, else the least recently used one.
    slot_similarity: float
    @property
    def context(self) -> Context: ...
    @property
    def n_slots(self) -> int: ...
    def submit(self, request: GenerationRequest) -> None: ...
    def cancel(self, request: GenerationRequest) -> None: ...
    def collect_cancelled(self) -> list[tuple[GenerationRequest, str, str | None]]:
        """Finish requests whose cancel_requested is set, now (between steps)."""
    def requests(self) -> list[GenerationRequest]:
        """Every unfinished request (running, waiting, preempted, unforked followers)."""
    def slot_info(self) -> list[dict[str, Any]]: ...
    def save_slot(self, slot: int, path: str | os.PathLike[str]) -> int:
        """Save idle slot `slot`'s KV sequence and its tokens to `path`; returns the token count."""
        ...
    def restore_slot(self, slot: int, path: str | os.PathLike[str]) -> int:
        """Load a save_slot file into idle slot `slot` (its prompt cache); returns the token count."""
        ...
    def share_prefix(self, prompts: Sequence[Sequence[int]]) -> int: ...
    def reset(self) -> None: ...
    def preempt_paused(self) -> int:
        """Free the slot of every paused request that can give it up; how many slots still hold one."""
    def adopt(self, old: Engine) -> None:
        """Take over the unfinished (queued, preempted) requests of an engine being replaced."""
    @property
    def busy(self) -> bool: ...
    @property
    def runnable(self) -> bool: ...
    @property
    def cached_tokens(self) -> list[int]: ...
    @property
    def n_waiting(self) -> int: ...
    @property
    def n_decode_total(self) -> int: ...
    @property
    def n_busy_slots_total(self) -> int: ...
    @property
    def n_steps(self) -> int: ...
    @property
    def n_preemptions(self) -> int: ...
    @property
    def truncatable(self) -> bool:
        """False on a recurrent/hybrid memory: a cache is reused only whole or from a checkpoint."""
    n_checkpoints: int
    """At most this many saved states per slot (recurrent/hybrid memory only; 0: none)."""
    @property
    def n_checkpoints_saved(self) -> int: ...
    @property
    def n_checkpoints_restored(self) -> int: ...
    @property
    def t_decode_ms_total(self) -> float:
        """Wall time spent in llama_decode (and waiting for its outputs), over all steps."""
    @property
    def n_drafted_total(self) -> int: ...
    @property
    def n_draft_accepted_total(self) -> int: ...
    spec_max_sequences: int
    """Requests draft (speculative decoding) only while fewer sequences than this generate."""
    spec_cost_model: bool
    """True: draft lengths maximise expected tokens/ms from the measured decode cost by batch
    size (decode_cost_ms) and each request's acceptance; False: acceptance alone decides."""
    @property
    def decode_cost_ms(self) -> tuple[float, float] | None:
        """The fitted decode cost by batch size, (a, b) in t = a + b * n_tokens ms, by which
        speculation sizes its drafts; None until decodes of a few sizes were seen."""
    def step(
        self, events: list[tuple[GenerationRequest, str, str | None]] | None = None,
        before_decode: Callable[[], Any] | None = None,
    ) -> list[tuple[GenerationRequest, str, str | None]]:
        """One decode step: (request, new_text, finish_reason) events, appended to `events`
        (or a new list), which is returned.  Events produced before an exception are already
        in the given list.  `before_decode()` runs once right before llama_decode releases
        the GIL (not when nothing is decoded); its exceptions are ignored."""
    def run(self, requests: Iterable[GenerationRequest] = (),
            callback: Callable[[GenerationRequest, str], Any] | None = None) -> None:
        """Submit requests and step until they (and their followers) are finished; with
        none, until nothing is runnable (no Python per token unless
        a callback is given)."""


# ---- images and audio: llama.cpp's mtmd (tools/mtmd) --------------------------------

DEFAULT_MAX_PIXELS: int
DEFAULT_MAX_IMAGE_BYTES: int
DEFAULT_CACHE_BYTES: int

def mtmd_available() -> bool:
    """Whether this build has llama.cpp's mtmd library (-DPYLLAMA_MTMD=OFF leaves it out)."""

def media_marker() -> str:
    """The text that stands for one medium in a prompt given to Multimodal.tokenize."""

class Bitmap:
    """Decoded media for mtmd: an image (RGB pixels) or an audio clip (PCM float samples),
    with ``id`` (SHA-256 of the data; the encode cache's key)."""

    id: str
    @staticmethod
    def from_rgb(pixels: Any, width: int, height: int, *, max_pixels: int | None = ...) -> Bitmap: ...
    @staticmethod
    def from_audio(samples: Any) -> Bitmap: ...
    @property
    def is_audio(self) -> bool: ...
    @property
    def kind(self) -> str:
        """"image" or "audio"."""
    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...
    @property
    def n_bytes(self) -> int: ...

class Multimodal:
    """A projector ("mmproj" GGUF) loaded for a text Model; keeps the Model alive.  Encoded
    media are cached by id (at most `cache_size` entries and `cache_bytes` bytes, least
    recently used out first); encoding is serialised.  Images over `max_pixels` or whose
    decode needs more than `max_image_bytes` (from the header) are refused before decoding."""

    model: Model
    path: str
    n_embd: int
    max_pixels: int | None
    max_image_bytes: int | None
    cache_size: int
    cache_bytes: int
    cache_hits: int
    cache_misses: int
    def __init__(
        self,
        model: Model,
        path: str | os.PathLike[str],
        *,
        use_gpu: bool = True,
        n_threads: int | None = None,
        image_min_tokens: int | None = None,
        image_max_tokens: int | None = None,
        cache_size: int = 32,
        max_pixels: int | None = ...,
        cache_bytes: int = ...,
        max_image_bytes: int | None = ...,
    ) -> None: ...
    def close(self) -> None: ...
    @property
    def support_vision(self) -> bool: ...
    @property
    def support_audio(self) -> bool: ...
    @property
    def audio_sample_rate(self) -> int: ...
    @property
    def marker(self) -> str: ...
    def load(self, data: bytes | bytearray | memoryview) -> Bitmap:
        """Decode PNG/JPEG/BMP/GIF (or WAV/MP3/FLAC for audio projectors) after a header check."""
    def load_file(self, path: str | os.PathLike[str]) -> Bitmap: ...
    def tokenize(self, text: str, bitmaps: Sequence[Bitmap] = (), *, add_special: bool = True,
                 parse_special: bool = True) -> MediaPrompt:
        """Tokenize `text`, each marker standing for the next bitmap."""
    def tokenize_parts(self, parts: Sequence[str | tuple[str, bool] | Bitmap], *,
                       add_special: bool = True) -> MediaPrompt: ...
    def cache_info(self) -> dict[str, int]: ...
    def clear_cache(self) -> None: ...
    def encode(self, prompt: MediaPrompt, index: int) -> np.ndarray:
        """Embeddings of media chunk `index`: float32, (n_tokens, n_embd)."""
    def eval(self, context: Context, prompt: MediaPrompt, *, seq_id: int = 0, n_past: int = 0,
             logits_last: bool = True) -> int:
        """Evaluate the prompt into a sequence of `context`; returns the new n_past."""

class MediaPrompt:
    """A prompt tokenized into text and media chunks; ``tokens`` flattens it (media
    positions hold negative keys derived from the media's ids)."""

    multimodal: Multimodal
    tokens: list[int]
    spans: list[tuple[int, int, int]]
    pos_spans: list[tuple[int, int, int, int]]
    """M-RoPE media (start, n_tokens, n_pos, last_t): positions not one per token."""
    def __len__(self) -> int: ...
    @property
    def n_media(self) -> int: ...
    @property
    def n_positions(self) -> int:
        """Positions the prompt takes (fewer than its tokens after M-RoPE images)."""
    @property
    def n_media_tokens(self) -> int: ...
    def chunks_info(self) -> list[dict[str, Any]]: ...
    def text_tokens(self) -> list[int]: ...
