"""SamplingParams: every generation setting in one validated dataclass.

Names follow llama-cpp-python / LangChain (temperature, top_p, repeat_penalty,
last_n_tokens_size, mirostat_mode ...).  `build_chain` maps them onto llama.cpp's
sampler chain in the order llama.cpp's own tools use.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional, Sequence, Union

from pyllama import _core
from pyllama.errors import InvalidTokenError

DEFAULT_MAX_TOKENS = 256

# Limits checked before a setting reaches C (llama.cpp takes int32 counts and float32 values).
INT32_MAX = 2**31 - 1
FLOAT32_MAX = 3.4028234663852886e38
#: At most this many stop strings (and DRY sequence breakers), of at most MAX_STOP_CHARS
#: characters together: every slot's every token is checked against them, so one request's
#: huge list would slow every other request sharing the engine.  (The server's limits.)
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 8192
#: A logit bias is a finite number of at most this magnitude, or -inf (the token is banned).
#: Larger values (or +inf) would overflow float32 logits once scaled and make the
#: distribution NaN.
MAX_LOGIT_BIAS = 1e9


@dataclass
class SamplingParams:
    """Generation settings.  Defaults are llama.cpp's own (temperature 0.8, top_k 40,
    top_p 0.95, min_p 0.05, no repeat penalty).  ``temperature=0`` is greedy.

    Every setting is checked here, before it reaches C, with a ValueError (TypeError for a
    wrong type) naming the value and the limit: integer counts fit a C int (at most
    2**31 - 1), ``seed`` is 0 .. 2**32 - 1 or -1/None (random), float settings are finite
    and within float32's range, ``logit_bias`` maps token ids (0 .. 2**31 - 1; the
    vocabulary is checked when the sampler is built, InvalidTokenError) to finite biases of
    at most :data:`MAX_LOGIT_BIAS` in magnitude or ``-inf`` (ban the token; ``+inf`` and NaN
    are refused, as llama-server's JSON cannot express them), ``stop_tokens`` are token ids,
    and ``stop`` (as ``dry_sequence_breakers``) holds at most :data:`MAX_STOP_STRINGS`
    strings of :data:`MAX_STOP_CHARS` characters together."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    last_n_tokens_size: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    mirostat_mode: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    #: llama.cpp's newer samplers, under llama-server's names; the defaults leave them off.
    #: top_n_sigma keeps tokens within n standard deviations of the top logit (<= 0: off).
    top_n_sigma: float = -1.0
    #: XTC ("exclude top choices"): with probability xtc_probability, drop every token above
    #: xtc_threshold except the least likely of them (0: off; a threshold > 0.5 also turns it off).
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    #: Dynamic temperature: the temperature moves within temperature +- dynatemp_range with
    #: the entropy of the candidates (0: off); dynatemp_exponent shapes that mapping.
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0
    #: DRY ("don't repeat yourself"): penalise tokens that would extend a repeated sequence
    #: longer than dry_allowed_length by dry_multiplier * dry_base ** (excess length), looking
    #: at the last dry_penalty_last_n tokens (-1: the whole context); repetitions do not run
    #: across a sequence breaker.  dry_multiplier 0 turns it off.
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = 64
    dry_sequence_breakers: Sequence[str] = ("\n", ":", '"', "*")
    seed: Optional[int] = None
    max_tokens: Optional[int] = DEFAULT_MAX_TOKENS
    stop: Union[str, Sequence[str], None] = None
    stop_tokens: Sequence[int] = ()
    logit_bias: Optional[Mapping[int, float]] = None
    grammar: Optional[str] = None
    grammar_path: Optional[str] = None
    json_schema: Any = None
    ignore_eos: bool = False
    #: Not a sampler setting but a per-call one (llama-server's request field): False makes
    #: this call evaluate its whole prompt afresh instead of reusing a slot's cached prefix.
    #: LLM(cache_prompt=False) turns reuse off for every call.
    cache_prompt: bool = True
    #: The repetition stages (repeat/frequency/presence penalties, DRY) count the prompt's tokens
    #: too, as llama.cpp's tools and llama-server do; False counts only generated tokens, as
    #: llama-cpp-python 0.3 does (its compatibility layer sets it).
    penalize_prompt: bool = True
    #: Per call too: False turns off the LLM's speculative decoding (LLM(spec_type=...)) for
    #: this call; None/True use it when the LLM has it.
    speculative: Optional[bool] = None
    #: Per call too: logprobs report the distribution the sampler chain left (its candidates
    #: after top-k, top-p, min-p, temperature ...), not the model's own (llama-server's
    #: post_sampling_probs).
    post_sampling_probs: bool = False
    #: Per call too, for LLM(context_shift=True): a shift keeps the first n_keep tokens after
    #: BOS (-1: the whole prompt) and drops the next n_discard (0: half of the rest), as
    #: llama-server's request fields of those names.
    n_keep: int = 0
    n_discard: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "SamplingParams":
        """Raise ValueError/TypeError for any setting llama.cpp would choke on."""
        _finite("temperature", self.temperature, minimum=0.0)
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {self.top_k!r}")
        _int32("top_k", self.top_k)
        _prob("top_p", self.top_p, allow_zero=False)
        _prob("min_p", self.min_p, allow_zero=True)
        _prob("typical_p", self.typical_p, allow_zero=False)
        _finite("repeat_penalty", self.repeat_penalty, minimum=0.0)
        if self.repeat_penalty == 0:
            raise ValueError("repeat_penalty must be > 0 (1.0 disables it)")
        if not isinstance(self.last_n_tokens_size, int) or isinstance(self.last_n_tokens_size, bool) or \
                self.last_n_tokens_size < -1:
            raise ValueError(f"last_n_tokens_size must be an int >= -1, got {self.last_n_tokens_size!r}")
        _int32("last_n_tokens_size", self.last_n_tokens_size)
        _finite("frequency_penalty", self.frequency_penalty)
        _finite("presence_penalty", self.presence_penalty)
        if isinstance(self.mirostat_mode, bool) or self.mirostat_mode not in (0, 1, 2):
            raise ValueError(f"mirostat_mode must be 0 (off), 1 or 2, got {self.mirostat_mode!r}")
        _finite("mirostat_tau", self.mirostat_tau, minimum=0.0)
        _finite("mirostat_eta", self.mirostat_eta, minimum=0.0)
        _finite("top_n_sigma", self.top_n_sigma)
        _prob("xtc_probability", self.xtc_probability, allow_zero=True)
        _prob("xtc_threshold", self.xtc_threshold, allow_zero=True)
        _finite("dynatemp_range", self.dynatemp_range, minimum=0.0)
        _finite("dynatemp_exponent", self.dynatemp_exponent, minimum=0.0)
        _finite("dry_multiplier", self.dry_multiplier, minimum=0.0)
        _finite("dry_base", self.dry_base, minimum=1.0)
        _int_at_least("dry_allowed_length", self.dry_allowed_length, 0)
        _int_at_least("dry_penalty_last_n", self.dry_penalty_last_n, -1)
        _int32("dry_allowed_length", self.dry_allowed_length)
        _int32("dry_penalty_last_n", self.dry_penalty_last_n)
        if isinstance(self.dry_sequence_breakers, str):
            self.dry_sequence_breakers = (self.dry_sequence_breakers,)
        self.dry_sequence_breakers = tuple(self.dry_sequence_breakers)
        _check_strings("dry_sequence_breakers", self.dry_sequence_breakers)
        if self.seed is not None:
            if not isinstance(self.seed, int) or isinstance(self.seed, bool):
                raise TypeError(f"seed must be an int or None, got {type(self.seed).__name__}")
            if not (-1 <= self.seed <= 0xFFFFFFFF):
                raise ValueError(f"seed must be in 0..2**32-1 (or -1/None for a random seed), got {self.seed}")
        if self.max_tokens is not None:
            if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool):
                raise TypeError(f"max_tokens must be an int or None, got {type(self.max_tokens).__name__}")
            if self.max_tokens < -1:
                raise ValueError(f"max_tokens must be >= -1 (-1 or None = until the end), got {self.max_tokens}")
            _int32("max_tokens", self.max_tokens)
        if not isinstance(self.cache_prompt, bool):
            raise TypeError(f"cache_prompt must be True or False, got {self.cache_prompt!r}")
        if not isinstance(self.penalize_prompt, bool):
            raise TypeError(f"penalize_prompt must be True or False, got {self.penalize_prompt!r}")
        if not isinstance(self.post_sampling_probs, bool):
            raise TypeError(f"post_sampling_probs must be True or False, got {self.post_sampling_probs!r}")
        for name, low in (("n_keep", -1), ("n_discard", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
            _int32(name, value)
        if self.speculative is not None and not isinstance(self.speculative, bool):
            raise TypeError(f"speculative must be True, False or None, got {self.speculative!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None:
            if isinstance(self.stop, (bytes, bytearray, Mapping)):
                raise TypeError(f"stop must be a string or a list of strings, not {type(self.stop).__name__}")
            self.stop = list(self.stop)
            _check_strings("stop", self.stop)
        if isinstance(self.stop_tokens, (str, bytes)):
            raise TypeError("stop_tokens must be a list of token ids (ints), not a string")
        for tok in self.stop_tokens or ():
            if not isinstance(tok, numbers.Integral) or isinstance(tok, bool):
                raise TypeError(f"stop_tokens must be token ids (int), got {tok!r}")
            if not 0 <= tok <= INT32_MAX:
                raise InvalidTokenError(f"stop_tokens holds {tok}, which is not a token id (0 .. {INT32_MAX})")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, Mapping):
                raise TypeError(f"logit_bias must be a dict {{token id: bias}}, not {type(self.logit_bias).__name__}")
            for tok, bias in self.logit_bias.items():
                if not isinstance(tok, int) or isinstance(tok, bool):
                    raise TypeError(f"logit_bias keys must be token ids (int), got {tok!r}")
                if not 0 <= tok <= INT32_MAX:
                    raise InvalidTokenError(f"logit_bias key {tok} is not a token id (0 .. {INT32_MAX}; the model's "
                                     "vocabulary is checked when the sampler is built)")
                if isinstance(bias, bool) or not isinstance(bias, (int, float)):
                    raise TypeError(f"logit_bias[{tok}] must be a number, got {bias!r}")
                b = float(bias)
                if b != -math.inf and not (math.isfinite(b) and abs(b) <= MAX_LOGIT_BIAS):
                    raise ValueError(f"logit_bias[{tok}] must be a finite number within +-{MAX_LOGIT_BIAS:g} "
                                     f"or -inf (ban the token), got {bias!r}")
        given = [n for n in ("grammar", "grammar_path", "json_schema") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of grammar, grammar_path, json_schema (got {', '.join(given)})")
        if self.ignore_eos and given:
            raise ValueError("ignore_eos cannot be combined with a grammar")
        return self

    def replace(self, **overrides: Any) -> "SamplingParams":
        """A copy with some settings changed (validated).  Setting one of grammar,
        grammar_path, json_schema clears the other two."""
        unknown = set(overrides) - FIELD_NAMES
        if unknown:
            raise TypeError(_unknown_message(unknown, FIELD_NAMES, "sampling parameter"))
        if any(k in overrides for k in ("grammar", "grammar_path", "json_schema")):
            for k in ("grammar", "grammar_path", "json_schema"):
                overrides.setdefault(k, None)
        return dataclasses.replace(self, **overrides)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 and self.mirostat_mode == 0


FIELD_NAMES = frozenset(f.name for f in fields(SamplingParams))


def build_chain(
    params: SamplingParams, vocab: "_core.Vocab", eog_tokens: Sequence[int] = (), n_ctx: int = 0
) -> "_core.SamplerChain":
    """The llama.cpp sampler chain for these settings (the grammar is separate).

    ``n_ctx`` is the context the chain samples for: ``last_n_tokens_size=-1`` ("the whole
    context") penalises that many tokens (0: the model's training context).  llama.cpp's own
    sampler would read -1 as 0 and silently switch the penalty off.
    """
    chain = _core.SamplerChain(vocab)
    bias = dict(params.logit_bias or {})
    if params.ignore_eos:
        for t in eog_tokens:
            bias[t] = -math.inf
    if bias:
        chain.add_logit_bias(bias)
    if params.repeat_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
        chain.add_penalties(params.last_n_tokens_size, params.repeat_penalty, params.frequency_penalty,
                            params.presence_penalty, n_ctx=n_ctx)
    if params.dry_multiplier > 0.0 and params.dry_penalty_last_n != 0:
        chain.add_dry(params.dry_multiplier, params.dry_base, params.dry_allowed_length, params.dry_penalty_last_n,
                      params.dry_sequence_breakers, n_ctx=n_ctx)
    seed = -1 if params.seed is None else params.seed
    # Greedy keeps the penalties (they change which token is the most likely) and skips the
    # samplers that only reshape or cut the distribution (top-k ... XTC, temperature).
    if params.greedy:
        return chain.add_greedy()
    if params.mirostat_mode == 1:
        return chain.add_temp(params.temperature).add_mirostat(seed, params.mirostat_tau, params.mirostat_eta)
    if params.mirostat_mode == 2:
        return chain.add_temp(params.temperature).add_mirostat_v2(seed, params.mirostat_tau, params.mirostat_eta)
    # llama.cpp's default order (common_params_sampling::samplers): penalties, DRY, top-n-sigma,
    # top-k, typical, top-p, min-p, XTC, temperature.
    if params.top_n_sigma > 0.0:
        chain.add_top_n_sigma(params.top_n_sigma)
    if params.top_k > 0:
        chain.add_top_k(params.top_k)
    if params.typical_p < 1.0:
        chain.add_typical(params.typical_p)
    if params.top_p < 1.0:
        chain.add_top_p(params.top_p)
    if params.min_p > 0.0:
        chain.add_min_p(params.min_p)
    if params.xtc_probability > 0.0 and params.xtc_threshold <= 0.5:
        chain.add_xtc(params.xtc_probability, params.xtc_threshold, seed=seed)
    if params.dynatemp_range > 0.0:
        chain.add_temp_ext(params.temperature, params.dynatemp_range, params.dynatemp_exponent)
    else:
        chain.add_temp(params.temperature)
    return chain.add_dist(seed)


def _int_at_least(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _int32(name: str, value: int) -> None:
    """ValueError unless `value` fits the C int llama.cpp takes it as."""
    if value > INT32_MAX:
        raise ValueError(f"{name} is {value}, above the limit {INT32_MAX} (2**31 - 1)")


def _check_strings(name: str, values: Sequence[Any]) -> None:
    """Non-empty strings, at most MAX_STOP_STRINGS of them and MAX_STOP_CHARS characters together."""
    if len(values) > MAX_STOP_STRINGS:
        raise ValueError(f"{name} has {len(values)} strings; the limit is {MAX_STOP_STRINGS}")
    total = 0
    for v in values:
        if not isinstance(v, str) or not v:
            raise ValueError(f"{name} must be non-empty strings, got {v!r:.80}")
        total += len(v)
    if total > MAX_STOP_CHARS:
        raise ValueError(f"{name} has {total} characters together; the limit is {MAX_STOP_CHARS}")


def _number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    # Every float setting is a C float (float32) in llama.cpp: larger values become inf there.
    if isinstance(value, int) and abs(value) > FLOAT32_MAX or isinstance(value, float) and math.isfinite(value) \
            and abs(value) > FLOAT32_MAX:
        raise ValueError(f"{name} is {value!r}, beyond the float32 range llama.cpp uses (+-{FLOAT32_MAX:.4g})")


# The range rules themselves live in _core, next to the sampler stages that rely on them.
def _finite(name: str, value: Any, minimum: float = -math.inf) -> None:
    _number(name, value)
    _core._check_finite(name, value, minimum)


def _prob(name: str, value: Any, allow_zero: bool) -> None:
    _number(name, value)
    _core._check_prob(name, value, allow_zero)


def _unknown_message(unknown: set, valid: frozenset, what: str) -> str:
    import difflib

    parts = []
    for name in sorted(unknown):
        close = difflib.get_close_matches(name, sorted(valid), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        parts.append(f"{name!r}{hint}")
    return f"unknown {what}{'s' if len(parts) > 1 else ''}: {', '.join(parts)}"
