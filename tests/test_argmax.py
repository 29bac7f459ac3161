"""The greedy scan (pyllama_argmax_f32) against llama.cpp's greedy rule, on rows built to
catch a vectorised scan out: NaNs, ties, signed zeros, infinities, every tail length."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pyllama import _core


def greedy_reference(row: np.ndarray) -> int:
    """llama_sampler_greedy's loop: best = 0; for i: if x[i] > x[best]: best = i."""
    best = 0
    for i in range(1, len(row)):
        if row[i] > row[best]:
            best = i
    return best


def _rows(rng: np.random.Generator):
    for n in list(range(1, 70)) + [127, 128, 129, 1000, 49152, 49152 + 7]:
        yield rng.standard_normal(n).astype(np.float32)
        # few distinct values: many ties, the first must win
        yield rng.integers(-3, 3, n).astype(np.float32)
        row = rng.standard_normal(n).astype(np.float32)
        row[rng.random(n) < 0.3] = np.nan
        yield row
        row = np.full(n, -np.inf, dtype=np.float32)
        row[rng.integers(0, n)] = np.inf if n % 2 else 0.0
        yield row
        row = np.zeros(n, dtype=np.float32)
        row[rng.random(n) < 0.5] = -0.0
        yield row


def test_argmax_matches_the_greedy_rule_on_awkward_rows():
    rng = np.random.default_rng(1234)
    checked = 0
    for row in _rows(rng):
        assert _core._argmax_f32(row) == greedy_reference(row), row
        checked += 1
    assert checked > 300


@pytest.mark.parametrize("position", [0, 1, 15, 16, 17, 4095, 49150, 49151])
def test_argmax_finds_the_maximum_anywhere(position):
    row = np.linspace(-1.0, 0.0, 49152, dtype=np.float32)[::-1].copy()   # largest at 0
    row[position] = 5.0
    row[-1] = 5.0 if position != 49151 else row[-1]   # a later tie never wins
    assert _core._argmax_f32(row) == position


def test_argmax_nan_rules():
    nan = math.nan
    # a NaN first value is never beaten (the strict > is always false against it)
    assert _core._argmax_f32(np.array([nan, 1.0, 2.0], dtype=np.float32)) == 0
    # later NaNs never win, wherever they sit in a 16-wide block
    row = np.full(40, nan, dtype=np.float32)
    row[0] = -1.0
    row[33] = 0.5
    assert _core._argmax_f32(row) == 33
    assert _core._argmax_f32(np.array([-np.inf] + [nan] * 20, dtype=np.float32)) == 0


def test_argmax_rejects_an_empty_row():
    with pytest.raises(ValueError):
        _core._argmax_f32(np.zeros(0, dtype=np.float32))
