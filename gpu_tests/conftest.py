"""Fixtures of the GPU test tier (gpu_tests/): the two test models, and the device the build
found.  The tier is not part of the CI suite (CI has no GPU): scripts/check_vulkan.sh runs it
on Mesa's llvmpipe and scripts/gpu_check.sh on a real GPU, each with an installed GPU wheel."""

from __future__ import annotations

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


def _model(name: str) -> Path:
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
