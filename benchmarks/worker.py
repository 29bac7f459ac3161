#!/usr/bin/env python3
"""One benchmark measurement, in a fresh process (run by benchmarks/run.py).

    python worker.py '<json spec>'

The spec names the implementation ("pyllama" or "lcp" = llama-cpp-python), the task and
its parameters.  The worker prints exactly one line ``@@RESULT {json}`` on stdout; run.py
reads it and adds the process's peak RSS (from wait4) and wall time.  This file must run
under both interpreters (the project's Python with pyllama, and the llama-cpp-python venv),
so it imports each library only inside the functions that use it and needs nothing else.

Timings are taken here, around the public call being measured (perf_counter), never from a
library's own counters, except where a row says so (sampling ms per token).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from typing import Callable

now = time.perf_counter


# --------------------------------------------------------------------------- helpers


def _tokens_for(n_vocab: int, bos: int | None, n: int, seed: int, first: bool) -> list[int]:
    """Random token ids, as llama-bench uses (BOS first when the model adds one)."""
    rng = random.Random(seed)
    toks = [rng.randrange(n_vocab) for _ in range(n)]
    if first and toks and bos is not None:
        toks[0] = bos
    return toks


def _chunks(tokens: list[int], size: int):
    for i in range(0, len(tokens), size):
        yield i, tokens[i : i + size]


# --------------------------------------------------------------------------- pyllama


def _gpu_kw(spec: dict) -> dict:
    """n_gpu_layers for pyllama's Model()/LLM(), only when the run asks for offload (--ngl), so a
    CPU run passes exactly what it always did."""
    ngl = int(spec.get("ngl") or 0)
    return {"n_gpu_layers": ngl} if ngl else {}


def _pyllama_llm(spec: dict, **extra):
    from pyllama import LLM

    kwargs = dict(
        model_path=spec["model"],
        n_ctx=spec["n_ctx"],
        n_threads=spec["threads"],
        n_batch=spec.get("n_batch", 512),
        seed=0,
        verbose=False,
    )
    if spec.get("n_threads_batch_kw", True):
        kwargs["n_threads_batch"] = spec["threads"]
    kwargs.update(_gpu_kw(spec))
    kwargs.update(spec.get("llm_kwargs", {}))
    kwargs.update(extra)
    try:
        return LLM(**kwargs)
    except TypeError as exc:  # an older/newer LLM without n_threads_batch
        if "n_threads_batch" in str(exc) and "n_threads_batch" in kwargs:
            kwargs.pop("n_threads_batch")
            return LLM(**kwargs)
        raise


def _timings_dict(t) -> dict | None:
    if t is None or isinstance(t, dict):
        return t
    if hasattr(t, "as_dict"):
        return t.as_dict()
    return {k: getattr(t, k) for k in dir(t) if not k.startswith("_") and isinstance(getattr(t, k), (int, float))}


def _mean_rate(spec: dict, n: int, clear: Callable[[], None], timed: Callable[[], None]) -> dict:
    """llama-bench -r: `inner_reps` timed runs from an empty KV cache, the mean of their t/s."""
    rates = []
    for _ in range(max(1, spec.get("inner_reps", 1))):
        clear()
        t0 = now()
        timed()
        rates.append(n / (now() - t0))
    return {"tokens": n, "tps": sum(rates) / len(rates)}


def pyllama_pptg(spec: dict) -> dict:
    """llama-bench's pp/tg loop through pyllama._core (Context.decode of Batches)."""
    from pyllama import _core as C

    n_prompt, n_gen = spec["n_prompt"], spec["n_gen"]
    n_batch, n_ubatch, threads = spec["n_batch"], spec["n_ubatch"], spec["threads"]
    if spec.get("rpc"):   # every layer on the remote device(s), as llama-bench --rpc -ngl 99
        for endpoint in spec["rpc"]:
            C.rpc_add_server(endpoint)
        model = C.Model(spec["model"], n_gpu_layers=-1)
    else:
        model = C.Model(spec["model"], **_gpu_kw(spec))
    ctx = C.Context(
        model,
        n_ctx=n_prompt + n_gen,
        n_batch=n_batch,
        n_ubatch=n_ubatch,
        n_threads=threads,
        n_threads_batch=threads,
    )
    vocab = model.vocab
    n_vocab = vocab.n_tokens
    bos = vocab.bos if (vocab.add_bos and vocab.bos >= 0) else None
    batch = C.Batch(max(n_batch, 1), 1)
    # Token ids are drawn before the clock starts (llama-bench draws them inside; a few us).
    warm_prompt = _tokens_for(n_vocab, bos, n_prompt, 1, True)
    prompt = _tokens_for(n_vocab, bos, n_prompt, 2, True)
    gen = _tokens_for(n_vocab, bos, max(n_gen, 1), 3, True)

    def run_prompt(tokens: list[int]) -> None:
        for pos0, chunk in _chunks(tokens, n_batch):
            batch.clear()
            batch.add_sequence(chunk, pos0, 0, True)
            ctx.decode(batch)

    def run_gen(tokens: list[int], n: int) -> None:
        pos = ctx.kv_seq_pos_max(0) + 1
        for i in range(n):
            batch.clear()
            batch.add(tokens[i], pos, 0, True)
            ctx.decode(batch)
            pos += 1

    # warmup exactly as llama-bench: the full prompt, then one generated token
    if n_prompt:
        run_prompt(warm_prompt)
    if n_gen:
        run_gen(gen, 1)
    def timed() -> None:
        if n_prompt:
            run_prompt(prompt)
        if n_gen:
            run_gen(gen, n_gen)

    return _mean_rate(spec, n_prompt + n_gen, lambda: ctx.kv_clear(False), timed)


def pyllama_complete(spec: dict) -> dict:
    """LLM(...) then one complete()/stream() call, timed from outside the library."""
    t0 = now()
    llm = _pyllama_llm(spec)
    t_load = now() - t0
    params = dict(max_tokens=spec["max_tokens"], temperature=0)
    if spec.get("ignore_eos"):
        params["ignore_eos"] = True
    if spec.get("grammar"):
        params["grammar"] = spec["grammar"]
    out: dict = {"load_s": t_load}
    if spec.get("warmup"):
        llm.complete(spec.get("warmup_prompt", "Hi"), max_tokens=1, temperature=0)
    prompt = spec["prompt"]
    if spec.get("stream"):
        pieces = 0
        ttft = None
        text = []
        t1 = now()
        it = llm.stream(prompt, **params)
        for piece in it:
            if ttft is None:
                ttft = now() - t1
            pieces += 1
            text.append(piece)
        out["call_s"] = now() - t1
        out["ttft_s"] = ttft
        out["pieces"] = pieces
        out["text"] = "".join(text)
        res = getattr(it, "completion", None)  # the final Completion, once exhausted
    else:
        t1 = now()
        res = llm.complete(prompt, **params)
        out["call_s"] = now() - t1
        out["text"] = res.text
    if res is not None:
        toks = getattr(res, "tokens", None)
        if toks is not None:
            out["n_tokens"] = len(toks)
        timings = _timings_dict(getattr(res, "timings", None))
        if timings:
            out["timings"] = timings
    out["text"] = out["text"][:200]
    llm.close()
    return out


def pyllama_batched(spec: dict) -> dict:
    """LLM.generate(prompts) (batched) or the same prompts one after another with complete()."""
    prompts = spec["prompts"]
    # A context with all the slots from the start (as llama-batched-bench creates it), so the
    # timed call does not include re-creating the context.
    n_par = (spec.get("n_parallel") or 1) if spec["mode"] == "batched" else 1
    llm = _pyllama_llm(spec, n_parallel=n_par)
    params = dict(max_tokens=spec["max_tokens"], temperature=0)
    if spec.get("ignore_eos", True):
        params["ignore_eos"] = True
    # Warm up with an unrelated short prompt (as llama-batched-bench decodes 16 tokens first).
    llm.complete("Hello", max_tokens=1, temperature=0)
    n_tokens = 0
    t0 = now()
    if spec["mode"] == "batched":
        kw = dict(params)
        if spec.get("n_parallel"):
            kw["n_parallel"] = spec["n_parallel"]
        results = llm.generate(prompts, **kw)
    else:
        results = [llm.complete(p, **params) for p in prompts]
    dt = now() - t0
    for r in results:
        toks = getattr(r, "tokens", None)
        n_tokens += len(toks) if toks is not None else spec["max_tokens"]
    llm.close()
    return {"call_s": dt, "n_tokens": n_tokens, "tps": n_tokens / dt, "n_seqs": len(prompts)}


def pyllama_model_load(spec: dict) -> dict:
    """Model load alone: pyllama._core.Model(path)."""
    from pyllama import _core as C

    kw = _gpu_kw(spec)
    t0 = now()
    m = C.Model(spec["model"], **kw)
    dt = now() - t0
    m.close()
    return {"load_s": dt}


# --------------------------------------------------------------------------- llama-cpp-python


def _lcp_llama(spec: dict, n_ctx: int, **extra):
    import llama_cpp

    kwargs = dict(
        model_path=spec["model"],
        n_ctx=n_ctx,
        n_batch=spec.get("n_batch", 512),
        n_ubatch=spec.get("n_ubatch", 512),
        n_threads=spec["threads"],
        n_threads_batch=spec["threads"],
        # llama.cpp's default is "auto" (on for the CPU backend); llama-cpp-python can only
        # say on/off, so say on, like native and pyllama end up.
        flash_attn=spec.get("lcp_flash_attn", True),
        # llama.cpp's library default is a full-size SWA cache; llama-bench, llama-completion
        # (common) and pyllama all use swa_full=False.  Same here, so only the binding differs.
        swa_full=False,
        # --ngl (Llama's default is 0, as before); a CPU-only llama-cpp-python ignores it
        n_gpu_layers=int(spec.get("ngl") or 0),
        seed=0,
        verbose=False,
    )
    kwargs.update(extra)
    return llama_cpp.Llama(**kwargs)


def lcp_pptg(spec: dict) -> dict:
    """llama-bench's pp/tg loop through llama-cpp-python's Llama.eval."""
    import llama_cpp

    n_prompt, n_gen = spec["n_prompt"], spec["n_gen"]
    llm = _lcp_llama(spec, n_prompt + n_gen)
    n_vocab = llm.n_vocab()
    vocab = llm._model.vocab
    bos = llm.token_bos() if llama_cpp.llama_vocab_get_add_bos(vocab) else None
    warm_prompt = _tokens_for(n_vocab, bos, n_prompt, 1, True)
    prompt = _tokens_for(n_vocab, bos, n_prompt, 2, True)
    gen = _tokens_for(n_vocab, bos, max(n_gen, 1), 3, True)

    def clear() -> None:
        llm.reset()
        llm._ctx.kv_cache_clear()

    if n_prompt:
        llm.eval(warm_prompt)
    if n_gen:
        llm.eval(gen[:1])
    def timed() -> None:
        if n_prompt:
            llm.eval(prompt)
        for i in range(n_gen):
            llm.eval([gen[i]])

    return _mean_rate(spec, n_prompt + n_gen, clear, timed)


def _lcp_eog_bias(llm) -> dict[int, float]:
    import llama_cpp

    vocab = llm._model.vocab
    return {
        t: float("-inf") for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)
    }


def lcp_complete(spec: dict) -> dict:
    """Llama(...) then one __call__ (stream or not), timed from outside the library."""
    t0 = now()
    llm = _lcp_llama(spec, spec["n_ctx"])
    t_load = now() - t0
    params: dict = dict(max_tokens=spec["max_tokens"], temperature=0)
    if spec.get("ignore_eos"):
        how = spec.get("lcp_ignore_eos", "logit_bias")
        if how == "logit_bias":
            params["logit_bias"] = _lcp_eog_bias(llm)
        else:  # "patch": never see an end-of-generation token (no per-token overhead)
            import llama_cpp
            import llama_cpp.llama as lcp_llama_mod

            lcp_llama_mod.llama_cpp.llama_vocab_is_eog = lambda vocab, tok: False  # type: ignore
            llama_cpp.llama_vocab_is_eog = lambda vocab, tok: False  # type: ignore
    if spec.get("grammar"):
        from llama_cpp import LlamaGrammar

        params["grammar"] = LlamaGrammar.from_string(spec["grammar"], verbose=False)
    out: dict = {"load_s": t_load}
    prompt = spec["prompt"]
    if spec.get("stream"):
        pieces = 0
        ttft = None
        text = []
        t1 = now()
        for chunk in llm(prompt, stream=True, **params):
            if ttft is None:
                ttft = now() - t1
            pieces += 1
            text.append(chunk["choices"][0]["text"])
        out["call_s"] = now() - t1
        out["ttft_s"] = ttft
        out["pieces"] = pieces
        out["text"] = "".join(text)[:200]
    else:
        t1 = now()
        res = llm(prompt, **params)
        out["call_s"] = now() - t1
        out["text"] = res["choices"][0]["text"][:200]
        out["n_tokens"] = res["usage"]["completion_tokens"]
    llm.close()
    return out


def lcp_model_load(spec: dict) -> dict:
    """Model load alone, through llama-cpp-python's low-level llama_model_load_from_file."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    ngl = int(spec.get("ngl") or 0)
    if ngl:   # else llama.cpp's default parameters, as before (and as native load_time uses)
        params.n_gpu_layers = ngl
    t0 = now()
    m = llama_cpp.llama_model_load_from_file(spec["model"].encode(), params)
    dt = now() - t0
    if not m:
        raise RuntimeError("llama_model_load_from_file failed")
    llama_cpp.llama_model_free(m)
    return {"load_s": dt}


# --------------------------------------------------------------------------- main

TASKS = {
    ("pyllama", "pptg"): pyllama_pptg,
    ("pyllama", "complete"): pyllama_complete,
    ("pyllama", "batched"): pyllama_batched,
    ("pyllama", "model_load"): pyllama_model_load,
    ("lcp", "pptg"): lcp_pptg,
    ("lcp", "complete"): lcp_complete,
    ("lcp", "model_load"): lcp_model_load,
}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    fn = TASKS[(spec["impl"], spec["task"])]
    if spec["impl"] == "pyllama":
        os.environ.setdefault("PYLLAMA_OFFLINE", "1")
    result = fn(spec)
    sys.stdout.flush()
    print("@@RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
