"""Module-scoped LLM fixtures on the real test models, declared in one line per test file:

    smol = module_llm("smollm2_path", n_ctx=1024, n_threads=2, temperature=0)
    any_llm = either_llm("smol", "gemma")
"""

from __future__ import annotations

from typing import Any

import pytest

from pyllama import LLM


def module_llm(path_fixture: str, **llm_kwargs: Any):
    """A module-scoped fixture: LLM(<the path fixture's model>, **llm_kwargs), closed after
    the module's tests."""

    @pytest.fixture(scope="module")
    def fixture(request):
        llm = LLM(request.getfixturevalue(path_fixture), **llm_kwargs)
        yield llm
        llm.close()

    return fixture


def either_llm(*names: str):
    """A fixture parametrised over other LLM fixtures (each test runs once per model)."""

    @pytest.fixture(params=list(names))
    def fixture(request):
        return request.getfixturevalue(request.param)

    return fixture
