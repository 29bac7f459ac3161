"""Which GPU backends this build has, which devices they found, and where a model's layers go.

llama.cpp's most common surprise is a build that silently runs on the CPU: a CUDA wheel on a
machine without the driver, or a CPU build given ``n_gpu_layers=-1``.  This module says
plainly what is there (:func:`gpu_status`: "CUDA compiled in, no CUDA device found"), what
an ``n_gpu_layers`` request will get (:func:`plan_offload`, llama.cpp's own placement rule),
and warns once -- or, with ``require_gpu=True``, raises -- when a request for offload would
run on the CPU (:func:`check_offload`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from pyllama.errors import GPUUnavailableError

__all__ = ["GPUStatus", "OffloadPlan", "gpu_status", "plan_offload", "check_offload", "check_devices"]

#: CMake option -> the name ggml registers that backend under.
GPU_OPTIONS = {"GGML_CUDA": "CUDA", "GGML_HIP": "ROCm", "GGML_VULKAN": "Vulkan", "GGML_METAL": "Metal",
               "GGML_SYCL": "SYCL", "GGML_OPENCL": "OpenCL", "GGML_MUSA": "MUSA", "GGML_CANN": "CANN"}
_GPU_BACKENDS = set(GPU_OPTIONS.values())

_REBUILD = ('rebuild with a GPU backend, e.g. CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall '
            '--no-cache-dir . (docs/building.md lists CUDA, Vulkan, Metal, HIP)')


@dataclass(frozen=True)
class GPUStatus:
    """``compiled``: GPU backends in this build ("CUDA", "Vulkan" ...); ``devices``: the
    devices layers can go to (as :func:`pyllama.backends` reports them, with ``backend``
    added); ``summary``: one line saying both."""

    compiled: List[str]
    devices: List[Dict[str, Any]]
    summary: str

    @property
    def available(self) -> bool:
        """True when at least one device can take layers."""
        return bool(self.devices)


@dataclass(frozen=True)
class OffloadPlan:
    """Where llama.cpp puts a model's layers for an ``n_gpu_layers`` request: the last
    ``n_offloaded`` of its ``n_layer + 1`` layers (the output layer counts as one) go to
    ``devices``, the rest stay on the CPU."""

    n_layers: int
    n_offloaded: int
    devices: List[str] = field(default_factory=list)

    @property
    def on_cpu(self) -> int:
        return self.n_layers - self.n_offloaded

    def __str__(self) -> str:
        where = ", ".join(self.devices) if self.devices else "no GPU"
        return f"offloaded {self.n_offloaded}/{self.n_layers} layers to {where}"


def gpu_status(backends: Optional[List[dict]] = None, options: Optional[Dict[str, str]] = None) -> GPUStatus:
    """This build's GPU backends and the devices they found.  ``backends`` and ``options``
    default to :func:`pyllama.backends` and ``build_info()["options"]`` (tests pass their own)."""
    if backends is None or options is None:
        import pyllama

        backends = pyllama.backends() if backends is None else backends
        options = pyllama.build_info()["options"] if options is None else options
    compiled = [name for opt, name in GPU_OPTIONS.items() if str(options.get(opt, "OFF")).upper() in ("ON", "1", "TRUE")]
    # Portable builds load backends from shared libraries: count what was loaded too.
    for b in backends:
        if b["name"] in _GPU_BACKENDS and b["name"] not in compiled:
            compiled.append(b["name"])
    gpus = [dict(d, backend=b["name"]) for b in backends for d in b["devices"] if d.get("type") == "gpu"]
    # llama.cpp offloads to an integrated GPU only when there is no discrete one.
    devices = gpus or [dict(d, backend=b["name"]) for b in backends for d in b["devices"] if d.get("type") == "igpu"]
    if devices:
        names = "; ".join(f"{d['backend']} {d['name']} ({d.get('description') or '?'}, "
                          f"{d.get('memory_free', 0) / 2**30:.1f} of {d.get('memory_total', 0) / 2**30:.1f} GiB free)"
                          for d in devices)
        summary = f"{len(devices)} GPU device{'s' if len(devices) > 1 else ''}: {names}"
    elif compiled:
        which = ", ".join(compiled)
        summary = f"{which} compiled in, no {which if len(compiled) == 1 else 'GPU'} device found"
    else:
        summary = "no GPU backend compiled in (CPU only)"
    return GPUStatus(compiled=compiled, devices=devices, summary=summary)


def plan_offload(n_gpu_layers: int, n_layer: int, status: Optional[GPUStatus] = None) -> OffloadPlan:
    """llama.cpp's placement (llama-model.cpp, load_tensors): ``min(n_gpu_layers, n_layer + 1)``
    layers, counted from the output end, go to the GPU devices (-1: all of them); none when
    there is no device."""
    status = gpu_status() if status is None else status
    total = n_layer + 1
    wanted = total if n_gpu_layers < 0 else min(n_gpu_layers, total)
    if not status.devices:
        return OffloadPlan(n_layers=total, n_offloaded=0)
    return OffloadPlan(n_layers=total, n_offloaded=wanted,
                       devices=[f"{d['backend']}:{d['name']}" for d in status.devices] if wanted else [])


_warned: set = set()


def check_offload(n_gpu_layers: int, require_gpu: bool = False, status: Optional[GPUStatus] = None) -> Optional[str]:
    """Before a model loads: when ``n_gpu_layers`` asks for offload (-1 or > 0) and no device
    can take layers, warn once per message (the model then runs on the CPU) or, with
    ``require_gpu``, raise GPUUnavailableError.  ``require_gpu`` with ``n_gpu_layers=0`` is
    a contradiction and raises ValueError.  Returns the warning text, or None."""
    if require_gpu and n_gpu_layers == 0:
        raise ValueError("require_gpu=True with n_gpu_layers=0: nothing would go to the GPU "
                         "(use n_gpu_layers=-1 for all layers)")
    if n_gpu_layers == 0:
        return None
    status = gpu_status() if status is None else status
    if status.available:
        return None
    if status.compiled:
        hint = ("check the driver and that the device is visible (nvidia-smi, vulkaninfo; "
                "CUDA_VISIBLE_DEVICES / GGML_VK_VISIBLE_DEVICES)")
    else:
        hint = _REBUILD
    message = f"n_gpu_layers={n_gpu_layers} asks for GPU offload, but {status.summary}: {hint}"
    if require_gpu:
        raise GPUUnavailableError(message)
    message += "; the model runs on the CPU"
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=_caller_stacklevel())
    return message


def check_devices(n_gpu_layers: int, main_gpu: int = 0, tensor_split: Optional[List[float]] = None,
                  status: Optional[GPUStatus] = None) -> None:
    """Before a model loads with offload: ``main_gpu`` and ``tensor_split`` must name devices
    that exist (counted from 0 over the devices layers can go to).  llama.cpp logs and fails
    the load for a bad ``main_gpu`` with ``split_mode="none"``, and silently ignores it and
    any ``tensor_split`` share for a missing device otherwise; both are a caller's mistake
    (a config written for another machine), so both raise ValueError naming the devices.
    Nothing is checked without offload or without devices (check_offload speaks then)."""
    if n_gpu_layers == 0:
        return
    status = gpu_status() if status is None else status
    n = len(status.devices)
    if n == 0:
        return
    names = ", ".join(f"{i}: {d['backend']} {d['name']}" for i, d in enumerate(status.devices))
    there = f"this machine has {n} GPU device{'s' if n > 1 else ''} ({names})"
    if main_gpu >= n:
        raise ValueError(f"main_gpu={main_gpu} names no device: {there}")
    if tensor_split is not None:
        extra = [i for i, v in enumerate(tensor_split) if i >= n and float(v) != 0.0]
        if extra:
            raise ValueError(f"tensor_split gives a share to device {extra[0]}, which does not exist: {there}")


def _caller_stacklevel() -> int:
    """The stacklevel of the first frame outside pyllama, so that the warning names the line
    that created the LLM (through LLM.__init__, its keyword check, compat's Llama ...)."""
    import os
    import sys

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1     # 1: the caller of this function's caller's warn()
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level
