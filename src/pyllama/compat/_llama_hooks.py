"""llama-cpp-python's hook types -- logits processors, stopping criteria, draft models -- and
their adaptation to the hooks of pyllama's engine (called in its stepping thread, inside the
batch).

Re-exported by :mod:`pyllama.compat.llama`, their public home.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

import numpy as np
import numpy.typing as npt

LogitsProcessor = Callable[[npt.NDArray[np.intc], npt.NDArray[np.single]], npt.NDArray[np.single]]


class LogitsProcessorList(List[LogitsProcessor]):
    """Logits processors, called in order as ``processor(input_ids, scores) -> scores``."""

    def __call__(self, input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
        for processor in self:
            scores = processor(input_ids, scores)
        return scores


StoppingCriteria = Callable[[npt.NDArray[np.intc], npt.NDArray[np.single]], bool]


class StoppingCriteriaList(List[StoppingCriteria]):
    """Stopping criteria; any True stops the generation."""

    def __call__(self, input_ids: npt.NDArray[np.intc], logits: npt.NDArray[np.single]) -> bool:
        return any([criterion(input_ids, logits) for criterion in self])


class MinTokensLogitsProcessor:
    """Bans the end-of-sequence token until `min_tokens` tokens were generated."""

    def __init__(self, min_tokens: int, token_eos: int):
        self.min_tokens = min_tokens
        self.token_eos = token_eos
        self.prompt_tokens: Optional[int] = None

    def __call__(self, input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
        if self.prompt_tokens is None:
            self.prompt_tokens = len(input_ids)
        if len(input_ids) - self.prompt_tokens < self.min_tokens:
            scores[self.token_eos] = -np.inf
        return scores


class _Criteria:
    """llama-cpp-python's stopping criteria as pyllama hooks.

    llama-cpp-python asks its criteria, right after sampling token k, with the tokens
    evaluated so far (prompt + tokens 1..k-1), and on True drops token k.  pyllama asks its
    criteria after token k with ``input_ids`` ending in token k, and on True drops token k's
    text.  So each criterion sees ``input_ids[:-1]``: the same arguments at the same step, the
    same output.  `fired` records that the request ended this way (token k is still in the
    request's tokens; llama-cpp-python does not count it)."""

    def __init__(self, criteria: Sequence[Callable[..., Any]]):
        self.criteria = list(criteria)
        self.fired = False

    def __call__(self, input_ids: Any, scores: Any) -> bool:
        stop = False
        for crit in self.criteria:
            if crit(input_ids[:-1], scores):
                stop = True
        if stop:
            self.fired = True
        return stop


def _draft_model_adapter(draft_model: Any) -> Callable[[list, int], list]:
    """A llama-cpp-python draft model (``draft_model(input_ids) -> token ids``) as the engine's
    ``drafter(token_ids, limit)``."""

    def drafter(token_ids: list, limit: int) -> list:
        out = draft_model(np.asarray(token_ids, dtype=np.intc))
        return [int(t) for t in np.asarray(out).reshape(-1)[:limit]]

    return drafter
