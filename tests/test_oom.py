"""A context that does not fit in memory is an OutOfMemoryError (a MemoryError, and a
ValueError as before), not a generic failure: the caller can retry smaller.  In a subprocess
whose address space is capped, so that the allocation fails quickly instead of being
overcommitted on a big machine."""

from __future__ import annotations

import subprocess
import sys

_CODE = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))
from pyllama import LLM, OutOfMemoryError
try:
    LLM(sys.argv[1], n_ctx=4_000_000, n_threads=1, verbose=False)
except OutOfMemoryError as e:
    print("OOM", isinstance(e, MemoryError), isinstance(e, ValueError), str(e))
llm = LLM(sys.argv[1], n_ctx=256, n_threads=1, verbose=False)      # the process carries on
print("THEN", llm.complete("Hello", max_tokens=2, temperature=0).tokens != [])
"""


def test_a_context_too_big_for_memory_is_an_out_of_memory_error(smollm2_path):
    proc = subprocess.run([sys.executable, "-c", _CODE, str(smollm2_path)], capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("OOM True True llama.cpp could not create the context: "), lines
    assert "memory" in lines[0] or "allocate" in lines[0], lines
    assert lines[1] == "THEN True", lines


def test_bad_parameters_stay_a_plain_value_error():
    from pyllama import errors

    assert issubclass(errors.OutOfMemoryError, ValueError) and issubclass(errors.OutOfMemoryError, MemoryError)
    assert not issubclass(ValueError, errors.OutOfMemoryError)


def test_an_absurd_n_ctx_is_refused_before_allocating(tiny_model_path):
    """n_ctx = 2**30 (a typo): the KV cache could not fit this machine many times over, so the
    pre-check refuses it as an OutOfMemoryError without trying."""
    import pytest

    from pyllama import Context, Model, OutOfMemoryError

    with Model(tiny_model_path) as model:
        with pytest.raises(OutOfMemoryError, match="far more than this machine"):
            Context(model, n_ctx=2**30)
