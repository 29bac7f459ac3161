"""The constructor's vocabulary for ``llama_cpp.llama``'s ``Llama``: llama.cpp's constants as
llama-cpp-python spells them, pyllama's sizing defaults, the keywords passed on to
:class:`pyllama.LLM`, and :data:`DIFFERENCES`, the table of everything that behaves differently
from llama-cpp-python (docs/compat.md shows the same table).

Re-exported by :mod:`pyllama.compat.llama`, their public home.
"""

from __future__ import annotations

from typing import Dict

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

_LLM_PASSTHROUGH = frozenset({
    "n_parallel", "cache_prompt", "chat_template", "mmproj_path", "clip_model_path", "kv_unified",
    "rpc_servers", "f16_kv", "spec_type", "draft_max", "draft_min", "spec_ngram_size_n", "draft_p_min",
    "spec_cost_model",
})

#: Everything that behaves differently from llama-cpp-python 0.3.36 (docs/compat.md lists it).
DIFFERENCES: Dict[str, str] = {
    # constructor
    "n_ctx": "n_ctx is the context of one call, as in llama-cpp-python; the KV memory holds "
             "n_parallel such contexts (n_ctx * n_parallel cells, one KV stream of n_ctx cells per "
             "call: kv_unified=False, as llama-server's -np N) so that threads calling one Llama "
             "batch together. n_parallel (a pyllama keyword) defaults to min(8, 16384 // n_ctx), at least 1; "
             "Llama(..., n_parallel=1) allocates exactly what llama-cpp-python does.",
    "n_threads, n_threads_batch": "unset, both are pyllama's default: the physical cores, capped by CPU affinity and "
                                   "any cgroup CPU quota (llama.cpp's own choice). llama-cpp-python generates on "
                                   "cpu_count() // 2 threads, which is the physical cores on a machine with SMT and "
                                   "half of them on one without (a 2-vCPU VM without SMT: 1 thread there, 2 here; "
                                   "BENCHMARKS.md measures both libraries' defaults).",
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
