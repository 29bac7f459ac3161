"""The GPU test tier: pyllama with its layers, KV cells and compute on a GPU device, checked
against the same build with the device hidden (the CPU reference runs in a subprocess with
GGML_VK_VISIBLE_DEVICES / CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES empty).

Runs on whatever device the installed build finds: Mesa's llvmpipe through the Vulkan backend
(scripts/check_vulkan.sh, on any machine) or a real GPU (scripts/gpu_check.sh).  Greedy text
must equal the CPU's, or differ first at a near tie: each side's pick is the other's runner-up,
within 0.5 nats (the backends round differently: the CPU quantizes activations to 8 bits for
its quantized matrix products, a GPU backend dequantizes the weights instead).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

import pyllama
from pyllama import LLM, Batch, Context, Model, SamplerChain, gpu

PROMPT = "The capital of France is"
PROMPTS = ["Once upon a time", "The three primary colours are", "def fibonacci(n):", "A recipe for pancakes:"]
NEAR_TIE = 0.5        # nats
HIDE_DEVICES = {"GGML_VK_VISIBLE_DEVICES": "", "CUDA_VISIBLE_DEVICES": "", "HIP_VISIBLE_DEVICES": ""}


# ---------------------------------------------------------------------------- helpers

def greedy(llm: LLM, prompt: str, n: int = 24) -> dict:
    c = llm.complete(prompt, max_tokens=n, temperature=0, logprobs=3, ignore_eos=True)
    return {"text": c.text, "tokens": list(c.tokens),
            "top": [[(t.id, t.logprob) for t in lp.top_logprobs] for lp in c.logprobs]}


_CPU_GREEDY = r"""
import json, sys
from pyllama import LLM, gpu
assert not gpu.gpu_status().available, gpu.gpu_status().summary
path, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = LLM(path, n_ctx=1024, n_gpu_layers=0, verbose=False)
out = []
for p in prompts:
    c = llm.complete(p, max_tokens=n, temperature=0, logprobs=3, ignore_eos=True)
    out.append({"text": c.text, "tokens": list(c.tokens),
                "top": [[(t.id, t.logprob) for t in lp.top_logprobs] for lp in c.logprobs]})
print(json.dumps(out))
"""


def run_on_cpu(code: str, *args: str, timeout: float = 600) -> str:
    """Run `code` in a child of this interpreter with every GPU device hidden; its stdout."""
    env = dict(os.environ, **HIDE_DEVICES)
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def cpu_greedy(path: Path, prompts: list, n: int = 24) -> list:
    return json.loads(run_on_cpu(_CPU_GREEDY, str(path), json.dumps(prompts), str(n)).strip().splitlines()[-1])


def assert_same_or_near_tie(a: dict, b: dict, what: str) -> int | None:
    """Equal token lists, or the first difference a near tie seen from both sides.  Returns the
    index of the first difference (None when equal)."""
    for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])):
        if x == y:
            continue
        top_a, top_b = dict(map(tuple, a["top"][i])), dict(map(tuple, b["top"][i]))
        assert y in top_a and x in top_b, f"{what}: token {i} differs ({x} vs {y}) and is no near tie: {top_a} / {top_b}"
        margin_a, margin_b = top_a[x] - top_a[y], top_b[y] - top_b[x]
        assert margin_a < NEAR_TIE and margin_b < NEAR_TIE, \
            f"{what}: token {i} differs ({x} vs {y}) with margins {margin_a:.3f} / {margin_b:.3f} nats"
        return i
    assert len(a["tokens"]) == len(b["tokens"]), what
    return None


def on_device(rows: list, device: dict) -> dict:
    """Sum of a memory breakdown's rows that live on `device` (model, context, compute bytes)."""
    mine = [r for r in rows if r["device"] == device["name"] and not r["host"]]
    return {k: sum(r[k] for r in mine) for k in ("model", "context", "compute")}


def total(rows: list, key: str) -> int:
    return sum(r[key] for r in rows)


# ---------------------------------------------------------------------------- the tier

def test_the_build_reports_its_device(device):
    status = gpu.gpu_status()
    assert status.available
    assert status.summary.startswith(f"{len(status.devices)} GPU device"), status.summary
    assert device["backend"] in status.compiled
    print(f"\n{status.summary}")


def test_all_layers_go_to_the_device_and_it_holds_them(model_path, device):
    llm = LLM(model_path, n_gpu_layers=-1, n_ctx=1024, verbose=False)
    try:
        plan = llm.offload
        assert plan.n_offloaded == plan.n_layers == llm.model.n_layer + 1, plan
        assert plan.devices == [f"{device['backend']}:{device['name']}"], plan
        rows = llm.context.memory_breakdown()
        dev = on_device(rows, device)
        # The weights, the KV cells and the compute buffer are on the device: only the input
        # token embeddings (looked up row by row, llama.cpp keeps them on the host) stay behind,
        # at most n_vocab x n_embd at 16 bits, 32 in an all-F32 file (Gemma 3's 262k-token table
        # is 72% of its file).
        width = 4 if "F32" in str(llm.model.ftype) else 2
        host_weights = total(rows, "model") - dev["model"]
        assert dev["model"] > 0 and host_weights <= width * llm.context.n_vocab * llm.model.n_embd, rows
        assert dev["context"] == total(rows, "context") > 0, rows
        assert dev["compute"] > 0, rows
        assert llm.complete(PROMPT, max_tokens=4, temperature=0).text.strip()
    finally:
        llm.close()


def test_greedy_text_equals_the_cpu_or_departs_at_a_near_tie(model_path):
    cpu = cpu_greedy(model_path, [PROMPT])[0]
    llm = LLM(model_path, n_gpu_layers=-1, n_ctx=1024, verbose=False)
    try:
        dev = greedy(llm, PROMPT)
    finally:
        llm.close()
    first = assert_same_or_near_tie(cpu, dev, f"{model_path.name} GPU vs CPU")
    print(f"\n{model_path.name}: first difference at token {first} of {len(cpu['tokens'])}"
          f"\n  cpu: {cpu['text']!r}\n  gpu: {dev['text']!r}")


def test_partial_offload_splits_the_model(smollm2_path, device):
    with Model(smollm2_path) as m:            # weights memory-mapped, nothing offloaded
        part = max(2, m.n_layer // 3)          # 10 of SmolLM2's 31: the output layer and >= 1 block
    llm = LLM(smollm2_path, n_gpu_layers=part, n_ctx=1024, verbose=False)
    try:
        assert (llm.offload.n_offloaded, llm.offload.on_cpu) == (part, llm.model.n_layer + 1 - part)
        rows = llm.context.memory_breakdown()
        dev = on_device(rows, device)
        assert 0 < dev["model"] < 0.6 * total(rows, "model"), rows
        assert 0 < dev["context"] < total(rows, "context"), rows      # KV of the offloaded layers only
        part = greedy(llm, PROMPT)
    finally:
        llm.close()
    assert_same_or_near_tie(cpu_greedy(smollm2_path, [PROMPT])[0], part, "partial offload vs CPU")


def test_the_batched_engine_on_the_device(smollm2_path):
    """Four prompts in one batch on the device: each as it is alone there (or a near tie)."""
    llm = LLM(smollm2_path, n_gpu_layers=-1, n_ctx=4096, n_parallel=4, kv_unified=False, verbose=False)
    try:
        alone = [greedy(llm, p, 16) for p in PROMPTS]
        together = llm.generate(PROMPTS, max_tokens=16, temperature=0, logprobs=3, ignore_eos=True)
        for p, a, c in zip(PROMPTS, alone, together):
            b = {"tokens": list(c.tokens), "top": [[(t.id, t.logprob) for t in lp.top_logprobs] for lp in c.logprobs]}
            assert_same_or_near_tie(a, b, f"batched vs alone: {p!r}")
        assert llm.metrics()["n_busy_slots_per_decode"] > 1.5     # they really shared decodes
    finally:
        llm.close()


_CPU_EMBED = r"""
import json, sys
from pyllama import LLM
llm = LLM(sys.argv[1], embedding=True, n_ctx=512, n_gpu_layers=0, verbose=False)
print(json.dumps([list(map(float, v)) for v in llm.embed(json.loads(sys.argv[2]))]))
"""


def test_embeddings_match_the_cpu(model_path):
    import numpy as np

    llm = LLM(model_path, embedding=True, n_ctx=512, n_gpu_layers=-1, verbose=False)
    try:
        dev = np.asarray(llm.embed(PROMPTS), dtype=np.float64)
    finally:
        llm.close()
    cpu = np.asarray(json.loads(run_on_cpu(_CPU_EMBED, str(model_path), json.dumps(PROMPTS)).strip().splitlines()[-1]))
    cos = (dev * cpu).sum(1) / (np.linalg.norm(dev, axis=1) * np.linalg.norm(cpu, axis=1))
    assert dev.shape == cpu.shape and (cos > 0.99).all(), cos


def test_kv_cells_live_on_the_device_and_follow_n_ctx(smollm2_path, device):
    sizes = {}
    for n_ctx in (512, 2048):
        llm = LLM(smollm2_path, n_gpu_layers=-1, n_ctx=n_ctx, verbose=False)
        try:
            sizes[n_ctx] = on_device(llm.context.memory_breakdown(), device)["context"]
        finally:
            llm.close()
    assert sizes[512] > 0 and sizes[2048] == 4 * sizes[512], sizes
    # offload_kqv=False keeps them on the host even with every layer offloaded
    model = Model(smollm2_path, n_gpu_layers=-1)
    try:
        ctx = Context(model, n_ctx=512, offload_kqv=False)
        rows = ctx.memory_breakdown()
        ctx.close()
        assert on_device(rows, device)["context"] == 0 and total(rows, "context") == sizes[512], rows
    finally:
        model.close()


def _continue(model: Model, ctx: Context, pos: int, first: int, n: int) -> list:
    """Greedy tokens after a restored state whose next token is `first` at position `pos`."""
    out, tok = [], first
    batch = Batch(1, 1)
    for i in range(n):
        batch.clear()
        batch.add(tok, pos + i, 0, True)
        ctx.decode(batch)
        tok = SamplerChain(model.vocab).add_greedy().sample(ctx)
        out.append(tok)
    return out


@pytest.mark.parametrize("direction", ["gpu->cpu", "cpu->gpu"])
def test_state_saved_on_one_backend_restores_on_the_other(smollm2_path, direction):
    gpu_model = Model(smollm2_path, n_gpu_layers=-1)
    cpu_model = Model(smollm2_path, n_gpu_layers=0)
    try:
        src_model, dst_model = (gpu_model, cpu_model) if direction == "gpu->cpu" else (cpu_model, gpu_model)
        src = Context(src_model, n_ctx=512)
        dst = Context(dst_model, n_ctx=512)
        toks = src_model.vocab.tokenize(PROMPT, add_special=True)
        batch = Batch(64, 1)
        batch.add_sequence(toks, 0, 0)
        src.decode(batch)
        first = SamplerChain(src_model.vocab).add_greedy().sample(src)
        state = src.state_get()
        here = _continue(src_model, src, len(toks), first, 12)
        dst.state_set(state)
        there = _continue(dst_model, dst, len(toks), first, 12)
        # the restored KV cells carry the prompt: the continuation is the source's own, up to
        # backend rounding (compare the texts' first tokens; a near tie may then diverge)
        assert there[:3] == here[:3], (direction, here, there)
        assert dst.kv_seq_pos_max(0) == len(toks) + 11
        src.close()
        dst.close()
    finally:
        gpu_model.close()
        cpu_model.close()


def test_main_gpu_and_tensor_split_name_existing_devices(smollm2_path):
    n = len(gpu.gpu_status().devices)
    with pytest.raises(ValueError, match=f"main_gpu={n} names no device"):
        LLM(smollm2_path, n_gpu_layers=-1, main_gpu=n)
    with pytest.raises(ValueError, match=f"tensor_split gives a share to device {n}"):
        LLM(smollm2_path, n_gpu_layers=-1, tensor_split=[1.0] * n + [1.0])
    with pytest.raises(ValueError, match="names no device"):
        LLM(smollm2_path, n_gpu_layers=-1, main_gpu=n + 5, split_mode="none")


_TOO_BIG = r"""
import os, resource, sys
if sys.argv[3] == "software":
    # llvmpipe's "device memory" is host memory and its reported size is advisory (a KV cache
    # twice that size allocates): cap this process's address space at the machine's RAM, so
    # that the allocation fails there, as it does on a GPU, instead of being overcommitted.
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    resource.setrlimit(resource.RLIMIT_AS, (ram, ram))
from pyllama import LLM
try:
    llm = LLM(sys.argv[1], n_gpu_layers=-1, n_ctx=int(sys.argv[2]), verbose=False)
except Exception as e:
    print("RAISED", type(e).__name__, str(e)[:400])
else:
    print("LOADED", llm.context.memory_breakdown())
"""


def test_an_allocation_larger_than_the_device_is_a_clear_error(smollm2_path, device):
    """A KV cache twice the memory behind the device: a Python exception naming the failed
    allocation, no abort."""
    llm = LLM(smollm2_path, n_gpu_layers=-1, n_ctx=1024, verbose=False)
    try:
        per_token = on_device(llm.context.memory_breakdown(), device)["context"] / 1024
    finally:
        llm.close()
    software = "llvmpipe" in (device.get("description") or "")
    memory = device["memory_total"]
    if software:
        memory = max(memory, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    n_ctx = int(2 * memory / per_token) // 256 * 256
    proc = subprocess.run([sys.executable, "-c", _TOO_BIG, str(smollm2_path), str(n_ctx),
                           "software" if software else "gpu"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"the process died ({proc.returncode}):\n{proc.stderr[-3000:]}"
    assert proc.stdout.startswith("RAISED OutOfMemoryError") and "allocate" in proc.stdout, proc.stdout
    print(f"\nn_ctx={n_ctx}: {proc.stdout.strip()}")


def test_the_server_with_four_clients(smollm2_path):
    from server_process import ServerProcess

    server = ServerProcess("-m", str(smollm2_path), "-ngl", "99", "-np", "4", "-c", "4096", "-t", "2")
    try:
        url = server.wait_ready()
        results: list = []

        def client(i: int) -> None:
            r = httpx.post(url + "/v1/chat/completions", timeout=300, json={
                "messages": [{"role": "user", "content": PROMPTS[i]}], "max_tokens": 16, "temperature": 0})
            results.append((r.status_code, r.json()))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(320)
        assert len(results) == 4 and all(code == 200 for code, _ in results), results
        assert all(body["choices"][0]["message"]["content"] for _, body in results), results
        slots = httpx.get(url + "/slots", timeout=30).json()
        assert len(slots) == 4 and not any(s["is_processing"] for s in slots), slots
        assert httpx.get(url + "/health", timeout=30).status_code == 200
    finally:
        assert server.stop() == 0


def test_info_names_the_device():
    out = subprocess.run([sys.executable, "-m", "pyllama", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("gpu:"))
    assert "GPU device" in line, line
    assert pyllama.build_info()["options"]
