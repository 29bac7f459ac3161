"""From a call's arguments to engine requests.

Keyword checks, sampling parameters, grammars, prompt tokens, one GenerationRequest and the
group of n answers that share a prompt, how many slots a batch gets (re-creating the context
when it needs more), and the one preparation of every chat call (tools, streaming,
response_format) that ``LLM.chat``, ``achat``, ``astream_chat`` and the server share.

The functions take the LLM whose requests they build; they read its vocab, context and
defaults and never run anything (pyllama.streams runs what is prepared here).
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

from pyllama import _core
from pyllama import tools as tools_mod
from pyllama.errors import ContextLengthError, MediaError
from pyllama.sampling import FIELD_NAMES as SAMPLING_FIELDS
from pyllama.sampling import SamplingParams, _unknown_message, build_chain

if TYPE_CHECKING:
    from pyllama.llm import LLM

#: n_ctx when LLM(n_ctx=None): the model's training context, capped here.
DEFAULT_N_CTX_CAP = 4096
#: generate() without n_parallel runs at most this many prompts at once.
MAX_AUTO_SLOTS = 16

#: Speculative decoding methods pyllama implements: llama-server's --spec-type name for n-gram
#: self-speculation, and "draft" for a draft model (llama-server turns that on with -md).
SPEC_TYPES = ("ngram-simple", "draft")


# ---- checking arguments -------------------------------------------------------------------


def check_kwargs(func: Callable) -> Callable:
    """Unknown keyword arguments raise TypeError naming the closest valid names
    (never silently dropped)."""
    sig = inspect.signature(func)
    valid = frozenset(p.name for p in sig.parameters.values()
                      if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)) - {"self"}
    has_var_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    extra_valid = SAMPLING_FIELDS if has_var_kw else frozenset()

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        unknown = set(kwargs) - valid - extra_valid
        if unknown:
            raise TypeError(f"{func.__qualname__}(): " + _unknown_message(unknown, valid | extra_valid, "argument"))
        return func(*args, **kwargs)

    return wrapper


def prompt_cache_settings(cache_ram_mib: Any, idle_slots: Any) -> Optional[tuple]:
    """LLM(cache_ram_mib=, cache_idle_slots=) checked: (MiB, idle_slots), or None for no
    host-memory prompt cache (0, the library's default; -1 is llama-server's "no byte limit")."""
    if not isinstance(cache_ram_mib, int) or isinstance(cache_ram_mib, bool) or cache_ram_mib < -1:
        raise ValueError(f"cache_ram_mib must be an int >= -1 (MiB; 0: no prompt cache in RAM, -1: no "
                         f"size limit), got {cache_ram_mib!r}")
    if not isinstance(idle_slots, bool):
        raise TypeError(f"cache_idle_slots must be True or False, got {idle_slots!r}")
    return None if cache_ram_mib == 0 else (cache_ram_mib, idle_slots)


def slot_similarity(value: Any) -> float:
    """LLM(slot_prompt_similarity=) checked: a share of the prompt in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"slot_prompt_similarity must be a number in [0, 1] (0: always the least "
                         f"recently used slot), got {value!r}")
    return float(value)


def spec_settings(spec_type: Optional[str], draft_max: Any, draft_min: Any, ngram_n: Any,
                  draft_model: Any, draft_p_min: Any = 0.0, synth_rates: Any = None,
                  synth_len: Any = None) -> Optional[dict]:
    """The GenerationRequest arguments of LLM(spec_type=...), checked before anything loads
    (plus "draft_model" and "draft_p_min" for LLM itself when a draft model is given)."""
    from pyllama.speculative import synth_acceptance

    for name, value, low, high in (("draft_max", draft_max, 1, 256), ("draft_min", draft_min, 0, 256),
                                   ("spec_ngram_size_n", ngram_n, 1, 64)):
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(f"{name} must be an int in {low}..{high}, got {value!r}")
    if draft_min > draft_max:
        raise ValueError(f"draft_min ({draft_min}) must not exceed draft_max ({draft_max})")
    if (not isinstance(draft_p_min, (int, float)) or isinstance(draft_p_min, bool)
            or not 0.0 <= draft_p_min <= 1.0):
        raise ValueError(f"draft_p_min must be a number in [0, 1], got {draft_p_min!r}")
    if draft_model is not None and not isinstance(draft_model, (str, os.PathLike)) and not callable(draft_model):
        raise TypeError("draft_model must be a GGUF path, a known model name or a drafter(token_ids, limit) "
                        f"callable, got {type(draft_model).__name__}")
    if spec_type is None and draft_model is not None:
        spec_type = "draft"          # as llama-server: -md alone turns draft-model speculation on
    if spec_type in (None, "none"):
        if draft_model is not None:
            raise ValueError("draft_model was given but spec_type='none' turns speculation off")
        if synth_rates is not None or synth_len is not None:
            raise ValueError("synthetic acceptance (spec_synth_rates / spec_synth_len) needs speculative "
                             "decoding: a spec_type or a draft_model")
        return None
    if spec_type not in SPEC_TYPES:
        raise ValueError(f"unknown spec_type {spec_type!r}: pyllama implements {', '.join(SPEC_TYPES)} "
                         "(or None for plain decoding)")
    if spec_type == "draft" and draft_model is None:
        raise ValueError("spec_type='draft' needs draft_model (a GGUF with the target's vocabulary)")
    if spec_type != "draft" and draft_model is not None:
        raise ValueError(f"draft_model is for spec_type='draft', not {spec_type!r}")
    spec = {"draft_max": draft_max, "draft_min": draft_min, "ngram_n": ngram_n}
    synth = synth_acceptance(synth_rates, synth_len, draft_max)
    if synth is not None:
        spec["synth_probs"] = synth
    if spec_type == "draft" and callable(draft_model):
        spec.update(drafter=draft_model)    # the caller's own draft source, called per request
    elif spec_type == "draft":
        spec.update(draft_model=draft_model, draft_p_min=float(draft_p_min))
    return spec


def check_n_parallel(n_parallel: Any, n_batch: int) -> None:
    """n_parallel sequences must be possible: llama.cpp's own limit, and one batch row each
    (llama.cpp reserves n_seq_max outputs per batch: more sequences than n_batch abort it)."""
    if not isinstance(n_parallel, int) or isinstance(n_parallel, bool) or n_parallel < 1:
        raise ValueError(f"n_parallel must be an int >= 1, got {n_parallel!r}")
    if n_parallel > _core.max_parallel_sequences():
        raise ValueError(f"n_parallel={n_parallel} exceeds llama.cpp's limit of "
                         f"{_core.max_parallel_sequences()} sequences (n_seq_max)")
    if n_parallel > n_batch:
        raise ValueError(f"n_parallel={n_parallel} exceeds n_batch={n_batch}: every sequence needs room in a "
                         "batch; raise n_batch or lower n_parallel")


def logprobs_arg(logprobs: Any, top_logprobs: Any) -> Any:
    """None (off) or the number of top alternatives (0..20) to record per token."""
    if top_logprobs is None:
        top_logprobs = 0
    if not isinstance(top_logprobs, int) or isinstance(top_logprobs, bool) or not 0 <= top_logprobs <= 20:
        raise ValueError(f"top_logprobs must be an int in 0..20, got {top_logprobs!r}")
    if logprobs is None or logprobs is False:
        if top_logprobs:
            raise ValueError("top_logprobs needs logprobs=True")
        return None
    if logprobs is True:
        return top_logprobs
    if isinstance(logprobs, int) and 0 <= logprobs <= 20:   # OpenAI's legacy completions: logprobs=K
        return max(logprobs, top_logprobs)
    raise ValueError(f"logprobs must be True/False (or an int 0..20 as in OpenAI's completions), got {logprobs!r}")


def is_chat(prompt: Any) -> bool:
    """A list of message dicts (generate() takes chats among its prompts)."""
    return (isinstance(prompt, (list, tuple)) and len(prompt) > 0 and isinstance(prompt[0], Mapping))


# ---- grammars ---------------------------------------------------------------------------


def resolve_grammar(params: SamplingParams) -> Optional[str]:
    """The GBNF text of params' grammar / grammar_path / json_schema, or None."""
    if params.grammar is None and params.grammar_path is None and params.json_schema is None:
        return None
    from pyllama.grammar import load_grammar   # JSON Schema conversion: loaded on first use

    return load_grammar(grammar=params.grammar, grammar_path=params.grammar_path, json_schema=params.json_schema)


def response_format_overrides(fmt: Mapping[str, Any]) -> dict:
    """The sampling overrides (grammar_path or json_schema) of an OpenAI response_format."""
    kind = fmt.get("type")
    if kind == "json_object":
        schema = fmt.get("schema")
        if schema is not None:
            return {"json_schema": schema}
        from pyllama.grammar import grammar_path

        return {"grammar_path": grammar_path("json")}
    if kind == "json_schema":
        spec = fmt.get("json_schema") or {}
        schema = spec.get("schema", fmt.get("schema"))
        if schema is None:
            raise ValueError("response_format json_schema needs a 'schema'")
        return {"json_schema": schema}
    if kind in (None, "text"):
        return {}
    raise ValueError(f"unknown response_format type {kind!r} (use 'text', 'json_object' or 'json_schema')")


# ---- requests ---------------------------------------------------------------------------


def prompt_tokens(llm: "LLM", prompt: Union[str, Sequence[int]], add_special: bool = True,
                  parse_special: bool = False) -> Any:
    """The prompt's tokens (or its MediaPrompt), checked against the vocab and the context."""
    if isinstance(prompt, _core.MediaPrompt):
        if llm.multimodal is None or prompt.multimodal is not llm.multimodal:
            raise MediaError("this MediaPrompt was made by another LLM's projector")
        tokens = prompt
    elif is_chat(prompt):
        tokens = llm.chat_prompt(prompt)
    elif isinstance(prompt, (str, bytes)):
        tokens = llm.vocab.tokenize(prompt, add_special=add_special, parse_special=parse_special)
    else:
        tokens = [int(t) for t in prompt]
        llm.vocab.check_tokens(tokens)
    if not tokens:
        raise ValueError("the prompt is empty (no tokens); pass some text")
    n_ctx = llm.context.n_ctx_seq
    if len(tokens) >= n_ctx:
        raise ContextLengthError(f"the prompt has {len(tokens)} tokens but the context window (n_ctx) is "
                                 f"{n_ctx}; shorten the prompt or load with a larger n_ctx")
    return tokens


def build_request(llm: "LLM", prompt: Any, params: SamplingParams, tag: Any = None, *, add_special: bool = True,
                  parse_special: bool = False, tokens: Optional[list] = None, logprobs: Any = None,
                  echo: bool = False, seed_offset: int = 0,
                  hooks: Optional[Mapping[str, Any]] = None) -> "_core.GenerationRequest":
    """One GenerationRequest: its sampler chain, grammar, stops and speculation."""
    if tokens is None:
        tokens = llm._prompt_tokens(prompt, add_special, parse_special)
    if seed_offset and params.seed is not None and params.seed >= 0:
        params = params.replace(seed=(params.seed + seed_offset) & 0xFFFFFFFF)
    chain = build_chain(params, llm.vocab, llm._eog_tokens() if params.ignore_eos else (),
                        n_ctx=llm.context.n_ctx_seq)
    # The windows of the stages that count repetitions, as the chain resolved them (-1: n_ctx).
    window = max((p["last_n"] for name, p in chain.stage_params if name in ("penalties", "dry")), default=0)
    if window and params.penalize_prompt:
        # The repetition stages see the prompt too (llama.cpp's tools, llama-server and
        # llama-cpp-python all do): a repeat penalty also keeps the answer from echoing it.
        keys = getattr(tokens, "tokens", tokens)        # a MediaPrompt's keys; images are skipped
        chain.accept_context(keys[-window:])
    gbnf = resolve_grammar(params)
    grammar = _core.SamplerChain(llm.vocab).add_grammar(gbnf) if gbnf is not None else None
    max_tokens = -1 if params.max_tokens is None else params.max_tokens
    spec = llm._spec if params.speculative is not False else None
    if spec is not None:
        spec = {k: v for k, v in spec.items() if k != "draft_p_min"}
        if llm._drafter is not None:
            spec["drafter"] = llm._drafter
        if "synth_probs" in spec:         # its random draws are as reproducible as the sampling
            spec["synth_seed"] = params.seed if params.seed is not None and params.seed >= 0 else None
    return _core.GenerationRequest(tokens, chain, grammar=grammar, max_tokens=max_tokens,
                                   stop=params.stop or (), stop_tokens=params.stop_tokens,
                                   ignore_eos=params.ignore_eos, tag=tag, logprobs=logprobs,
                                   prompt_logprobs=echo and logprobs is not None,
                                   cache_prompt=params.cache_prompt, post_sampling_probs=params.post_sampling_probs,
                                   n_keep=params.n_keep, n_discard=params.n_discard,
                                   **(spec or {}), **(hooks or {}))


def build_group(llm: "LLM", prompt: Any, params: SamplingParams, *, n: int, logprobs: Any, echo: bool,
                tag: Any = None, add_special: bool = True, parse_special: bool = False,
                hooks: Optional[Mapping[str, Any]] = None) -> list:
    """The requests of one prompt: a leader and n - 1 followers that share its prompt
    evaluation (llama_memory_seq_cp) and differ by seed."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if n > _core.max_parallel_sequences():
        raise ValueError(f"n={n} exceeds llama.cpp's limit of {_core.max_parallel_sequences()} sequences")
    tokens = llm._prompt_tokens(prompt, add_special, parse_special)
    # Through llm._request (not build_request): a test or tool that wraps it sees every request.
    leader = llm._request(prompt, params, tag, tokens=tokens, logprobs=logprobs, echo=echo,
                          hooks=_hooks_for_request(hooks))
    group = [leader]
    for i in range(1, n):
        f = llm._request(prompt, params, tag, tokens=tokens, logprobs=logprobs, seed_offset=i,
                         hooks=_hooks_for_request(hooks))
        leader.add_follower(f)
        group.append(f)
    return group


def _hooks_for_request(hooks: Optional[Mapping[str, Any]]) -> Optional[Mapping[str, Any]]:
    """The hooks of one request: a hook with per-request state (a ``for_request()`` method,
    e.g. the reasoning budget) is copied, so each of n answers counts its own tokens."""
    def copies(hs: Any) -> bool:     # (only lists and tuples: anything else is checked by the request)
        return isinstance(hs, (list, tuple)) and any(hasattr(h, "for_request") for h in hs)

    if not hooks or not any(copies(hs) for hs in hooks.values()):
        return hooks
    return {name: [h.for_request() if hasattr(h, "for_request") else h for h in hs] if copies(hs) else hs
            for name, hs in hooks.items()}


class Prepared:
    """Requests built for one call: the leaders to submit, every request to watch (followers
    included, in answer order) and how to turn them into the call's result."""

    __slots__ = ("leaders", "requests", "finish", "reasoning")

    def __init__(self, leaders: list, requests: list, finish: Callable[..., Any]) -> None:
        self.leaders = leaders
        self.requests = [r for lead in leaders for r in [lead, *lead.followers]] if requests is leaders else requests
        self.finish = finish
        self.reasoning: Any = None      # a chat's ReasoningConfig (how its stream splits the thinking)


# ---- slots ------------------------------------------------------------------------------


def ensure_slots(llm: "LLM", n: int) -> None:
    """At least n sequences: re-create the context when it has fewer.  Requests of other
    calls that are generating are waited for (this thread steps with them); paused ones (an
    unread stream) give their slot up and move to the new context when the engine can hand
    them over (Engine.preempt_paused/adopt), where they resume, re-evaluated."""
    if n <= llm.context.n_seq_max:
        return
    if n > llm._ctx_params["n_batch"]:
        raise ValueError(f"{n} sequences at once exceed n_batch={llm._ctx_params['n_batch']}")

    def generating() -> bool:
        return any(not r.paused for r in llm._engine.requests())

    while True:
        with llm._lock, llm._sched.exclusive():
            if n <= llm.context.n_seq_max:
                return
            engine = llm._engine
            if not generating() and engine.preempt_paused() == 0:
                # Nothing holds a slot (an unread stream gave its slot up): re-create the
                # context; queued and preempted requests move over and resume there.
                llm._stats.decodes_before += engine.n_decode_total
                llm._stats.busy_before += engine.n_busy_slots_total
                llm._make_context(n)
                llm._engine.adopt(engine)
                return
            if not generating():
                raise ValueError(f"{n} sequences at once need n_parallel >= {n}, and this LLM (n_parallel="
                                 f"{llm.context.n_seq_max}) holds paused calls (an unread stream); load it "
                                 f"with LLM(..., n_parallel={n})")
        # Other calls are generating: step with them until only paused ones are left.
        llm._sched.drive(lambda: not generating())


def plan_slots(llm: "LLM", reqs: list, n_parallel: Optional[int]) -> int:
    """How many sequences to run at once: as many as asked (or up to 16), limited
    by what fits in the KV memory and a batch; an impossible request fails before any work."""
    n_ctx = llm.context.n_ctx
    need = []
    for r in reqs:
        gen = r.max_tokens if r.max_tokens >= 0 else 0
        need.append(r.n_prompt + gen)
    longest = max(need)
    if longest >= n_ctx:
        raise ContextLengthError(f"a prompt plus max_tokens needs {longest} tokens but n_ctx is {n_ctx}")
    n_batch = llm._ctx_params["n_batch"]
    if n_parallel is not None:
        check_n_parallel(n_parallel, n_batch)
        wanted = min(n_parallel, len(reqs))
    else:
        wanted = min(len(reqs), MAX_AUTO_SLOTS, n_batch)
    fits = max(1, n_ctx // max(longest, 1))
    if n_parallel is not None and wanted > fits:
        raise ContextLengthError(f"{wanted} parallel sequences of up to {longest} tokens need "
                                 f"{wanted * longest} KV cells but n_ctx is {n_ctx}: lower n_parallel or "
                                 f"max_tokens, or load with n_ctx >= {wanted * longest}")
    return max(1, min(wanted, fits))


def batch_requests(llm: "LLM", prompts: Sequence[Any], per_prompt: Optional[Sequence[Mapping[str, Any]]],
                   overrides: Mapping[str, Any], n_parallel: Optional[int], share_prefix: bool,
                   logprobs: Any = None) -> list:
    """The requests of generate(): one per prompt (tag = its index), with the slots they need
    and their shared prefix evaluated once."""
    llm._check_open()
    prompts = list(prompts)
    if not prompts:
        return []
    if per_prompt is not None and len(per_prompt) != len(prompts):
        raise ValueError(f"per_prompt has {len(per_prompt)} entries for {len(prompts)} prompts")
    base = llm._params(overrides)
    reqs = []
    for i, p in enumerate(prompts):
        params = base.replace(**per_prompt[i]) if per_prompt and per_prompt[i] else base
        reqs.append(llm._request(p, params, tag=i, logprobs=logprobs))
    slots = plan_slots(llm, reqs, n_parallel)
    if slots > llm.context.n_seq_max and not llm._engine.busy:
        try:
            ensure_slots(llm, slots)
        except ValueError:
            pass   # busy meanwhile: the prompts queue for the slots there are
    if share_prefix and len(reqs) > 1:
        with llm._sched.exclusive():
            llm._engine.share_prefix([r.prompt_tokens for r in reqs])
    return reqs


# ---- chat -------------------------------------------------------------------------------


class ChatCall(NamedTuple):
    """A chat made ready to generate: the prompt, the complete()/stream() keyword arguments,
    and what turns the finished Completion(s) into the chat's answer."""

    prompt: Any                                 # tokens, or a MediaPrompt
    options: dict                               # n, logprobs, sampling overrides (with any grammar)
    finish: Optional[Callable[[Any], Any]]      # the parser (tools, thinking); None: the Completion as is
    whole: bool                                 # the answer comes whole (tool calls): no live stream
    reasoning: Any = None                       # the ReasoningConfig (pyllama.chat.reasoning), or None


#: Prompt tokens whose text tells whether the template opened the thinking itself.
_PROMPT_TAIL_TOKENS = 32
_GRAMMAR_OPTIONS = ("grammar", "grammar_path", "json_schema")


def prepare_chat(llm: "LLM", messages: Sequence[Mapping[str, Any]], *, stream: bool = False,
                 response_format: Optional[Mapping[str, Any]] = None, tools: Optional[list] = None,
                 tool_choice: Any = None, allow_special_in_messages: bool = False, allow_files: bool = True,
                 reasoning_format: str = "auto", reasoning_budget: int = -1,
                 chat_template_kwargs: Optional[Mapping[str, Any]] = None, continue_final_message: bool = False,
                 add_generation_prompt: bool = True, **options: Any) -> ChatCall:
    """The one preparation of a chat: tools, streaming, response_format and a reasoning
    model's thinking are handled here for LLM.chat, achat and astream_chat (and the server,
    which calls those).

    With `tools`, pyllama.tools makes the plan (prepared history, the tools to show, the
    grammar of a forced call, the parser) from the LLM's chat formatter; the prompt is rendered
    here.  tool_choice "none" makes a plain chat of the prepared history.
    `continue_final_message` continues a final assistant message as llama.cpp does (the
    formatter's prefill_assistant); add_generation_prompt=False renders no assistant header.
    `chat_template_kwargs` become template variables; `reasoning_format` and
    `reasoning_budget` are explained in pyllama.chat.reasoning (reasoning_budget=0 also tells
    the template ``enable_thinking=False``, unless chat_template_kwargs says otherwise)."""
    from pyllama.chat import reasoning as rs

    llm._check_open()
    variables = rs.check_reasoning_args(reasoning_format, reasoning_budget, chat_template_kwargs)
    if reasoning_budget == 0:
        variables.setdefault("enable_thinking", False)   # as llama-server: budget 0 is no thinking
    for name, flag in (("continue_final_message", continue_final_message),
                       ("add_generation_prompt", add_generation_prompt)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if continue_final_message:     # (it opens no new turn: the assistant's goes on)
        variables["prefill_assistant"] = True            # a rendering option, not a template variable
        add_generation_prompt = False
    variables["add_generation_prompt"] = add_generation_prompt
    if tools:
        plan = tools_mod.plan_chat(llm._chat_formatter(), messages, tools=tools, tool_choice=tool_choice or "auto",
                                   stream=stream, response_format=response_format,
                                   allow_special_in_messages=allow_special_in_messages, allow_files=allow_files,
                                   **options)
        if plan.tools is None:
            return prepare_chat(llm, plan.messages, stream=stream, reasoning_format=reasoning_format,
                                reasoning_budget=reasoning_budget, chat_template_kwargs=chat_template_kwargs,
                                continue_final_message=continue_final_message,
                                add_generation_prompt=add_generation_prompt, **plan.options)
        prompt = llm.chat_prompt(plan.messages, **plan.prompt_args, **variables)
        plan.reasoning = _reasoning(llm, prompt, reasoning_format, reasoning_budget, plan.options)
        return ChatCall(prompt, plan.options, plan.finish, True, plan.reasoning)
    if response_format is not None:
        options.update(response_format_overrides(response_format))
    prompt = llm.chat_prompt(messages, allow_special_in_messages=allow_special_in_messages, allow_files=allow_files,
                             **variables)
    config = _reasoning(llm, prompt, reasoning_format, reasoning_budget, options)
    finish = functools.partial(_finish_reasoning, config) if config.reports else None
    return ChatCall(prompt, options, finish, False, config)


def _reasoning(llm: "LLM", prompt: Any, reasoning_format: str, budget: int, options: dict) -> Any:
    """The chat's ReasoningConfig; with a budget, its logits processor joins `options`."""
    from pyllama.chat import reasoning as rs

    constrained = any((options[k] if k in options else getattr(llm.defaults, k, None)) is not None
                      for k in _GRAMMAR_OPTIONS)
    keys = getattr(prompt, "tokens", prompt)            # a MediaPrompt's keys: media positions are < 0
    tail = [t for t in list(keys[-_PROMPT_TAIL_TOKENS:]) if t >= 0]
    tail_text = llm.vocab.detokenize(tail, remove_special=False, unparse_special=True)
    template = getattr(llm._chat_formatter(), "template", None)
    config = rs.resolve(reasoning_format, template, tail_text, budget=budget, constrained=constrained)
    if budget >= 0 and config.active:
        user = options.get("logits_processors")
        if callable(user) and not hasattr(user, "__iter__"):
            raise TypeError(f"logits_processors must be a list of callables, got a single {type(user).__name__}: "
                            "wrap it in a list")
        # Counted per request (each of n answers has its own copy, see build_group).
        options["logits_processors"] = [*(user or ()), rs.ReasoningBudget(llm.vocab, config, budget)]
    return config


def _finish_reasoning(config: Any, result: Any) -> Any:
    from pyllama.chat.reasoning import apply_to_completion

    if isinstance(result, list):
        return [apply_to_completion(c, config) for c in result]
    return apply_to_completion(result, config)


def finish_chat(prep: Prepared, call: ChatCall) -> Prepared:
    """`prep` (the requests of `call`) finishing as the chat does: the thinking split from the
    answer, tool calls parsed."""
    prep.reasoning = call.reasoning
    if call.finish is not None:
        complete, parse = prep.finish, call.finish
        prep.finish = lambda report=True: parse(complete(report=report))
    return prep
