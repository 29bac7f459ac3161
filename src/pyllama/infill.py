"""Fill-in-the-middle (LLM.infill): the prompt of a code-infill request, laid out as
llama-server's ``/infill`` lays it out (``format_prompt_infill``), for models whose vocabulary
has FIM tokens (CodeLlama, StarCoder, DeepSeek-Coder, Qwen2.5-Coder, Codestral ...).

The layout, with the repository-level pattern of Qwen2.5-Coder (arXiv:2409.12186)::

    [FIM_REP]myproject\\n                  (only when the vocabulary has FIM_REP)
    [FIM_SEP]{filename}\\n{text}           (each extra-context chunk; without FIM_SEP, the chunk
    ...                                     is preceded by "\\n\\n--- snippet ---\\n\\n")
    [FIM_SEP]filename\\n                   (only when the vocabulary has FIM_SEP)
    [BOS][FIM_PRE]{prefix}{prompt}[FIM_SUF]{suffix}[FIM_MID]

BOS comes only where the vocabulary adds one, after the extra context.  With ``spm_infill``
the suffix part comes first: ``[BOS][FIM_SUF]{suffix}[FIM_PRE]{prefix}{prompt}[FIM_MID]``.

Budgets (llama-server's): the prefix keeps its last 3/4 x n_batch tokens, the suffix its first
n_batch/4 - 2 - len(prompt) tokens; the extra context keeps its last
n_ctx - n_batch - 2 x n_predict tokens (n_ctx: one slot's context).  Two guards of pyllama's,
which change nothing where llama-server's numbers fit: n_batch is at most half a slot (else
prefix and suffix alone could fill it), and the extra context shrinks so that the whole prompt
stays shorter than the slot (llama-server can overflow there by a few tokens when n_predict
is -1).

The model then generates the middle through the normal completion path (LLM.complete).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Mapping, Optional, Sequence, Tuple, Union

if TYPE_CHECKING:
    from pyllama._core import Vocab
    from pyllama.llm import LLM

__all__ = ["Text", "extra_chunks", "fim_unsupported", "format_infill", "infill_prompt"]

#: A prefix or suffix: text, or llama-server's mixed list of strings and token ids.
Text = Union[str, Sequence[Union[str, int]]]

# The chunk separator when the vocabulary has no FIM_SEP (llama-server's bytes).
_SNIPPET = "\n\n--- snippet ---\n\n"


def fim_unsupported(vocab: "Vocab") -> Optional[str]:
    """Why this vocabulary cannot infill (llama-server's message), or None when it can."""
    missing = [f"{what} token is missing." for what, tok in
               (("prefix", vocab.fim_pre), ("suffix", vocab.fim_suf), ("middle", vocab.fim_mid)) if tok == -1]
    if not missing:
        return None
    return ("Infill is not supported by this model: " + " ".join(missing)
            + " (a fill-in-the-middle model's vocabulary has FIM prefix/suffix/middle tokens)")


def extra_chunks(extra_context: Optional[Sequence[Mapping[str, Any]]]) -> List[Tuple[str, str]]:
    """(filename, text) of each extra-context chunk ``{"text": str, "filename": str}``
    (filename optional, "tmp" by default, as llama-server's)."""
    if extra_context is None:
        return []
    if isinstance(extra_context, (str, bytes, Mapping)):
        raise TypeError("extra_context must be a list of {'filename': str, 'text': str} dicts")
    out = []
    for i, chunk in enumerate(extra_context):
        if not isinstance(chunk, Mapping):
            raise TypeError(f"extra_context[{i}] must be a dict with 'text' (and 'filename'), "
                            f"got {type(chunk).__name__}")
        unknown = set(chunk) - {"text", "filename"}
        if unknown:
            raise ValueError(f"extra_context[{i}] has unknown keys {sorted(unknown)}: it takes 'text' and 'filename'")
        text = chunk.get("text")
        if not isinstance(text, str):
            raise ValueError(f"extra_context[{i}] must have a 'text' string, got {text!r}")
        filename = chunk.get("filename", "tmp")
        if not isinstance(filename, str):
            raise ValueError(f"extra_context[{i}]['filename'] must be a string, got {filename!r}")
        out.append((filename, text))
    return out


def _tokens(vocab: "Vocab", value: Text, what: str) -> List[int]:
    """llama-server's tokenize_mixed without special tokens: a string, or a list of strings
    and token ids (checked against the vocabulary)."""
    if isinstance(value, str):
        return vocab.tokenize(value, add_special=False, parse_special=False)
    if isinstance(value, bytes) or not isinstance(value, Sequence):
        raise TypeError(f"{what} must be a str or a list of str and token ids, got {type(value).__name__}")
    out: List[int] = []
    for item in value:
        if isinstance(item, str):
            out += vocab.tokenize(item, add_special=False, parse_special=False)
        elif isinstance(item, int) and not isinstance(item, bool):
            vocab.check_tokens([item])
            out.append(item)
        else:
            raise TypeError(f"{what} items must be str or token ids, got {type(item).__name__}")
    return out


def format_infill(vocab: "Vocab", prefix: Sequence[int], suffix: Sequence[int], extra: Sequence[Tuple[str, str]],
                  prompt: Sequence[int], *, n_batch: int, n_predict: int, n_ctx: int,
                  spm_infill: bool = False) -> List[int]:
    """The infill prompt's tokens (the layout and budgets of the module's docstring), from the
    prefix, suffix and prompt tokens and the (filename, text) extra chunks."""
    def tok(text: str) -> List[int]:
        return vocab.tokenize(text, add_special=False, parse_special=False)

    extra_tokens: List[int] = []
    if vocab.fim_rep != -1:
        extra_tokens += [vocab.fim_rep] + tok("myproject\n")
    for filename, text in extra:
        if vocab.fim_sep != -1:
            extra_tokens += [vocab.fim_sep] + tok(filename + "\n")
        else:
            extra_tokens += tok(_SNIPPET)
        extra_tokens += tok(text)
    if vocab.fim_sep != -1:
        extra_tokens += [vocab.fim_sep] + tok("filename\n")

    # the FIM context fits a batch: prefix : suffix = 3 : 1 (C++ integer division)
    n_prefix_take = min(len(prefix), 3 * (n_batch // 4))
    n_suffix_take = min(len(suffix), max(0, n_batch // 4 - (2 + len(prompt))))
    head = [vocab.fim_pre] + list(prefix[len(prefix) - n_prefix_take:]) + list(prompt)
    tail = [vocab.fim_suf] + list(suffix[:n_suffix_take])
    if spm_infill:
        head, tail = tail, head
    if vocab.add_bos:
        head = [vocab.bos] + head
    body = head + tail + [vocab.fim_mid]
    # the extra context fills the rest, nearest chunks (the last ones) first
    n_extra_take = min(max(0, n_ctx - n_batch - 2 * n_predict), len(extra_tokens))
    n_extra_take = min(n_extra_take, max(0, n_ctx - 1 - len(body)))
    return extra_tokens[len(extra_tokens) - n_extra_take:] + body


def infill_prompt(llm: "LLM", prefix: Text, suffix: Text, *, prompt: str = "",
                  extra_context: Optional[Sequence[Mapping[str, Any]]] = None, spm_infill: bool = False,
                  n_predict: Optional[int] = None) -> List[int]:
    """The prompt tokens of LLM.infill for `llm` (its n_batch and one slot's n_ctx; `n_predict`
    None or -1: unlimited).  Raises ValueError for a model without FIM tokens."""
    llm._check_open()
    vocab = llm.vocab
    reason = fim_unsupported(vocab)
    if reason is not None:
        raise ValueError(reason)
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if n_predict is None:
        n_predict = -1
    if not isinstance(n_predict, int) or isinstance(n_predict, bool):
        raise TypeError(f"max_tokens must be an int or None, got {type(n_predict).__name__}")
    chunks = extra_chunks(extra_context)
    n_ctx = llm.context.n_ctx_seq
    # llama-server budgets with its n_batch; when that is more than half a slot, the prefix and
    # suffix alone could fill the slot and leave no room to generate, so half a slot it is.
    n_batch = min(llm._ctx_params["n_batch"], n_ctx // 2)
    return format_infill(vocab, _tokens(vocab, prefix, "prefix"), _tokens(vocab, suffix, "suffix"), chunks,
                         # (llama-server: the prompt may spell special tokens)
                         vocab.tokenize(prompt, add_special=False, parse_special=True),
                         n_batch=n_batch, n_predict=n_predict, n_ctx=n_ctx, spm_infill=spm_infill)
