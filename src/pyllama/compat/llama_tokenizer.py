"""llama-cpp-python's ``llama_cpp.llama_tokenizer``: the tokenizer objects a ``Llama`` uses.

:class:`LlamaTokenizer` works on the vocabulary of the pyllama model behind a compat
``Llama`` (never on the ``Llama``'s own ``tokenize``/``detokenize``, which delegate here, as
in llama-cpp-python).  :class:`LlamaHFTokenizer` wraps a Hugging Face tokenizer
(``transformers``), for models whose GGUF tokenizer differs from the original.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, List, Optional, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from pyllama import _core

__all__ = ["BaseLlamaTokenizer", "LlamaTokenizer", "LlamaHFTokenizer"]


class BaseLlamaTokenizer(abc.ABC):
    """What a ``Llama`` needs of a tokenizer: bytes to token ids and back."""

    @abc.abstractmethod
    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = True) -> List[int]:
        """Tokenize UTF-8 `text`; `add_bos` adds the model's BOS (if it uses one), `special`
        parses special-token text (``<|im_start|>``) as the special tokens."""
        raise NotImplementedError

    @abc.abstractmethod
    def detokenize(self, tokens: List[int], prev_tokens: Optional[List[int]] = None,
                   special: bool = False) -> bytes:
        """The bytes of `tokens`; with `prev_tokens`, only what `tokens` add after them;
        `special` renders control tokens' text."""
        raise NotImplementedError


def _vocab_of(llama: Any) -> "_core.Vocab":
    """The pyllama vocabulary behind a compat Llama (or a pyllama.LLM / _core.Model / Vocab)."""
    from pyllama import _core

    if isinstance(llama, _core.Vocab):
        return llama
    if isinstance(llama, _core.Model):
        return llama.vocab
    for attr in ("_llm", "llm"):  # the compat Llama holds its pyllama.LLM
        inner = getattr(llama, attr, None)
        model = getattr(inner, "model", None) if inner is not None else None
        if isinstance(model, _core.Model):
            return model.vocab
    model = getattr(llama, "model", None)  # a pyllama.LLM
    if isinstance(model, _core.Model):
        return model.vocab
    raise TypeError(f"LlamaTokenizer needs a Llama (pyllama.compat.Llama), not {type(llama).__name__}")


class LlamaTokenizer(BaseLlamaTokenizer):
    """The model's own (GGUF) tokenizer, as llama-cpp-python's: ``LlamaTokenizer(llama)``."""

    def __init__(self, llama: Any) -> None:
        self._vocab = _vocab_of(llama)

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = True) -> List[int]:
        if isinstance(text, str):
            raise TypeError("tokenize takes bytes (text.encode('utf-8')), as in llama-cpp-python")
        return self._vocab.tokenize(bytes(text), add_special=bool(add_bos), parse_special=bool(special))

    def detokenize(self, tokens: Sequence[int], prev_tokens: Optional[Sequence[int]] = None,
                   special: bool = False) -> bytes:
        # llama-cpp-python joins each token's piece and drops the leading space of a text
        # that starts with BOS (SentencePiece's prefix space); `prev_tokens` is ignored there
        # too.  One C call per token: the vocabulary caches nothing between calls.
        vocab = self._vocab
        tokens = [int(t) for t in tokens]
        special = bool(special)
        output = b"".join(vocab.token_to_piece(t, special=special) for t in tokens)
        if tokens and tokens[0] == vocab.bos and output[:1] == b" ":
            return output[1:]
        return output

    def encode(self, text: str, add_bos: bool = True, special: bool = True) -> List[int]:
        return self.tokenize(text.encode("utf-8", errors="ignore"), add_bos=add_bos, special=special)

    def decode(self, tokens: List[int]) -> str:
        return self.detokenize(tokens).decode("utf-8", errors="ignore")

    @classmethod
    def from_ggml_file(cls, path: str) -> "LlamaTokenizer":
        """The tokenizer of a GGUF file (loads its vocabulary only)."""
        from pyllama import _core

        return cls(_core.Model(path, vocab_only=True))


class LlamaHFTokenizer(BaseLlamaTokenizer):
    """A Hugging Face tokenizer in a ``Llama``'s place: ``Llama(..., tokenizer=
    LlamaHFTokenizer.from_pretrained("org/model"))``."""

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf_tokenizer = hf_tokenizer

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = True) -> List[int]:
        # As in llama-cpp-python: `special` means add_special_tokens; add_bos is not used.
        return self.hf_tokenizer.encode(text.decode("utf-8", errors="ignore"), add_special_tokens=special)

    def detokenize(self, tokens: List[int], prev_tokens: Optional[List[int]] = None,
                   special: bool = False) -> bytes:
        skip_special_tokens = not special
        if prev_tokens is not None:
            text = self.hf_tokenizer.decode(list(prev_tokens) + list(tokens),
                                            skip_special_tokens=skip_special_tokens).encode("utf-8", errors="ignore")
            prev_text = self.hf_tokenizer.decode(list(prev_tokens),
                                                 skip_special_tokens=skip_special_tokens).encode("utf-8", errors="ignore")
            return text[len(prev_text):]
        return self.hf_tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens).encode(
            "utf-8", errors="ignore")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, **kwargs: Any) -> "LlamaHFTokenizer":
        """``transformers.AutoTokenizer.from_pretrained(...)`` wrapped (ImportError without
        ``transformers``); keyword arguments go to it."""
        try:
            from transformers import AutoTokenizer  # type: ignore
        except ImportError:
            raise ImportError("The `transformers` library is required to use the `HFTokenizer`. "
                              "You can install it with `pip install transformers`.") from None
        return cls(AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs))
