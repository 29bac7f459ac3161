"""GPU status and offload checks (pyllama.gpu): never silently on the CPU.

The GPU builds themselves run from scripts (scripts/check_gpu_build.sh, docs/building.md);
here the reporting and the warning / require_gpu paths, on fake backend lists and on this
(CPU) build.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

from pyllama import gpu
from pyllama.errors import GPUUnavailableError

CPU = {"name": "CPU", "devices": [{"name": "CPU", "description": "Xeon", "type": "cpu",
                                   "memory_free": 2**34, "memory_total": 2**34}], "library": None}
H100 = {"name": "CUDA", "devices": [{"name": "CUDA0", "description": "NVIDIA H100 80GB HBM3", "type": "gpu",
                                     "memory_free": 80 * 2**30, "memory_total": 80 * 2**30}], "library": None}
CUDA_NO_DEVICE = {"name": "CUDA", "devices": [], "library": None}
IGPU = {"name": "Vulkan", "devices": [{"name": "Vulkan0", "description": "llvmpipe", "type": "igpu",
                                       "memory_free": 2**30, "memory_total": 2**30}], "library": None}
OFF = {"GGML_CUDA": "OFF", "GGML_VULKAN": "OFF"}
CUDA_ON = {"GGML_CUDA": "ON", "GGML_VULKAN": "OFF"}


def test_status_says_what_is_compiled_and_found():
    assert gpu.gpu_status([CPU], OFF).summary == "no GPU backend compiled in (CPU only)"
    s = gpu.gpu_status([CPU, CUDA_NO_DEVICE], CUDA_ON)
    assert (s.compiled, s.devices, s.available) == (["CUDA"], [], False)
    assert s.summary == "CUDA compiled in, no CUDA device found"
    s = gpu.gpu_status([CPU, H100], CUDA_ON)
    assert s.available and s.devices[0]["backend"] == "CUDA"
    assert s.summary.startswith("1 GPU device: CUDA CUDA0 (NVIDIA H100 80GB HBM3, 80.0 of 80.0 GiB free)")
    # A portable build's backend loaded from a library counts as compiled in.
    assert gpu.gpu_status([CPU, CUDA_NO_DEVICE], OFF).compiled == ["CUDA"]
    # An integrated GPU takes layers only when no discrete one is there (llama.cpp's rule).
    assert [d["name"] for d in gpu.gpu_status([CPU, IGPU], OFF).devices] == ["Vulkan0"]
    assert [d["name"] for d in gpu.gpu_status([CPU, IGPU, H100], CUDA_ON).devices] == ["CUDA0"]


@pytest.mark.parametrize("n_gpu_layers, n_layer, offloaded", [(-1, 30, 31), (10, 30, 10), (99, 30, 31), (0, 30, 0)])
def test_plan_follows_llama_cpp_placement(n_gpu_layers, n_layer, offloaded):
    with_gpu = gpu.gpu_status([CPU, H100], CUDA_ON)
    plan = gpu.plan_offload(n_gpu_layers, n_layer, with_gpu)
    assert (plan.n_layers, plan.n_offloaded, plan.on_cpu) == (n_layer + 1, offloaded, n_layer + 1 - offloaded)
    assert plan.devices == (["CUDA:CUDA0"] if offloaded else [])
    none = gpu.plan_offload(n_gpu_layers, n_layer, gpu.gpu_status([CPU], OFF))
    assert (none.n_offloaded, str(none)) == (0, f"offloaded 0/{n_layer + 1} layers to no GPU")


def test_offload_request_without_a_gpu_warns_once_naming_the_fix(monkeypatch):
    monkeypatch.setattr(gpu, "_warned", set())
    cpu_only = gpu.gpu_status([CPU], OFF)
    with pytest.warns(RuntimeWarning, match=r"n_gpu_layers=-1 .* no GPU backend compiled in .*GGML_CUDA=on"):
        gpu.check_offload(-1, status=cpu_only)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "runs on the CPU" in gpu.check_offload(-1, status=cpu_only)   # said once already
        assert gpu.check_offload(0, status=cpu_only) is None                   # nothing asked
        assert gpu.check_offload(-1, status=gpu.gpu_status([CPU, H100], CUDA_ON)) is None
    with pytest.warns(RuntimeWarning, match="CUDA compiled in, no CUDA device found: check the driver"):
        gpu.check_offload(5, status=gpu.gpu_status([CPU, CUDA_NO_DEVICE], CUDA_ON))


def test_require_gpu_raises_instead():
    with pytest.raises(GPUUnavailableError, match="no GPU backend compiled in"):
        gpu.check_offload(-1, require_gpu=True, status=gpu.gpu_status([CPU], OFF))
    with pytest.raises(GPUUnavailableError, match="CUDA compiled in, no CUDA device found"):
        gpu.check_offload(3, require_gpu=True, status=gpu.gpu_status([CPU, CUDA_NO_DEVICE], CUDA_ON))
    with pytest.raises(ValueError, match="n_gpu_layers=0"):
        gpu.check_offload(0, require_gpu=True, status=gpu.gpu_status([CPU, H100], CUDA_ON))
    assert gpu.check_offload(-1, require_gpu=True, status=gpu.gpu_status([CPU, H100], CUDA_ON)) is None


def test_this_build_reports_itself():
    """This CPU build: the real backends() and build_info() give a plain answer."""
    import pyllama

    s = gpu.gpu_status()
    if pyllama.build_info()["options"].get("GGML_CUDA") == "OFF" and not s.compiled:
        assert s.summary == "no GPU backend compiled in (CPU only)" and not s.available
    else:
        assert s.compiled and s.summary


def test_require_gpu_on_this_build_is_one_clear_error(tmp_path):
    """In a subprocess (a fresh warning registry): what a user sees."""
    code = ("import warnings, pyllama.gpu as g\n"
            "warnings.simplefilter('always')\n"
            "st = g.gpu_status()\n"
            "if st.available: print('HAS-GPU'); raise SystemExit\n"
            "try:\n"
            "    g.check_offload(-1, require_gpu=True)\n"
            "except g.GPUUnavailableError as e:\n"
            "    print('RAISED', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if "HAS-GPU" not in out.stdout:
        assert out.stdout.startswith("RAISED n_gpu_layers=-1 asks for GPU offload, but "), out.stdout


def test_llm_on_this_cpu_build_warns_or_raises_and_reports_the_offload(tiny_model_path, monkeypatch):
    """LLM(n_gpu_layers=-1) here (no GPU device): one RuntimeWarning, the model runs on the
    CPU and LLM.offload says so; require_gpu=True raises before anything loads."""
    import pyllama

    if gpu.gpu_status().available:
        pytest.fail("this test expects a machine without a GPU device")
    monkeypatch.setattr(gpu, "_warned", set())
    with pytest.warns(RuntimeWarning, match="runs on the CPU"):
        llm = pyllama.LLM(tiny_model_path, n_gpu_layers=-1, n_ctx=256, n_threads=1)
    with llm:
        assert llm.offload.n_offloaded == 0 and llm.offload.on_cpu == llm.model.n_layer + 1
        assert str(llm.offload) == f"offloaded 0/{llm.model.n_layer + 1} layers to no GPU"
        assert llm.complete("Hello", max_tokens=3, temperature=0).tokens
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pyllama.LLM(tiny_model_path, n_ctx=256, n_threads=1) as quiet:    # n_gpu_layers=0: no warning
            assert quiet.offload.n_offloaded == 0
    with pytest.raises(GPUUnavailableError, match="n_gpu_layers=-1 asks for GPU offload"):
        pyllama.LLM(tiny_model_path, n_gpu_layers=-1, require_gpu=True)
    with pytest.raises(TypeError, match="require_gpu"):
        pyllama.LLM(tiny_model_path, require_gpu="yes")


def test_require_gpu_flag_of_the_command(tiny_model_path):
    out = subprocess.run([sys.executable, "-m", "pyllama", "run", "-m", str(tiny_model_path), "hi", "-n", "2",
                          "-ngl", "99", "--require-gpu"], capture_output=True, text=True, timeout=120)
    if gpu.gpu_status().available:
        pytest.fail("this test expects a machine without a GPU device")
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert "n_gpu_layers=99 asks for GPU offload" in out.stderr and out.stdout == ""


def test_main_gpu_and_tensor_split_must_name_existing_devices():
    one = gpu.gpu_status([CPU, H100], CUDA_ON)
    gpu.check_devices(-1, main_gpu=0, tensor_split=[1.0], status=one)
    gpu.check_devices(-1, main_gpu=0, tensor_split=[1.0, 0.0, 0.0], status=one)   # zero shares: fine
    with pytest.raises(ValueError, match=r"main_gpu=1 names no device: this machine has 1 GPU device \(0: CUDA CUDA0\)"):
        gpu.check_devices(-1, main_gpu=1, status=one)
    with pytest.raises(ValueError, match="tensor_split gives a share to device 2, which does not exist"):
        gpu.check_devices(5, tensor_split=[0.5, 0.0, 0.5], status=one)
    # no offload asked, or no device at all (check_offload has already spoken): nothing to check
    gpu.check_devices(0, main_gpu=7, status=one)
    gpu.check_devices(-1, main_gpu=7, status=gpu.gpu_status([CPU], OFF))


def test_llm_checks_main_gpu_before_loading(monkeypatch, tiny_model_path):
    from pyllama import LLM

    one_gpu = gpu.gpu_status([CPU, H100], CUDA_ON)
    monkeypatch.setattr(gpu, "gpu_status", lambda *a, **k: one_gpu)
    with pytest.raises(ValueError, match="main_gpu=3 names no device"):
        LLM(tiny_model_path, n_gpu_layers=-1, main_gpu=3)


def test_memory_breakdown_shows_weights_and_kv(tiny_model_path):
    """Context.memory_breakdown(): where the weights, the KV cells and the compute buffers
    live (on this CPU build: host buffers); the KV bytes follow n_ctx."""
    from pyllama import Context, Model

    model = Model(tiny_model_path)
    try:
        sizes = {}
        for n_ctx in (512, 1024):
            ctx = Context(model, n_ctx=n_ctx, n_batch=64)
            rows = ctx.memory_breakdown()
            ctx.close()
            assert rows and all(r["host"] for r in rows), rows
            assert sum(r["model"] for r in rows) > 0
            sizes[n_ctx] = sum(r["context"] for r in rows)
        assert sizes[512] > 0 and sizes[1024] == 2 * sizes[512], sizes
    finally:
        model.close()


def test_device_flags_of_the_commands_reach_the_llm(tiny_model_path):
    """-mg / -ts / -sm (llama-server's names) become LLM(main_gpu=, tensor_split=, split_mode=)
    for `pyllama run` and `pyllama serve`; bad values are usage errors."""
    from pyllama.cli import _args, build_parser, serve_llm_kwargs

    parser = build_parser()
    flags = ["-m", str(tiny_model_path), "-ngl", "99", "-mg", "1", "-ts", "3,1", "-sm", "row"]
    kw = _args.load_kwargs(parser.parse_args(["run", *flags, "hi"]))
    assert (kw["main_gpu"], kw["tensor_split"], kw["split_mode"]) == (1, [3.0, 1.0], "row")
    kw = serve_llm_kwargs(parser.parse_args(["serve", *flags, "-c", "512"]), str(tiny_model_path))
    assert (kw["main_gpu"], kw["tensor_split"], kw["split_mode"]) == (1, [3.0, 1.0], "row")
    assert _args.load_kwargs(parser.parse_args(["run", "-m", "x", "-ts", "1/2", "hi"]))["tensor_split"] == [1.0, 2.0]
    for bad in (["-ts", "1,x"], ["-ts", "1,-1"], ["-ts", "nan"], ["-mg", "-1"], ["-sm", "diagonal"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["run", "-m", "x", *bad, "hi"])
