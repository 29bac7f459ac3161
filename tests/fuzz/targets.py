"""Fuzz targets shared by the short hypothesis runs (tests/fuzz/test_fuzz_short.py, part of
the normal test suite) and the long atheris runs (tests/fuzz/run_atheris.py).

Each target takes raw bytes, turns them into an input for one pyllama entry point, and
runs it.  Clean Python exceptions that pyllama documents for bad input are the expected
outcome for garbage and are swallowed here; anything else -- an unexpected exception type,
a broken round trip, or a crash of the interpreter (a signal) -- is a finding.

    tokenize_roundtrip  text -> tokens -> pieces on a byte-level BPE vocabulary (llama-bpe):
                        the pieces must give the text back exactly (parse_special too);
                        random bytes to tokenize(): valid UTF-8 works, the rest is ValueError.
    tokenize_spm        the same on the SentencePiece vocabulary (llama-spm): no crash,
                        tokens in range; detokenize of random in-range ids never fails.
    grammar             GBNF-ish text to validate_grammar() (and the JSON-schema converter's
                        precheck): GrammarError/ValueError or success, never a crash/hang.
    gguf_header         mutated bytes of a tiny GGUF model loaded with Model(), then one
                        decode when it loads: ModelLoadError/ValueError or success.
"""

from __future__ import annotations

import os
import struct
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
ROOT = TESTS.parent
VOCAB_DIR = ROOT / "vendor" / "llama.cpp" / "models"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

# Exceptions that are a correct answer to garbage input.
_EXPECTED: tuple = ()


def _expected() -> tuple:
    global _EXPECTED
    if not _EXPECTED:
        from pyllama.errors import PyllamaError

        _EXPECTED = (PyllamaError, ValueError, TypeError, OverflowError, OSError, UnicodeError)
    return _EXPECTED


_cache: Dict[str, object] = {}


def _vocab(name: str):
    if name not in _cache:
        from pyllama import _core

        _cache[name] = _core.Model(str(VOCAB_DIR / f"ggml-vocab-{name}.gguf"), vocab_only=True)
    return _cache[name].vocab  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- tokenizer


def tokenize_roundtrip(data: bytes) -> None:
    vocab = _vocab("llama-bpe")
    # 1. raw bytes: valid UTF-8 tokenizes, anything else is a clean ValueError
    try:
        toks = vocab.tokenize(data, add_special=False)
    except ValueError:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            raise AssertionError(f"valid UTF-8 refused: {data!r}")
    else:
        # The pieces of a byte-level BPE tokenization are exactly the input bytes.  (detokenize()
        # itself may differ: llama.cpp's clean_spaces turns " ," into "," like HF's decoder.)
        pieces = b"".join(vocab.token_to_piece(t) for t in toks)
        assert pieces == data, f"byte round trip failed: {data!r} -> {toks} -> {pieces!r}"
        vocab.detokenize_bytes(toks)
    # 2. text (lone surrogates included: a clean ValueError)
    text = data.decode("utf-8", "surrogateescape" if len(data) % 3 == 0 else "replace")
    try:
        toks = vocab.tokenize(text, add_special=False, parse_special=len(data) % 2 == 0)
    except ValueError:
        assert any(0xD800 <= ord(c) <= 0xDFFF for c in text), f"refused valid text {text!r}"
        return
    assert all(0 <= t < vocab.n_tokens for t in toks)
    back = b"".join(vocab.token_to_piece(t, special=True) for t in toks).decode("utf-8")
    assert back == text, f"round trip: {text!r} -> {toks} -> {back!r}"
    vocab.detokenize(toks, unparse_special=len(data) % 2 == 0)


def tokenize_spm(data: bytes) -> None:
    vocab = _vocab("llama-spm")
    text = data.decode("utf-8", "replace")
    toks = vocab.tokenize(text, add_special=bool(data[:1] and data[0] & 1), parse_special=bool(data[:1] and data[0] & 2))
    assert all(0 <= t < vocab.n_tokens for t in toks)
    vocab.detokenize(toks)
    # random in-range ids (pieces of multi-byte characters included) always detokenize
    ids = [int.from_bytes(data[i:i + 2], "little") % vocab.n_tokens for i in range(0, len(data) - 1, 2)]
    vocab.detokenize(ids, remove_special=bool(ids[:1] and ids[0] & 1), unparse_special=bool(ids[:1] and ids[0] & 2))
    for t in ids[:8]:
        vocab.token_to_piece(t, special=bool(t & 1), lstrip=t % 3)


# --------------------------------------------------------------------------- grammars

GRAMMAR_SEEDS = [
    'root ::= "a"',
    'root ::= ("yes" | "no") "."',
    'root ::= [a-z]+ ("," [a-z]+)*',
    'root ::= item{2,5}\nitem ::= [0-9] | "x"',
    'root ::= object\nobject ::= "{" ws (pair ("," ws pair)*)? "}"\npair ::= "\\"" [a-z]* "\\"" ws ":" ws value\n'
    'value ::= object | [0-9]+ | "true"\nws ::= [ \\t\\n]*',
    'root ::= [^"\\\\] .? <[42]> !<[7]>',
    'root ::= "\\x41\\u00e9\\U0001F600" [\\x00-\\x7F]',
    '# comment\nroot ::= a | b\na ::= "a" b?\nb ::= "b"*',
]
GRAMMAR_PIECES = ['root', ' ::= ', '::=', ' | ', '(', ')', '*', '+', '?', '{', '}', '{0,3}', '{2}', '{1,}', '[', ']',
                  '[^', '-', 'a-z', '"', '\\"', '\\\\', '\\x', '\\u', '.', '<[', ']>', '!', '<', '>', '\n', ' ', '#',
                  'rule', 'x', '0', '9', '\t', '\r\n', 'é', '😀', '\x00', '=', ':']

_grammar_vocab = None


def grammar_text(data: bytes) -> str:
    """Turn fuzz bytes into GBNF-ish text: a seed grammar with pieces spliced in."""
    if not data:
        return GRAMMAR_SEEDS[0]
    text = GRAMMAR_SEEDS[data[0] % len(GRAMMAR_SEEDS)]
    i = 1
    while i + 1 < len(data):
        op, arg = data[i], data[i + 1]
        pos = (arg * 7 + op) % (len(text) + 1)
        if op % 4 == 0:
            text = text[:pos] + GRAMMAR_PIECES[arg % len(GRAMMAR_PIECES)] + text[pos:]
        elif op % 4 == 1:
            text = text[:pos] + text[pos + 1 + arg % 4:]
        elif op % 4 == 2:
            text = text[:pos] + chr(32 + arg % 95) + text[pos:]
        else:
            text = text[:pos] + GRAMMAR_SEEDS[arg % len(GRAMMAR_SEEDS)] + "\n" + text[pos:]
        i += 2
    return text


def grammar(data: bytes) -> None:
    from pyllama import _core
    from pyllama.errors import GrammarError

    text = grammar_text(data) if data[:1] != b"\xff" else data[1:].decode("utf-8", "replace")
    vocab = _vocab("llama-spm")
    try:
        _core.validate_grammar(vocab, text)
    except (GrammarError, ValueError):
        return


# --------------------------------------------------------------------------- GGUF files

_gguf_base: Optional[bytes] = None
_gguf_tmp: Optional[str] = None


def small_vocab_gguf(path: Path) -> Path:
    """A vocabulary-only GGUF with a 262-token SentencePiece vocabulary (byte fallback)."""
    from gguf import GGUFWriter

    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)] + [
        "\u2581".encode(), "\u2581a".encode(), b"a"]
    types = [2, 3, 3] + [6] * 256 + [1, 1, 1]
    scores = [0.0] * len(tokens)
    w = GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_gguf_bytes() -> bytes:
    """A complete tiny llama model (262 tokens, 1 layer, n_embd 16): ~30 KB, loads in ms."""
    global _gguf_base
    if _gguf_base is None:
        from tiny_model import make_tiny_llama

        d = Path(tempfile.mkdtemp(prefix="pyllama-fuzz-"))
        vocab = small_vocab_gguf(d / "vocab.gguf")
        model = make_tiny_llama(d / "tiny.gguf", vocab_from=vocab, n_embd=16, n_head=2, n_head_kv=1, n_ff=32,
                                n_layer=1, n_ctx_train=64)
        _gguf_base = model.read_bytes()
    return _gguf_base


def header_size(base: bytes) -> int:
    """Bytes before the tensor data (magic, counts, metadata, tensor infos)."""
    from gguf import GGUFReader

    d = Path(tempfile.mkdtemp(prefix="pyllama-fuzz-"))
    (d / "m.gguf").write_bytes(base)
    return GGUFReader(str(d / "m.gguf")).data_offset


_HDR: Optional[int] = None
_INTS = [0, 1, 2, 3, 7, 8, 31, 32, 255, 256, 512, 513, 1023, 1024, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
         2**62, 2**63 - 1, 2**63, 2**64 - 1]


def mutate_gguf(base: bytes, data: bytes) -> bytes:
    """Apply the mutations encoded in `data` to the header part of `base`."""
    global _HDR
    if _HDR is None:
        _HDR = header_size(base)
    buf = bytearray(base)
    i = 0
    while i + 4 <= len(data):
        op = data[i]
        pos = int.from_bytes(data[i + 1:i + 4], "little") % _HDR
        i += 4
        kind = op % 6
        if kind == 0:            # a random byte
            buf[pos] = data[i] if i < len(data) else op
            i += 1
        elif kind == 1:          # an interesting 32-bit integer
            buf[pos:pos + 4] = struct.pack("<I", _INTS[op % len(_INTS)] & 0xFFFFFFFF)
        elif kind == 2:          # an interesting 64-bit integer (counts, lengths, dims, offsets)
            buf[pos:pos + 8] = struct.pack("<Q", _INTS[op % len(_INTS)] & 0xFFFFFFFFFFFFFFFF)
        elif kind == 3:          # truncate
            del buf[max(pos, 4):]
            break
        elif kind == 4:          # flip a bit
            buf[pos] ^= 1 << (op % 8)
        else:                    # duplicate a slice
            n = data[i] if i < len(data) else 8
            i += 1
            buf[pos:pos] = buf[pos:pos + n]
    return bytes(buf)


def gguf_header(data: bytes) -> None:
    global _gguf_tmp
    from pyllama import _core

    blob = mutate_gguf(tiny_gguf_bytes(), data)
    if _gguf_tmp is None:
        fd, _gguf_tmp = tempfile.mkstemp(prefix="pyllama-fuzz-", suffix=".gguf")
        os.close(fd)
    with open(_gguf_tmp, "wb") as f:
        f.write(blob)
    # The pre-check's own metadata scanner and ggml's parser: where both read the file,
    # they must see the same keys, values and repeated tokens.
    seen = []
    for fast in (True, False):
        try:
            seen.append(_core._gguf_precheck_metadata(_gguf_tmp, fast=fast))
        except _expected() as e:
            seen.append(None)
            if "invalid GGUF" in str(e):
                # A value type outside the enum: the scanner refuses it for good, because
                # ggml's parser would read it into its gguf_type enum first (undefined
                # behaviour, reported by UBSan); do not hand it to ggml.
                return
    if seen[0] is not None and seen[1] is not None:
        def comparable(result):   # NaN != NaN: compare a NaN value as its repr
            meta, n_dup = result
            return {k: repr(v) if v != v else v for k, v in meta.items()}, n_dup

        assert comparable(seen[0]) == comparable(seen[1]), "the fast GGUF metadata scanner disagrees with ggml's parser"
    try:
        m = _core.Model(_gguf_tmp, vocab_only=bool(data[:1] and data[0] & 1 and data[0] & 2))
    except _expected():
        return
    try:
        v = m.vocab
        toks = v.tokenize("a a", add_special=True) or [0]
        v.detokenize(toks)
        if m.n_layer > 0:
            c = _core.Context(m, n_ctx=32, n_batch=8, n_threads=1)
            b = _core.Batch(8)
            b.add_sequence(toks[:8])
            c.decode(b)
            _core.SamplerChain(v).add_greedy().sample(c)
            c.close()
    except _expected():
        pass
    finally:
        m.close()


TARGETS: Dict[str, Callable[[bytes], None]] = {
    "tokenize_roundtrip": tokenize_roundtrip,
    "tokenize_spm": tokenize_spm,
    "grammar": grammar,
    "gguf_header": gguf_header,
}
