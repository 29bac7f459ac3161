"""llama-cpp-python's state caches: ``LlamaRAMCache`` and ``LlamaDiskCache`` map token
sequences to :class:`~pyllama.compat.llama.LlamaState` objects and answer a lookup with the
entry sharing the longest prefix, as ``llama_cpp.llama_cache`` does.

pyllama's engine keeps its own prompt cache (every slot keeps its KV cells, a new request
takes the slot with the longest common prefix), so these caches are bookkeeping that
``Llama`` keeps for llama-cpp-python code: ``Llama.set_cache(cache)`` makes each completion
store its state here and restore the best entry before running (token ids and seed; the KV
cells come from the engine's cache).  ``LlamaDiskCache`` writes pickle files into
``cache_dir`` (llama-cpp-python uses the ``diskcache`` package; pyllama needs no extra
dependency).
"""

from __future__ import annotations

import hashlib
import os
import pickle
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import TYPE_CHECKING, Optional, Sequence, Tuple

if TYPE_CHECKING:  # pragma: no cover
    from pyllama.compat.llama import LlamaState

__all__ = ["BaseLlamaCache", "LlamaRAMCache", "LlamaCache", "LlamaDiskCache"]


def _longest_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _state_size(state: "LlamaState") -> int:
    return int(getattr(state, "llama_state_size", 0) or 0)


class BaseLlamaCache(ABC):
    """Base class of the caches (llama-cpp-python's interface)."""

    def __init__(self, capacity_bytes: int = (2 << 30)):
        self.capacity_bytes = capacity_bytes

    @property
    @abstractmethod
    def cache_size(self) -> int:
        raise NotImplementedError

    def _find_longest_prefix_key(self, key: Tuple[int, ...]) -> Optional[Tuple[int, ...]]:
        best_len, best = 0, None
        for k in self._keys():
            n = _longest_prefix(k, key)
            if n > best_len:
                best_len, best = n, k
        return best

    def _keys(self) -> list:
        return []

    @abstractmethod
    def __getitem__(self, key: Sequence[int]) -> "LlamaState":
        raise NotImplementedError

    @abstractmethod
    def __contains__(self, key: Sequence[int]) -> bool:
        raise NotImplementedError

    @abstractmethod
    def __setitem__(self, key: Sequence[int], value: "LlamaState") -> None:
        raise NotImplementedError


class LlamaRAMCache(BaseLlamaCache):
    """States in memory, least recently used evicted beyond `capacity_bytes` (the sum of
    their ``llama_state_size``)."""

    def __init__(self, capacity_bytes: int = (2 << 30)):
        super().__init__(capacity_bytes)
        self.cache_state: "OrderedDict[Tuple[int, ...], LlamaState]" = OrderedDict()

    @property
    def cache_size(self) -> int:
        return sum(_state_size(s) for s in self.cache_state.values())

    def _keys(self) -> list:
        return list(self.cache_state.keys())

    def __getitem__(self, key: Sequence[int]) -> "LlamaState":
        found = self._find_longest_prefix_key(tuple(key))
        if found is None:
            raise KeyError("Key not found")
        self.cache_state.move_to_end(found)
        return self.cache_state[found]

    def __contains__(self, key: Sequence[int]) -> bool:
        return self._find_longest_prefix_key(tuple(key)) is not None

    def __setitem__(self, key: Sequence[int], value: "LlamaState") -> None:
        key = tuple(int(t) for t in key)
        self.cache_state.pop(key, None)
        self.cache_state[key] = value
        while self.cache_size > self.capacity_bytes and self.cache_state:
            self.cache_state.popitem(last=False)

    def __len__(self) -> int:
        return len(self.cache_state)


#: llama-cpp-python's old name.
LlamaCache = LlamaRAMCache


class LlamaDiskCache(BaseLlamaCache):
    """States pickled into `cache_dir` (one ``.state`` file per entry and a ``.key`` file
    with its tokens); the oldest entries are removed beyond `capacity_bytes` of files.
    As in llama-cpp-python, a lookup removes the entry it returns (the completion that used
    it stores its new state afterwards)."""

    def __init__(self, cache_dir: str = ".cache/llama_cache", capacity_bytes: int = (2 << 30)):
        super().__init__(capacity_bytes)
        self.cache_dir = os.fspath(cache_dir)
        os.makedirs(self.cache_dir, exist_ok=True)

    def _name(self, key: Tuple[int, ...]) -> str:
        digest = hashlib.sha256(repr(key).encode("ascii")).hexdigest()[:32]
        return os.path.join(self.cache_dir, digest)

    def _entries(self) -> list:
        """(key file stem, mtime) of every entry, oldest first."""
        out = []
        for name in os.listdir(self.cache_dir):
            if name.endswith(".state"):
                path = os.path.join(self.cache_dir, name)
                try:
                    out.append((path[: -len(".state")], os.path.getmtime(path)))
                except OSError:
                    pass
        out.sort(key=lambda e: e[1])
        return [stem for stem, _ in out]

    def _keys(self) -> list:
        keys = []
        for stem in self._entries():
            try:
                with open(stem + ".key", "rb") as f:
                    keys.append(tuple(pickle.load(f)))
            except (OSError, pickle.UnpicklingError, EOFError):
                pass
        return keys

    @property
    def cache_size(self) -> int:
        total = 0
        for stem in self._entries():
            for ext in (".state", ".key"):
                try:
                    total += os.path.getsize(stem + ext)
                except OSError:
                    pass
        return total

    def __getitem__(self, key: Sequence[int]) -> "LlamaState":
        found = self._find_longest_prefix_key(tuple(key))
        if found is None:
            raise KeyError("Key not found")
        stem = self._name(found)
        with open(stem + ".state", "rb") as f:
            value = pickle.load(f)
        self._remove(stem)
        return value

    def __contains__(self, key: Sequence[int]) -> bool:
        return self._find_longest_prefix_key(tuple(key)) is not None

    def __setitem__(self, key: Sequence[int], value: "LlamaState") -> None:
        key = tuple(int(t) for t in key)
        stem = self._name(key)
        with open(stem + ".key.tmp", "wb") as f:
            pickle.dump(key, f)
        with open(stem + ".state.tmp", "wb") as f:
            pickle.dump(value, f)
        os.replace(stem + ".key.tmp", stem + ".key")
        os.replace(stem + ".state.tmp", stem + ".state")
        entries = self._entries()
        while self.cache_size > self.capacity_bytes and entries:
            self._remove(entries.pop(0))

    def __len__(self) -> int:
        return len(self._entries())

    @staticmethod
    def _remove(stem: str) -> None:
        for ext in (".state", ".key"):
            try:
                os.remove(stem + ext)
            except OSError:
                pass
