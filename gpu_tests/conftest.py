"""Fixtures of the GPU test tier (gpu_tests/): the two test models, and the device the build
found.  The tier is not part of the CI suite (CI has no GPU): scripts/check_vulkan.sh runs it
on Mesa's llvmpipe and scripts/gpu_check.sh on a real GPU, each with an installed GPU wheel."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))   # server_process


@pytest.fixture(scope="session")
def device() -> dict:
    """The first device layers go to; the tier fails (not skips) without one."""
    from pyllama import gpu

    status = gpu.gpu_status()
    if not status.available:
        pytest.fail(f"the GPU tier needs a GPU device: {status.summary}")
    return status.devices[0]


# On a lent GPU machine nothing can be fetched and at most 64 MiB travels with the tree: there
# `scripts/gpu_check.sh pack` (run where the registry is reachable) makes two tiny random-weight
# llama models and PYLLAMA_GPU_TIER_MODELS names their folder; they stand in for the two test
# models (same code paths: a quantization-free F32 model and an F16 one with tied embeddings).
_STAND_INS = {"smollm2-135m-instruct": "tiny-llama-f32.gguf", "gemma3-270m": "tiny-llama-f16-tied.gguf"}


def _model(name: str) -> Path:
    folder = os.environ.get("PYLLAMA_GPU_TIER_MODELS")
    if folder:
        path = Path(folder) / _STAND_INS[name]
        if not path.exists():
            pytest.fail(f"PYLLAMA_GPU_TIER_MODELS={folder} has no {path.name} (scripts/gpu_check.sh pack makes it)")
        return path
    from pyllama import models

    return models.fetch_model(name, progress=False)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return _model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    return _model("gemma3-270m")


@pytest.fixture(scope="session", params=["smollm2", "gemma3"])
def model_path(request) -> Path:
    return _model({"smollm2": "smollm2-135m-instruct", "gemma3": "gemma3-270m"}[request.param])
