"""Ray Data: :class:`LLMPredictor`, a callable class for ``Dataset.map_batches``.

Each actor constructs one predictor, which loads one :class:`pyllama.LLM`.  A batch is
validated row by row (an empty or too-long prompt, a bad chat or JSON schema gets its
message in the row's ``error`` column) and the valid rows go through one ``LLM.generate``
call, so they advance together in one context -- the same batched decoding as a single
process, one actor per slice of the cluster.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from pyllama.errors import ClosedError, ContextLengthError
from pyllama.integrations.ray.nodes import ModelRef, load_llm

#: The columns a predictor adds to each batch.
OUTPUT_COLUMNS = ("generated_text", "finish_reason", "prompt_tokens", "completion_tokens", "error")


class LLMPredictor:
    """Generate for each row of a batch with the model loaded once per actor.

    Use it as the class of ``Dataset.map_batches``; its keyword arguments come from
    ``fn_constructor_kwargs``::

        ds.map_batches(LLMPredictor,
                       fn_constructor_kwargs={"model_path": "smollm2", "n_threads": 1,
                                              "temperature": 0.0, "max_tokens": 64},
                       concurrency=2, num_cpus=1, batch_size=32)

    Keywords other than the three column names are :class:`pyllama.LLM`'s own: load and
    context parameters (``model_path``, ``n_ctx``, ``n_threads`` ...) and sampling defaults
    (``max_tokens``, ``temperature``, ``stop``, ``json_schema`` ...).  ``model_path`` is a
    path that exists on every node or a known model name fetched on each node.

    Each row needs a prompt: a string in ``prompt_column``, or else a list of
    ``{"role", "content"}`` messages in ``messages_column``, rendered with the model's chat
    template.  An optional ``json_schema_column`` (a JSON string, or a dict) constrains that
    row's answer; prefer strings when rows have different schemas, since Arrow turns dicts
    of different shapes into one struct type (pyllama drops the None fields this adds).

    The output is the input batch plus :data:`OUTPUT_COLUMNS`: ``generated_text``,
    ``finish_reason`` (as :class:`pyllama.Completion`: "stop", "length", "eog"),
    ``prompt_tokens``, ``completion_tokens`` and ``error``.  A row whose input is wrong gets
    ``"<ExceptionType>: <message>"`` in ``error`` (and None text and finish_reason) while the
    other rows complete; failures that are not about one row (the model closed, a decode
    error) fail the batch, so Ray's own retries apply.  Rows keep their order within a
    batch; across batches Ray Data keeps input order when
    ``DataContext.get_current().execution_options.preserve_order = True``.
    """

    def __init__(self, model_path: Optional[ModelRef] = None, *, prompt_column: str = "prompt",
                 messages_column: str = "messages", json_schema_column: str = "json_schema",
                 model: Optional[ModelRef] = None, **llm_args: Any) -> None:
        if model_path is None:
            model_path = model
        if model_path is None:
            raise TypeError("LLMPredictor needs model_path (a .gguf path on every node, or a known name such "
                            "as 'smollm2') in fn_constructor_kwargs")
        self.prompt_column = prompt_column
        self.messages_column = messages_column
        self.json_schema_column = json_schema_column
        self.llm = load_llm(model_path, **llm_args)

    # ---- one batch ------------------------------------------------------------------

    def __call__(self, batch: Any) -> Any:
        """Add the output columns to `batch` (a dict of NumPy arrays, a pandas DataFrame or
        a pyarrow Table -- whatever ``batch_format`` gave) and return it in the same format."""
        columns, kind = _columns(batch)
        n = _n_rows(columns)
        prompts = columns.get(self.prompt_column)
        messages = columns.get(self.messages_column)
        schemas = columns.get(self.json_schema_column)
        if prompts is None and messages is None:
            raise KeyError(f"the batch has neither a {self.prompt_column!r} nor a {self.messages_column!r} "
                           f"column (it has {sorted(columns)}); name the input column, e.g. "
                           f"fn_constructor_kwargs={{'prompt_column': ...}}")

        out: Dict[str, list] = {
            "generated_text": [None] * n, "finish_reason": [None] * n,
            "prompt_tokens": [0] * n, "completion_tokens": [0] * n, "error": [None] * n,
        }
        rows: List[int] = []
        tokens: List[list] = []
        per_prompt: List[dict] = []
        for i in range(n):
            try:
                toks, overrides = self._prepare_row(
                    None if prompts is None else prompts[i],
                    None if messages is None else messages[i],
                    None if schemas is None else schemas[i])
            except Exception as exc:  # noqa: BLE001 - only this row's data is involved here
                if isinstance(exc, (ClosedError, MemoryError)):
                    raise
                out["error"][i] = _describe(exc)
                out["prompt_tokens"][i] = getattr(exc, "n_prompt_tokens", 0)
                continue
            rows.append(i)
            tokens.append(toks)
            per_prompt.append(overrides)

        for k, result in enumerate(self._generate(tokens, per_prompt)):
            i = rows[k]
            if isinstance(result, BaseException):
                out["error"][i] = _describe(result)
                out["prompt_tokens"][i] = len(tokens[k])
                continue
            out["generated_text"][i] = result.text
            out["finish_reason"][i] = result.finish_reason
            out["prompt_tokens"][i] = result.prompt_tokens
            out["completion_tokens"][i] = len(result.tokens)
        return _with_columns(batch, kind, columns, out)

    def _prepare_row(self, prompt: Any, messages: Any, schema: Any) -> Tuple[list, dict]:
        """The prompt tokens and per-row sampling overrides of one row, or an exception that
        becomes the row's error (tokenizing, the chat template, the schema: whatever fails
        here is about this row's data).  Checks what ``LLM.generate`` would reject for this
        row alone, so that one bad row cannot fail the batch's single generate call."""
        llm = self.llm
        if _present(prompt):
            if not isinstance(prompt, str):
                raise TypeError(f"{self.prompt_column!r} must be a string, got {type(prompt).__name__}")
            toks = llm.tokenize(prompt)            # as generate() tokenizes a str prompt
        elif _present(messages):
            msgs = _plain(messages)
            if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
                raise TypeError(f"{self.messages_column!r} must be a list of {{'role', 'content'}} dicts, "
                                f"got {messages!r:.200}")
            toks = llm.chat_tokens(msgs)
        else:
            raise ValueError(f"the row has no prompt: {self.prompt_column!r} and {self.messages_column!r} are "
                             f"both empty")
        overrides: dict = {}
        if _present(schema):
            schema = _plain_schema(schema)
            if isinstance(schema, str):
                schema = json.loads(schema)        # json.JSONDecodeError is a ValueError
            from pyllama.grammar import json_schema_to_gbnf

            json_schema_to_gbnf(schema)            # unsupported keywords fail here (cached)
            overrides["json_schema"] = schema
        if not toks:
            raise ValueError("the prompt is empty (no tokens)")
        max_tokens = llm.defaults.max_tokens
        need = len(toks) + (max_tokens if max_tokens is not None and max_tokens > 0 else 0)
        n_ctx = llm.context.n_ctx_seq
        if need >= n_ctx:
            what = f"the prompt has {len(toks)} tokens"
            if need > len(toks):
                what += f", plus max_tokens={max_tokens}"
            exc = ContextLengthError(f"{what}, but the context window (n_ctx) is {n_ctx}; shorten the prompt or "
                                     f"load with a larger n_ctx")
            exc.n_prompt_tokens = len(toks)  # type: ignore[attr-defined]
            raise exc
        return toks, overrides

    def _generate(self, tokens: List[list], per_prompt: List[dict]) -> list:
        """One Completion (or the exception of that row) per prompt, in order."""
        if not tokens:
            return []
        overrides = per_prompt if any(per_prompt) else None
        try:
            return self.llm.generate(tokens, per_prompt=overrides)
        except ClosedError:
            raise
        except (ValueError, TypeError):
            # A row the checks above let through: run the rows one by one to find it.
            results: list = []
            for toks, pp in zip(tokens, per_prompt):
                try:
                    results.append(self.llm.generate([toks], per_prompt=[pp] if pp else None)[0])
                except ClosedError:
                    raise
                except (ValueError, TypeError) as exc:
                    results.append(exc)
            return results

    def __repr__(self) -> str:
        return f"LLMPredictor({self.llm!r})"


# --------------------------------------------------------------------------- batch formats


def _columns(batch: Any) -> Tuple[Dict[str, Any], str]:
    """The batch as {column: sequence} and which format it came in."""
    if isinstance(batch, Mapping):
        return dict(batch), "dict"
    if hasattr(batch, "to_pydict") and hasattr(batch, "schema"):          # pyarrow.Table
        return batch.to_pydict(), "arrow"
    if hasattr(batch, "columns") and hasattr(batch, "to_dict"):           # pandas.DataFrame
        return {c: batch[c].to_numpy() for c in batch.columns}, "pandas"
    raise TypeError(f"LLMPredictor got a batch of type {type(batch).__name__}; use batch_format='numpy', "
                    f"'pandas' or 'pyarrow'")


def _n_rows(columns: Mapping[str, Any]) -> int:
    for values in columns.values():
        return len(values)
    return 0


def _with_columns(batch: Any, kind: str, columns: Dict[str, Any], out: Dict[str, list]) -> Any:
    if kind == "pandas":
        result = batch.copy()
        for name, values in out.items():
            result[name] = values
        return result
    if kind == "arrow":
        import pyarrow as pa

        arrays = {"generated_text": pa.array(out["generated_text"], pa.string()),
                  "finish_reason": pa.array(out["finish_reason"], pa.string()),
                  "prompt_tokens": pa.array(out["prompt_tokens"], pa.int64()),
                  "completion_tokens": pa.array(out["completion_tokens"], pa.int64()),
                  "error": pa.array(out["error"], pa.string())}
        result = batch
        for name, arr in arrays.items():
            if name in result.column_names:
                result = result.drop([name])
            result = result.append_column(name, arr)
        return result
    result = dict(columns)
    for name in ("generated_text", "finish_reason", "error"):
        result[name] = _object_array(out[name])
    result["prompt_tokens"] = np.asarray(out["prompt_tokens"], dtype=np.int64)
    result["completion_tokens"] = np.asarray(out["completion_tokens"], dtype=np.int64)
    return result


def _object_array(values: Sequence[Any]) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = list(values)
    return arr


# --------------------------------------------------------------------------- values


def _present(value: Any) -> bool:
    """False for a missing cell: None, NaN (NumPy's and pandas' float missing value),
    pandas' NA and NaT."""
    if value is None:
        return False
    if isinstance(value, (float, np.floating)) and value != value:
        return False
    # pandas.NA / pandas.NaT, recognised without importing pandas.
    if type(value).__name__ in ("NAType", "NaTType") and type(value).__module__.startswith("pandas"):
        return False
    return True


def _plain(value: Any) -> Any:
    """Plain Python data from what Arrow and NumPy hand over: arrays become lists, NumPy
    scalars Python scalars, and None fields of dicts (Arrow's struct unification adds them
    for keys other rows have) are dropped."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.dtype != object else [_plain(v) for v in value]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, np.generic):
        return value.item()
    return value


# Schema keywords whose values are JSON data: a None there is JSON null ({"const": null}).
_SCHEMA_DATA_KEYWORDS = frozenset(("const", "enum", "default", "examples", "example"))
# ... and those whose value itself may be null (enum and examples are lists).
_SCHEMA_NULL_KEYWORDS = frozenset(("const", "default", "example"))


def _plain_data(value: Any) -> Any:
    """Plain Python data, every None kept (it is JSON null)."""
    if isinstance(value, np.ndarray):
        value = value.tolist() if value.dtype != object else list(value)
    if isinstance(value, (list, tuple)):
        return [_plain_data(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain_data(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _plain_schema(value: Any) -> Any:
    """A JSON schema cell as plain Python data.  As :func:`_plain`, None fields of dicts are
    dropped (Arrow adds them for keys other rows' schemas have; no schema keyword is null),
    except under the keywords that hold JSON data (``const``, ``enum``, ``default`` ...),
    where None is JSON null and is kept: ``{"const": null}`` survives.  (A column of dicts
    cannot tell ``{"const": null}`` from a row without ``const`` when another row has one:
    give such schemas as JSON strings.)"""
    if isinstance(value, np.ndarray):
        value = value.tolist() if value.dtype != object else list(value)
    if isinstance(value, (list, tuple)):
        return [_plain_schema(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): (_plain_data(v) if k in _SCHEMA_DATA_KEYWORDS else
                         _plain_schema_map(v) if k in _SCHEMA_MAP_KEYWORDS else _plain_schema(v))
                for k, v in value.items() if v is not None or k in _SCHEMA_NULL_KEYWORDS}
    if isinstance(value, np.generic):
        return value.item()
    return value


# Keywords whose values map names (not keywords) to schemas.
_SCHEMA_MAP_KEYWORDS = frozenset(("properties", "$defs", "definitions", "patternProperties", "dependentSchemas"))


def _plain_schema_map(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain_schema(v) for k, v in value.items() if v is not None}
    return _plain_schema(value)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


__all__ = ["LLMPredictor", "OUTPUT_COLUMNS"]
