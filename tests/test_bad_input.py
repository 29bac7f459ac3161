"""Bad input never takes the interpreter down.

Every case runs in a fresh interpreter (conftest.run_python_subprocess) and must end with a
Python exception: exit status 1 (not a negative signal number such as -6 for abort or -11
for a segfault), no hang (each child has a timeout), no silent acceptance (exit status 0),
and the last line of stderr -- the exception line of the traceback -- names the problem
(the exception type and the key words of the message).

The cases run concurrently (a few children at a time) in one module-scoped fixture, then
each is checked by its own parametrized test.  A case is

    Case(id, code, exc, words)

``code`` runs after a prelude that defines TINY (a tiny random llama model), BPE (a tiny
model with the llama-bpe vocabulary), SMOL (SmolLM2, model cases only), FILES (a folder of
broken model files), ``model()`` / ``ctx(**kw)`` / ``llm(**kw)`` helpers; ``exc`` is the
exception class name(s) accepted on the last stderr line; ``words`` must all appear on it.
``exc=None`` means the code must run to completion and print OK (inputs that are valid
and must work, e.g. NUL characters in text).
"""

from __future__ import annotations

import os
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import pytest

from conftest import run_python_subprocess

TIMEOUT = 90  # per child; generous: the machine may be busy


@dataclass
class Case:
    id: str
    code: str
    exc: Union[str, Tuple[str, ...], None]
    words: Sequence[str] = ()
    model: bool = False           # needs SmolLM2 (pytest.mark.model)
    timeout: float = TIMEOUT
    marks: tuple = field(default_factory=tuple)


PRELUDE = r"""
import math, os, sys
import pyllama
from pyllama import _core, LLM
TINY = os.environ["T_TINY"]
BPE = os.environ["T_BPE"]
SMOL = os.environ.get("T_SMOL", "")
FILES = os.environ["T_FILES"]
def model(path=None, **kw):
    return _core.Model(path or TINY, **kw)
def ctx(**kw):
    kw.setdefault("n_ctx", 64)
    kw.setdefault("n_threads", 1)
    m = model()
    return m, _core.Context(m, **kw)
def decoded(n_seq_max=1, tokens=(1, 2, 3)):
    m, c = ctx(n_seq_max=n_seq_max)
    b = _core.Batch(16, n_seq_max)
    b.add_sequence(list(tokens))
    c.decode(b)
    return m, c
def llm(**kw):
    kw.setdefault("n_ctx", 64)
    kw.setdefault("n_threads", 1)
    return LLM(TINY, **kw)
def greedy(m):
    return _core.SamplerChain(m.vocab).add_greedy()
"""

MLE = "ModelLoadError"
FNF = "FileNotFoundError"
GE = "GrammarError"
JSE = "JSONSchemaError"
ITE = "InvalidTokenError"
ISE = "InvalidSequenceError"
BCE = "BatchCapacityError"
CLE = "ContextLengthError"
VE = "ValueError"
TE = "TypeError"
OE = "OverflowError"
OOM = "OutOfMemoryError"   # a ValueError and a MemoryError

N_VOCAB = 32000  # the tiny model's (llama SPM) vocabulary

CASES: list = []


def case(id: str, code: str, exc, words: Sequence[str] = (), **kw) -> None:
    CASES.append(Case(id, code, exc, tuple(words), **kw))


# --------------------------------------------------------------------------- model files
# (the files are written by the `files` fixture below; names are relative to FILES)

BROKEN_FILES = {
    # name: words expected in the message besides the path
    "empty.gguf": ["empty"],
    "one-byte.gguf": ["not a GGUF file"],
    "random.gguf": ["not a GGUF file"],
    "magic-garbage.gguf": ["version"],
    "tiny-trunc-100.gguf": ["failed to read"],
    "tiny-trunc-4k.gguf": ["failed to read"],
    "tiny-trunc-half.gguf": ["not within the file bounds"],
    "tiny-trunc-last-byte.gguf": ["not within the file bounds"],
    "tensor-past-eof.gguf": ["not within the file bounds"],
    "n-tensors-2-62.gguf": ["number of tensors"],
    "n-kv-2-62.gguf": ["number of key value pairs"],
    "n-both-max.gguf": ["number of tensors"],
    "string-length-2-63.gguf": ["string length"],
    "version-1.gguf": ["GGUFv1"],
    "version-99.gguf": ["version 99"],
    "header-only.gguf": ["architecture"],
    "unknown-arch.gguf": ["unknown model architecture", "nosucharch"],
    "block-count-0.gguf": ["block_count is 0"],
    "block-count-1000.gguf": ["block_count is 1000"],
    "experts-inconsistent.gguf": ["mixture-of-experts"],
    "rope-scaling-bogus.gguf": ["rope.scaling.type", "bogus"],
    "duplicate-tokens.gguf": ["more than once"],
    # "a" and "a\0b" are the same C string: llama.cpp reads token texts up to a NUL (found by fuzzing)
    "duplicate-tokens-nul.gguf": ["more than once"],
    # ggml's parser loads these numbers into its gguf_type enum before rejecting them
    # (undefined behaviour, found by UBSan); the pre-check's scanner refuses them first
    "value-type-invalid.gguf": ["weird.key", "invalid GGUF value type 4294901764"],
    "array-type-invalid.gguf": ["weird.key", "invalid GGUF array element type 77"],
}
SMOL_TRUNCATIONS = {  # name: (n_bytes, words)
    "smol-trunc-100.gguf": (100, ["failed to read"]),
    "smol-trunc-4k.gguf": (4096, ["failed to read"]),
    "smol-trunc-1m.gguf": (1 << 20, ["failed to read"]),
    "smol-trunc-half.gguf": ("half", ["not within the file bounds"]),
    "smol-trunc-last-byte.gguf": (-1, ["not within the file bounds"]),
}

for _name, _words in BROKEN_FILES.items():
    case(f"model-file-{_name}", f"model(os.path.join(FILES, {_name!r}))", MLE, [_name, *_words])
    case(f"llm-file-{_name}", f"LLM(os.path.join(FILES, {_name!r}), n_threads=1)", MLE, [_name, *_words])
for _name, (_n, _words) in SMOL_TRUNCATIONS.items():
    case(f"model-file-{_name}", f"model(os.path.join(FILES, {_name!r}))", MLE, [_name, *_words], model=True)
case("model-file-missing", "model(os.path.join(FILES, 'no-such.gguf'))", FNF, ["no-such.gguf"])
case("llm-file-missing", "LLM(os.path.join(FILES, 'no-such.gguf'))", FNF, ["no-such.gguf"])
case("model-file-directory", "model(FILES)", MLE, ["directory"])
case("llm-file-directory", "LLM(FILES)", MLE, ["directory"])
case("model-vocab-only-truncated", "model(os.path.join(FILES, 'tiny-trunc-last-byte.gguf'), vocab_only=True)",
     MLE, ["not within the file bounds"])
case("model-path-nul", "model('/tmp/a\\x00b.gguf')", (FNF, VE))
case("model-path-int", "model(5)", TE)
case("model-progress-cancel", "model(progress_callback=lambda p: False)", MLE, ["cancel"])
case("model-progress-raises", "model(progress_callback=lambda p: 1 / 0)", MLE, ["ZeroDivisionError"])
case("model-progress-not-callable", "model(progress_callback=5)", TE, ["callable"])
case("model-split-mode", "model(split_mode='diagonal')", VE, ["split_mode"])
case("model-tensor-split-long", "model(tensor_split=[1.0] * 10000)", VE, ["tensor_split"])
case("model-tensor-split-nan", "model(tensor_split=[float('nan')])", VE, ["tensor_split"])
case("model-device-unknown", "model(devices=['no-such-device'])", VE, ["unknown device"])
case("lora-missing", "_core.LoraAdapter(model(), os.path.join(FILES, 'no-such.gguf'))", FNF)
case("lora-not-lora", "_core.LoraAdapter(model(), TINY)", MLE, ["LoRA"])
case("lora-garbage", "_core.LoraAdapter(model(), os.path.join(FILES, 'magic-garbage.gguf'))", MLE)

# kv_overrides reach the same hyper-parameter asserts as a corrupt file
for _key, _val, _words in [
    ("llama.block_count", 0, ["block_count is 0"]),
    ("llama.block_count", -1, ["block_count is 4294967295"]),
    ("llama.block_count", 513, ["block_count is 513"]),
    ("llama.nextn_predict_layers", 3, ["nextn_predict_layers"]),
    ("llama.expert_count", 3, ["mixture-of-experts"]),
    ("llama.expert_count", 5000, ["mixture-of-experts"]),
    ("llama.expert_used_count", 2, ["mixture-of-experts"]),
    ("llama.rope.scaling.type", "bogus", ["rope.scaling.type"]),
    ("llama.embedding_length", 7, ["n_rot"]),
    ("llama.attention.head_count", 0, ["wrong shape"]),
    ("llama.feed_forward_length", 2**31 - 1, ["wrong shape"]),
    ("general.architecture", "bogus", ["unknown model architecture"]),
    ("tokenizer.ggml.model", "bogus", ["unknown tokenizer"]),
]:
    case(f"kv-override-{_key}={_val}", f"model(kv_overrides={{{_key!r}: {_val!r}}})", MLE, _words)
# A negative or NaN norm epsilon loads fine and GGML_ASSERTs (eps >= 0) at the first decode
# (found by fuzzing GGUF headers); the pre-check refuses it at load.
_DECODE = "; c = _core.Context(m, n_ctx=64, n_threads=1); b = _core.Batch(8); b.add_sequence([1, 2, 3]); c.decode(b)"
case("kv-override-negative-rms-epsilon",
     "m = model(kv_overrides={'llama.attention.layer_norm_rms_epsilon': -1.0})" + _DECODE, MLE,
     ["layer_norm_rms_epsilon is -1.0"])
case("model-file-nan-rms-epsilon", "m = model(os.path.join(FILES, 'nan-rms-eps.gguf'))" + _DECODE, MLE,
     ["layer_norm_rms_epsilon is nan"])
case("kv-override-key-too-long", "model(kv_overrides={'x' * 200: 1})", VE, ["kv_overrides key"])
case("kv-override-bad-type", "model(kv_overrides={'general.name': [1]})", TE, ["kv_overrides"])

# --------------------------------------------------------------------------- grammars

BIG_ALTERNATIVES = "'root ::= ' + ' | '.join('\"word%d\"' % i for i in range(100000))"  # ~1.3 MB
GRAMMARS = {
    # id: (python expression for the grammar text, exception, words)
    "empty": ("''", GE, ["empty"]),
    "whitespace": ("'   \\n\\t '", GE, ["empty"]),
    "comment-only": ("'# nothing\\n'", GE, []),
    "syntax-missing-def": ("'root :: \"a\"'", GE, []),
    "syntax-unclosed-group": ("'root ::= ( \"a\" '", GE, []),
    "syntax-star-alone": ("'root ::= *'", GE, ["expecting preceding item"]),
    "undefined-rule": ("'root ::= foo'", GE, ["foo"]),
    "no-root-rule": ("'start ::= \"a\"'", GE, ["root"]),
    "unterminated-string": ("'root ::= \"abc'", GE, []),
    "unterminated-class": ("'root ::= [a-z'", GE, []),
    "bad-escape": ("'root ::= \"\\\\q\"'", GE, []),
    "bad-hex-escape": ("'root ::= \"\\\\xZZ\"'", GE, ["hex"]),
    "left-recursion": ("'root ::= root \"a\" | \"b\"'", GE, ["left recursion"]),
    "left-recursion-indirect": ("'root ::= a\\na ::= root \"x\" | \"y\"'", GE, ["left recursion"]),
    "repetition-reversed": ("'root ::= \"a\"{5,2}'", GE, ["{5,2}"]),
    "repetition-huge": ("'root ::= \"a\"{99999999999999999999999}'", GE, []),
    "repetition-big": ("'root ::= \"a\"{100000000}'", GE, []),
    "range-reversed": ("'root ::= [z-a]'", GE, ["reversed"]),
    "deep-nesting": ("'root ::= ' + '(' * 5000 + '\"a\"' + ')' * 5000", GE, ["nested"]),
    "long-rule-chain": ("'\\n'.join(['root ::= r0'] + ['r%d ::= r%d' % (i, i + 1) for i in range(20000)] "
                        "+ ['r20000 ::= \"a\"'])", GE, ["chain"]),
    "token-out-of-range": ("'root ::= <[999999]>'", GE, ["999999"]),
    "token-negative": ("'root ::= <[-1]>'", GE, []),
    "token-unknown-text": ("'root ::= <not-a-token>'", GE, []),
    "nul-character": ("'root ::= \"a\\x00\"'", (GE, VE), ["NUL"]),
    "lone-surrogate": ("'root ::= \"\\ud800\"'", (GE, VE), ["surrogate"]),
    "not-text": ("12345", TE, []),
    "very-large-1mb": (BIG_ALTERNATIVES, GE, ["parse stacks"]),
}
# llama.cpp needs time quadratic in the number of alternatives that can start the output
# (std::find over its stacks): minutes for these 100k; precheck_gbnf bounds them.
for _gid, (_expr, _exc, _words) in GRAMMARS.items():
    _big = dict(timeout=30) if _gid == "very-large-1mb" else {}
    case(f"grammar-sampler-{_gid}", f"m = model(); _core.SamplerChain(m.vocab).add_grammar({_expr}).add_greedy()",
         _exc, _words, **_big)
    if _gid != "not-text":
        case(f"grammar-llm-{_gid}", f"llm(grammar={_expr})", _exc, _words, **_big)
        if not _big:
            case(f"grammar-call-{_gid}", f"llm().complete('hi', max_tokens=1, grammar={_expr})", _exc, _words)
case("grammar-validate-syntax", "_core.validate_grammar(model().vocab, 'root ::= (')", GE)
case("grammar-root-missing", "_core.SamplerChain(model().vocab).add_grammar('root ::= \"a\"', root='nosuch')",
     GE, ["nosuch"])
case("grammar-root-empty", "_core.SamplerChain(model().vocab).add_grammar('root ::= \"a\"', root='')", GE, ["root"])
case("grammar-lazy-bad-regex", "_core.SamplerChain(model().vocab).add_grammar_lazy('root ::= \"a\"', "
     "trigger_patterns=['(['])", GE, ["regular expression"])
case("grammar-lazy-unbalanced-brace", "_core.SamplerChain(model().vocab).add_grammar_lazy('root ::= \"a\"', "
     "trigger_patterns=['a{2,1}'])", GE, ["regular expression"])
case("grammar-lazy-lookbehind", "_core.SamplerChain(model().vocab).add_grammar_lazy('root ::= \"a\"', "
     "trigger_patterns=['(?<=x)a'])", GE, ["regular expression"])
case("grammar-lazy-no-trigger", "_core.SamplerChain(model().vocab).add_grammar_lazy('root ::= \"a\"')", GE, ["trigger"])
case("grammar-lazy-bad-token", "_core.SamplerChain(model().vocab).add_grammar_lazy('root ::= \"a\"', "
     f"trigger_tokens=[{N_VOCAB}])", ITE, [str(N_VOCAB)])
case("grammar-path-missing", "llm(grammar_path=os.path.join(FILES, 'no-such.gbnf'))", FNF, ["no-such.gbnf"])
case("grammar-path-directory", "llm(grammar_path=FILES)", (OSError.__name__, "IsADirectoryError"))
case("grammar-and-schema", "llm(grammar='root ::= \"a\"', json_schema={})", VE, ["only one"])
case("grammar-with-ignore-eos", "llm(grammar='root ::= \"a\"', ignore_eos=True)", VE, ["ignore_eos"])
case("grammar-accept-forbidden", "m = model(); s = _core.SamplerChain(m.vocab).add_grammar('root ::= \"a\"')"
     ".add_greedy(); s.accept(m.vocab.tokenize('zzz', False)[0])", GE, ["not allowed"])
case("grammar-everything-biased-away",
     "llm().complete('hi', max_tokens=3, grammar='root ::= \"a\"+', "
     f"logit_bias={{i: float('-inf') for i in range({N_VOCAB})}})", GE, ["grammar"])
case("grammar-in-sampler-chain",
     "m = model(); s = _core.SamplerChain(m.vocab).add_grammar('root ::= \"a\"').add_greedy(); "
     "_core.GenerationRequest([1], s)", VE, ["grammar"])

# --------------------------------------------------------------------------- JSON schemas

SCHEMAS = {  # id: (schema, the keyword the message must name)
    "not": ({"not": {"type": "string"}}, "not"),
    "if-then-else": ({"if": {"type": "string"}, "then": {"minLength": 1}, "else": {"type": "number"}}, "if"),
    "patternProperties": ({"type": "object", "patternProperties": {"^a": {"type": "string"}}}, "patternProperties"),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    "multipleOf": ({"type": "integer", "multipleOf": 3}, "multipleOf"),
    "contains": ({"type": "array", "contains": {"type": "string"}}, "contains"),
    "propertyNames": ({"type": "object", "propertyNames": {"pattern": "^x"}}, "propertyNames"),
    "dependentRequired": ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
    "minProperties": ({"type": "object", "minProperties": 2}, "minProperties"),
    "nested-not": ({"type": "object", "properties": {"a": {"type": "array", "items": {"not": {}}}}}, "not"),
}
for _sid, (_schema, _kw) in SCHEMAS.items():
    case(f"json-schema-{_sid}", f"from pyllama.grammar import json_schema_to_gbnf; json_schema_to_gbnf({_schema!r})",
         JSE, [_kw])
    case(f"json-schema-llm-{_sid}", f"llm(json_schema={_schema!r})", JSE, [_kw])
case("json-schema-not-json", "from pyllama.grammar import json_schema_to_gbnf; json_schema_to_gbnf('{not json')",
     JSE, ["JSON"])
case("json-schema-bad-type", "from pyllama.grammar import json_schema_to_gbnf; json_schema_to_gbnf({'type': 'nosuch'})",
     JSE, ["nosuch"])

# --------------------------------------------------------------------------- token ids

for _tok, _excs in [(-1, ITE), (N_VOCAB, ITE), (2**31, (ITE, OE)), (2**63, (ITE, OE))]:
    _w = [str(_tok)] if _excs == ITE else []
    case(f"detokenize-{_tok}", f"model().vocab.detokenize([1, {_tok}])", _excs, _w)
    case(f"token-to-piece-{_tok}", f"model().vocab.token_to_piece({_tok})", _excs, _w)
    case(f"token-text-{_tok}", f"model().vocab.token_text({_tok})", _excs, _w)
    case(f"batch-add-{_tok}", f"m, c = ctx(); b = _core.Batch(8); b.add({_tok}, 0, 0, True); c.decode(b)", _excs, _w)
    case(f"batch-add-sequence-{_tok}", f"m, c = ctx(); b = _core.Batch(8); b.add_sequence([1, {_tok}]); c.decode(b)",
         _excs, _w)
    case(f"batch-from-arrays-{_tok}", f"m, c = ctx(); c.decode(_core.Batch.from_arrays([1, {_tok}], [0, 1], [0, 0]))",
         _excs, _w)
    case(f"generation-request-{_tok}", f"m = model(); _core.GenerationRequest([1, {_tok}], greedy(m))", _excs, _w)
    case(f"stop-tokens-{_tok}", f"m = model(); _core.GenerationRequest([1], greedy(m), stop_tokens=[{_tok}])", _excs, _w)
    case(f"llm-complete-tokens-{_tok}", f"llm().complete([1, {_tok}], max_tokens=2)", _excs, _w)
    case(f"llm-logit-bias-{_tok}", f"llm().complete('hi', max_tokens=2, logit_bias={{{_tok}: 1.0}})", _excs, _w)
    case(f"sampler-accept-{_tok}", f"m = model(); s = _core.SamplerChain(m.vocab).add_penalties().add_greedy(); "
         f"s.accept({_tok})", _excs, _w)
    case(f"state-save-tokens-{_tok}", f"m, c = ctx(); c.state_save_file(os.path.join(os.environ['T_TMP'], 's.bin'), "
         f"[1, {_tok}])", _excs, _w)
case("detokenize-float", "model().vocab.detokenize(['x'])", TE)
case("detokenize-none", "model().vocab.detokenize(None)", TE)

# --------------------------------------------------------------------------- sequences, batches, logits

case("batch-seq-id-beyond-batch", "b = _core.Batch(8, 4); b.add(1, 0, 4, True)", ISE, ["4"])
case("batch-seq-id-negative", "b = _core.Batch(8, 4); b.add(1, 0, -1, True)", ISE, ["-1"])
case("batch-seq-id-2-31", "b = _core.Batch(8, 4); b.add(1, 0, 2**31, True)", (ISE, OE))
case("batch-seq-id-beyond-context", "m, c = ctx(n_seq_max=2); b = _core.Batch(8, 4); b.add(1, 0, 3, True); c.decode(b)",
     ISE, ["3", "n_seq_max=2"])
case("batch-too-many-seq-ids", "b = _core.Batch(8, 2); b.add(1, 0, [0, 1, 1], True)", ISE)
case("batch-add-sequence-seq-id", "b = _core.Batch(8, 2); b.add_sequence([1, 2], seq_id=2)", ISE, ["2"])
case("batch-over-n-batch", "m, c = ctx(n_batch=8); b = _core.Batch(16); b.add_sequence([1] * 16); c.decode(b)",
     BCE, ["16", "n_batch=8"])
case("batch-full", "b = _core.Batch(2); b.add_sequence([1, 2, 3])", BCE, ["3"])
case("batch-full-add", "b = _core.Batch(1); b.add(1, 0); b.add(2, 1)", BCE, ["full"])
case("batch-empty-decode", "m, c = ctx(); c.decode(_core.Batch(8))", VE, ["empty"])
case("batch-empty-sequence", "_core.Batch(8).add_sequence([])", VE, ["at least one"])
case("batch-capacity-0", "_core.Batch(0)", VE, ["capacity"])
case("batch-capacity-negative", "_core.Batch(-5)", VE, ["capacity"])
case("batch-capacity-huge", "_core.Batch(2**31 - 1)", BCE, ["too large"])
case("batch-capacity-huge-seqs", "_core.Batch(1 << 20, 256)", BCE, ["too large"])
case("batch-capacity-overflow", "_core.Batch(2**40)", OE)
case("batch-n-seq-max-0", "_core.Batch(4, 0)", VE, ["n_seq_max"])
case("batch-n-seq-max-huge", "_core.Batch(4, 10**6)", VE, ["n_seq_max"])
case("batch-position-negative", "b = _core.Batch(8); b.add(1, -3, 0, True)", VE, ["-3"])
case("batch-position-beyond-context", "m, c = ctx(); b = _core.Batch(8); b.add(1, 10**6, 0, True); c.decode(b)",
     CLE, ["1000000"])
case("batch-position-gap", "m, c = ctx(); b = _core.Batch(8); b.add(1, 0, 0); b.add(1, 5, 0, True); c.decode(b)",
     "DecodeError", ["llama_decode"])
case("batch-arrays-mismatch", "_core.Batch.from_arrays([1, 2], [0], [0, 0])", VE, ["same length"])
case("logits-index-out-of-range", "m, c = decoded(); c.logits(5)", "IndexError", ["5"])
case("logits-index-negative", "m, c = decoded(); c.logits(-2)", "IndexError", ["-2"])
case("logits-index-not-requested", "m, c = decoded(); c.logits(0)", "IndexError", ["did not request"])
case("logits-before-decode", "m, c = ctx(); c.logits()", "IndexError", ["no outputs"])
case("logits-index-2-31", "m, c = decoded(); c.logits(2**31)", (OE, "IndexError"))
case("logits-view-then-decode", "m, c = decoded(); v = c.logits(copy=False); b = _core.Batch(8); "
     "b.add(4, 3, 0, True); c.decode(b)", "BufferError", ["views"])
case("logits-view-then-close", "m, c = decoded(); v = c.logits(copy=False); c.close()", "BufferError", ["views"])
case("logits-view-writable", "import numpy as np; m, c = decoded(); v = c.logits(copy=False); v[0] = 1.0",
     VE, ["read-only"])
case("embeddings-not-enabled", "m, c = decoded(); c.embeddings()", "IndexError", ["embedding"])
case("embeddings-seq-out-of-range", "m, c = decoded(); c.embeddings_seq(3)", ISE, ["3"])
case("sample-index-out-of-range", "m, c = decoded(); greedy(m).sample(c, 7)", "IndexError", ["7"])
case("sample-before-decode", "m, c = ctx(); greedy(m).sample(c)", "IndexError", ["no outputs"])
case("sample-no-selector", "m, c = decoded(); _core.SamplerChain(m.vocab).add_top_k(5).sample(c)", VE, ["selecting"])
case("sample-closed-context", "m, c = decoded(); s = greedy(m); c.close(); s.sample(c)", VE, ["closed"])
case("sample-other-vocabulary", "m, c = decoded(); m2 = model(BPE, vocab_only=True); "
     "_core.SamplerChain(m2.vocab).add_greedy().sample(c)", VE, ["vocabulary"])
for _meth in ["kv_seq_rm(5)", "kv_seq_cp(0, 3)", "kv_seq_keep(7)", "kv_seq_pos_max(2)", "seq_state_get(9)",
              "seq_state_set(b'x', 4)", "kv_seq_add(5, 0, 1, 1)"]:
    case(f"context-seq-id-{_meth}", f"m, c = ctx(n_seq_max=2); c.{_meth}", ISE, ["outside"])
case("state-set-garbage", "m, c = ctx(); c.state_set(os.urandom(100000))", VE, ["state"])
case("state-set-empty", "m, c = ctx(); c.state_set(b'')", VE, ["empty"])
case("seq-state-set-garbage", "m, c = ctx(); c.seq_state_set(os.urandom(1000), 0)", VE, ["state"])
case("state-load-garbage", "p = os.path.join(os.environ['T_TMP'], 'g.bin'); open(p, 'wb').write(os.urandom(5000)); "
     "m, c = ctx(); c.state_load_file(p)", VE, ["g.bin"])
case("state-load-missing", "m, c = ctx(); c.state_load_file('/no/such/state.bin')", FNF, ["state.bin"])
case("state-save-bad-dir", "m, c = ctx(); c.state_save_file('/no/such/dir/state.bin')", "OSError", ["state.bin"])
case("engine-n-slots", "m, c = ctx(); _core.Engine(c, 5)", VE, ["n_slots"])
case("engine-other-model", "m, c = ctx(); m2 = model(BPE, vocab_only=True); "
     "_core.Engine(c).submit(_core.GenerationRequest([1], greedy(m2)))", VE, ["another model"])
case("engine-request-reused", "m, c = ctx(); e = _core.Engine(c); r = _core.GenerationRequest([1], greedy(m), "
     "max_tokens=1); e.run([r]); e.run([r])", VE, ["already"])
case("engine-prompt-too-long", "m, c = ctx(); _core.Engine(c).submit(_core.GenerationRequest([1] * 1000, greedy(m)))",
     CLE, ["1000"])
case("engine-closed-context", "m, c = ctx(); e = _core.Engine(c); c.close(); "
     "e.run([_core.GenerationRequest([1], greedy(m), max_tokens=1)])", VE, ["closed"])
case("generation-request-empty", "m = model(); _core.GenerationRequest([], greedy(m))", VE, ["empty"])
case("generation-request-no-selector", "m = model(); _core.GenerationRequest([1], _core.SamplerChain(m.vocab))",
     VE, ["selecting"])
case("generation-request-empty-stop", "m = model(); _core.GenerationRequest([1], greedy(m), stop=[''])", VE, ["stop"])

# --------------------------------------------------------------------------- text

case("tokenize-invalid-utf8", "model().vocab.tokenize(b'ab\\xff\\xfecd')", VE, ["UTF-8"])
case("tokenize-truncated-utf8", "model(BPE, vocab_only=True).vocab.tokenize(b'ab\\xc3')", VE, ["UTF-8"])
case("tokenize-lone-surrogate", "model().vocab.tokenize('a\\ud800b')", VE, ["surrogate"])
case("tokenize-lone-surrogate-bpe", "model(BPE, vocab_only=True).vocab.tokenize('\\udfff')", VE, ["surrogate"])
case("tokenize-not-text", "model().vocab.tokenize(5)", TE, ["str or bytes"])
case("llm-prompt-invalid-utf8", "llm().complete(b'\\xff', max_tokens=2)", VE, ["UTF-8"])
case("llm-prompt-lone-surrogate", "llm().complete('\\udc80', max_tokens=2)", VE, ["surrogate"])
case("llm-prompt-too-long", "llm().complete('hello ' * 400, max_tokens=2)", CLE, ["402", "n_ctx"])
case("llm-stream-prompt-too-long", "list(llm().stream('hello ' * 400, max_tokens=2))", CLE, ["402"])
case("llm-generate-prompt-too-long", "llm().generate(['a', 'hello ' * 400], max_tokens=2)", CLE, ["402"])
case("llm-generate-prompt-plus-max-tokens", "llm().generate(['a', 'hello ' * 100], max_tokens=200)", CLE, ["n_ctx"])
case("llm-prompt-empty-no-bos", "llm().complete('', add_special=False, max_tokens=2)", VE, ["empty"])
case("llm-prompt-token-list-empty", "llm().complete([], max_tokens=2)", VE, ["empty"])
case("llm-prompt-none", "llm().complete(None)", TE)
case("llm-generate-string", "llm().generate('abc')", TE, ["list of prompts"])
case("chat-template-unknown", "_core.apply_builtin_chat_template('no-such-template', [{'role': 'user', 'content': 'x'}])",
     VE, ["no-such-template"])
case("chat-template-nul", "_core.apply_builtin_chat_template('chatml', [{'role': 'user', 'content': 'a\\x00b'}])",
     VE, ["NUL"])
case("chat-message-missing-content", "_core.apply_builtin_chat_template('chatml', [{'role': 'user'}])", "KeyError")

# --------------------------------------------------------------------------- parameters

for _kw, _exc, _words in [
    ("n_ctx=-1", VE, ["n_ctx"]), ("n_ctx=2**40", (VE, OE), []), ("n_ctx=2**30", OOM, ["n_ctx", "GiB"]),
    ("n_ctx='big'", VE, ["n_ctx"]), ("n_batch=0", VE, ["n_batch"]), ("n_batch=-1", VE, ["n_batch"]),
    ("n_ubatch=0", VE, ["n_ubatch"]), ("n_threads=0", VE, ["n_threads"]), ("n_threads=-3", VE, ["n_threads"]),
    ("n_threads=10**6", VE, ["n_threads"]), ("n_parallel=0", VE, ["n_parallel"]),
    ("n_parallel=10**6", VE, ["n_seq_max"]), ("n_gpu_layers=-5", VE, ["n_gpu_layers"]),
    ("type_k='q9'", VE, ["q9"]), ("type_v='int8'", VE, ["int8"]), ("flash_attn='maybe'", VE, ["flash_attn"]),
    ("rope_freq_base=float('nan')", VE, ["rope_freq_base"]), ("rope_freq_scale=-1.0", VE, ["rope_freq"]),
    ("temperature=float('nan')", VE, ["temperature", "nan"]), ("temperature=-1", VE, ["temperature"]),
    ("top_p=2", VE, ["top_p", "2"]), ("top_p=0", VE, ["top_p"]), ("top_k=-1", VE, ["top_k"]),
    ("min_p=1.5", VE, ["min_p"]), ("typical_p=0", VE, ["typical_p"]), ("max_tokens=-5", VE, ["max_tokens", "-5"]),
    ("max_tokens='5'", TE, ["max_tokens"]), ("seed=2**40", VE, ["seed"]), ("seed=-2", VE, ["seed", "-2"]),
    ("seed=1.5", TE, ["seed"]), ("mirostat_mode=3", VE, ["mirostat_mode"]),
    ("repeat_penalty=0", VE, ["repeat_penalty"]), ("repeat_penalty=float('inf')", VE, ["repeat_penalty"]),
    ("last_n_tokens_size=-5", VE, ["last_n_tokens_size"]), ("stop=['']", VE, ["stop"]),
    ("logit_bias={5: float('nan')}", VE, ["logit_bias"]), ("logit_bias={5: float('inf')}", VE, ["logit_bias"]),
    ("logit_bias={'a': 1.0}", TE, ["logit_bias"]),
    ("temprature=0.5", TE, ["temprature", "temperature"]), ("foo=1", TE, ["foo"]),
    ("split_mode='diagonal'", VE, ["split_mode"]),
    ("lora_path='/no/such/lora.gguf'", FNF, ["lora.gguf"]), ("rpc_servers='nohost'", (VE, "RuntimeError"), []),
]:
    case(f"llm-init-{_kw}", f"llm({_kw})", _exc, _words)
for _kw, _exc, _words in [
    ("temperature=float('nan')", VE, ["temperature"]), ("top_p=2", VE, ["top_p"]), ("max_tokens=-5", VE, ["max_tokens"]),
    ("seed=2**40", VE, ["seed"]), ("seed=-2", VE, ["seed"]), ("temprature=0.5", TE, ["temprature"]),
    ("n_ctx=128", TE, ["n_ctx"]), ("top_k=1.5", VE, ["top_k"]),
]:
    case(f"llm-call-{_kw}", f"llm().complete('hi', {_kw})", _exc, _words)
    case(f"llm-stream-{_kw}", f"list(llm().stream('hi', {_kw}))", _exc, _words)
case("llm-generate-n-parallel-0", "llm().generate(['a', 'b'], n_parallel=0, max_tokens=1)", VE, ["n_parallel"])
case("llm-generate-per-prompt-length", "llm().generate(['a', 'b'], per_prompt=[{}], max_tokens=1)", VE, ["per_prompt"])
case("llm-closed", "l = llm(); l.close(); l.complete('hi')", ("ValueError", "ClosedError"), ["closed"])
case("llm-vocab-only-complete", "LLM(TINY, vocab_only=True).complete('hi')", VE, ["vocab_only"])
case("llm-embed-not-enabled", "llm().embed('hi')", VE, ["embedding=True"])
for _kw, _exc, _words in [
    ("n_seq_max=0", VE, ["n_seq_max"]), ("n_seq_max=10**6", VE, ["n_seq_max"]), ("type_k='q9'", VE, ["q9"]),
    ("n_ctx=-1", VE, ["n_ctx"]), ("n_ctx=3", VE, ["n_ctx"]), ("n_batch=0", VE, ["n_batch"]),
    ("n_ubatch=0", VE, ["n_ubatch"]), ("n_threads=0", VE, ["n_threads"]), ("pooling='max'", VE, ["pooling"]),
    ("type_v='q4_0', flash_attn=False", VE, ["flash_attn"]),
]:
    case(f"context-{_kw}", f"_core.Context(model(), {_kw})", _exc, _words)
case("context-mean-pooling-uneven-split", "_core.Context(model(), n_ctx=256, n_threads=1, embeddings=True, "
     "pooling='mean', n_seq_max=3)", VE, ["split evenly", "n_seq_max=3"])
case("ok-context-mean-pooling-even-split", "m = model(); c = _core.Context(m, n_ctx=256, n_threads=1, embeddings=True, "
     "pooling='mean', n_seq_max=4); b = _core.Batch(8, 4); b.add_sequence([1, 2], seq_id=3); c.decode(b); "
     "assert c.embeddings_seq(3).shape == (m.n_embd,); print('OK')", None)
case("context-vocab-only-model", "_core.Context(model(vocab_only=True), n_ctx=64)", VE)
case("context-closed-model", "m = model(); m.close(); _core.Context(m)", VE, ["closed"])
case("context-set-threads-0", "m, c = ctx(); c.set_threads(0)", VE, ["thread"])
case("context-encode-decoder-only", "m, c = ctx(); b = _core.Batch(8); b.add_sequence([1]); c.encode(b)", VE, ["encoder"])
for _stage, _exc, _words in [
    ("add_top_k(-1)", VE, ["top_k"]), ("add_top_k(2**31)", OE, []), ("add_top_p(float('nan'))", VE, ["top_p"]),
    ("add_top_p(2)", VE, ["top_p"]), ("add_top_p(0.5, min_keep=-1)", OE, []), ("add_min_p(2)", VE, ["min_p"]),
    ("add_typical(0)", VE, ["typical_p"]), ("add_temp(float('nan'))", VE, ["temperature"]),
    ("add_temp(-1)", VE, ["temperature"]), ("add_temp_ext(1, float('nan'), 1)", VE, ["dynatemp"]),
    ("add_xtc(2, 0.1)", VE, ["xtc"]), ("add_top_n_sigma(float('inf'))", VE, ["top_n_sigma"]),
    ("add_mirostat(0, 5, 0.1, m=0)", VE, ["mirostat"]), ("add_mirostat_v2(0, float('nan'), 0.1)", VE, ["mirostat_tau"]),
    ("add_penalties(last_n=-5)", VE, ["last_n"]), ("add_penalties(repeat=0)", VE, ["repeat_penalty"]),
    ("add_dry(1.0, base=0.5)", VE, ["dry_base"]), ("add_dry(1.0, seq_breakers=[''])", VE, ["breaker"]),
    ("add_dry(1.0, seq_breakers=['\\x00'])", VE, ["NUL"]), ("add_dry(float('nan'))", VE, ["dry_multiplier"]),
    (f"add_logit_bias({{{N_VOCAB}: 1}})", ITE, [str(N_VOCAB)]), ("add_logit_bias({5: float('inf')})", VE, ["logit_bias"]),
    ("add_dist(2**40)", VE, ["seed"]), ("add_dist(-2)", VE, ["seed"]), ("add_dist(1.5)", TE, ["seed"]),
]:
    case(f"sampler-{_stage}", f"_core.SamplerChain(model().vocab).{_stage}", _exc, _words)

# --------------------------------------------------------------------------- must work (no exception)

case("ok-tokenize-nul", "v = model().vocab; t = v.tokenize('a\\x00b', add_special=False); "
     "assert v.detokenize(t) == 'a\\x00b', repr(v.detokenize(t)); print('OK')", None)
case("ok-tokenize-nul-bpe", "v = model(BPE, vocab_only=True).vocab; t = v.tokenize('a\\x00b', add_special=False); "
     "assert v.detokenize(t) == 'a\\x00b', repr(v.detokenize(t)); print('OK')", None)
case("ok-llm-prompt-nul", "t = llm().complete('a\\x00b', max_tokens=2, temperature=0).text; "
     "assert isinstance(t, str); print('OK')", None)
case("ok-model-closed-under-context", "m, c = decoded(); m.close(); assert m.closed; b = _core.Batch(8); "
     "b.add(4, 3, 0, True); c.decode(b); c.close(); print('OK')", None)
case("ok-model-closed-under-engine", "m, c = ctx(); e = _core.Engine(c); s = greedy(m); m.close(); "
     "r = _core.GenerationRequest([1, 2], s, max_tokens=3); e.run([r]); assert len(r.tokens) == 3; print('OK')", None)
case("ok-model-closed-under-grammar", "m = model(); a = m.vocab.tokenize('a', add_special=False)[-1]; "
     "s = _core.SamplerChain(m.vocab).add_grammar('root ::= \" a\"+').add_greedy(); m.close(); "
     "s.accept(a); s.accept(a); s.reset(); del s; import gc; gc.collect(); assert m.closed; print('OK')", None)
case("ok-model-closed-then-vocab", "m = model(); v = m.vocab; m.close(); "
     "exec('try:\\n v.tokenize(\"hi\")\\nexcept ValueError:\\n print(\"OK\")')", None)
case("ok-vocab-only-properties", "m = model(vocab_only=True); "
     "[getattr(m, a) for a in ('metadata', 'description', 'size', 'n_params', 'n_ctx_train', 'n_embd', 'n_layer', "
     "'n_head', 'n_head_kv', 'has_encoder', 'is_recurrent')]; print('OK')", None)
case("ok-all-tokens-biased-away", "m, c = decoded(); s = _core.SamplerChain(m.vocab).add_logit_bias("
     f"{{i: float('-inf') for i in range({N_VOCAB})}}).add_top_k(40).add_top_p(0.9).add_temp(0.8).add_dist(1); "
     "t = s.sample(c); assert 0 <= t < m.vocab.n_tokens; print('OK')", None)
case("ok-huge-text", "t = model().vocab.tokenize('a ' * 500_000); assert len(t) > 500_000; print('OK')", None)
case("ok-dry-many-breakers", "m, c = decoded(); s = _core.SamplerChain(m.vocab).add_dry(1.0, seq_breakers=['x' * 1000] * 1000)"
     ".add_greedy(); s.sample(c); print('OK')", None)
case("ok-mirostat-huge-m", "m, c = decoded(); s = _core.SamplerChain(m.vocab).add_mirostat(1, 5.0, 0.1, m=10**9); "
     "s.sample(c); print('OK')", None)
case("ok-kv-override-wrong-type-ignored", "m = model(kv_overrides={'llama.block_count': 'two'}); print('OK')", None)


# --------------------------------------------------------------------------- the broken files


def _write_broken_files(folder: Path, tiny: Path, smol: Optional[Path]) -> None:
    import numpy as np
    from tiny_model import make_garbage_gguf, make_tensor_past_eof, make_tiny_llama, make_truncated, make_unknown_arch

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.gguf").write_bytes(b"")
    (folder / "one-byte.gguf").write_bytes(b"G")
    (folder / "random.gguf").write_bytes(np.random.default_rng(1).integers(0, 256, 10000, dtype=np.uint8).tobytes())
    make_garbage_gguf(folder / "magic-garbage.gguf")
    size = tiny.stat().st_size
    make_truncated(tiny, folder / "tiny-trunc-100.gguf", 100)
    make_truncated(tiny, folder / "tiny-trunc-4k.gguf", 4096)
    make_truncated(tiny, folder / "tiny-trunc-half.gguf", size // 2)
    make_truncated(tiny, folder / "tiny-trunc-last-byte.gguf", -1)
    make_tensor_past_eof(folder / "tensor-past-eof.gguf")
    head = struct.pack("<4sI", b"GGUF", 3)
    (folder / "n-tensors-2-62.gguf").write_bytes(head + struct.pack("<QQ", 2**62, 0) + bytes(64))
    (folder / "n-kv-2-62.gguf").write_bytes(head + struct.pack("<QQ", 0, 2**62) + bytes(64))
    (folder / "n-both-max.gguf").write_bytes(head + struct.pack("<QQ", 2**64 - 1, 2**64 - 1) + bytes(64))
    real = tiny.read_bytes()[:4096]
    (folder / "string-length-2-63.gguf").write_bytes(real[:24] + struct.pack("<Q", 2**63) + real[32:])
    (folder / "version-1.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 1, 0, 0) + bytes(64))
    (folder / "version-99.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 99, 0, 0) + bytes(64))
    (folder / "header-only.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    make_unknown_arch(folder / "unknown-arch.gguf")

    def gguf_string(b: bytes) -> bytes:
        return struct.pack("<Q", len(b)) + b

    arch_kv = gguf_string(b"general.architecture") + struct.pack("<I", 8) + gguf_string(b"llama")
    (folder / "value-type-invalid.gguf").write_bytes(
        head + struct.pack("<QQ", 0, 2) + arch_kv + gguf_string(b"weird.key") + struct.pack("<I", 0xFFFF0004) + bytes(8))
    (folder / "array-type-invalid.gguf").write_bytes(
        head + struct.pack("<QQ", 0, 2) + arch_kv + gguf_string(b"weird.key") + struct.pack("<IIQ", 9, 77, 1)
        + bytes(8))
    small = dict(n_layer=1)
    for name, n in (("block-count-0.gguf", 0), ("block-count-1000.gguf", 1000)):
        make_tiny_llama(folder / name, **small)
        _patch_u32(folder / name, "llama.block_count", n)
    make_tiny_llama(folder / "experts-inconsistent.gguf", extra_kv={"llama.expert_count": 4}, **small)
    make_tiny_llama(folder / "rope-scaling-bogus.gguf", extra_kv={"llama.rope.scaling.type": "bogus"}, **small)
    make_tiny_llama(folder / "nan-rms-eps.gguf", rms_eps=float("nan"), **small)
    make_tiny_llama(folder / "duplicate-tokens.gguf", vocab_from=_duplicate_token_vocab(folder / "dup-vocab.gguf"),
                    **small)
    make_tiny_llama(folder / "duplicate-tokens-nul.gguf",
                    vocab_from=_duplicate_token_vocab(folder / "dup-vocab-nul.gguf", second=b"a\0b"), **small)
    if smol is not None:
        smol_size = smol.stat().st_size
        for name, (n, _words) in SMOL_TRUNCATIONS.items():
            make_truncated(smol, folder / name, smol_size // 2 if n == "half" else n)


def _duplicate_token_vocab(path: Path, second: bytes = b"a") -> Path:
    """A vocabulary-only GGUF in which two tokens have the same text (llama.cpp asserts)."""
    from gguf import GGUFWriter

    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)] + [b"a", second]
    w = GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([2, 3, 3] + [6] * 256 + [1, 1])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _patch_u32(path: Path, key: str, value: int) -> None:
    """Overwrite the value of a UINT32 metadata key in place (the writer refuses duplicate keys)."""
    data = bytearray(path.read_bytes())
    k = key.encode()
    needle = struct.pack("<Q", len(k)) + k + struct.pack("<I", 4)  # GGUF type 4 = UINT32
    at = data.find(needle)
    assert at > 0, f"{key} not found as UINT32 in {path}"
    at += len(needle)
    data[at:at + 4] = struct.pack("<I", value)
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def bad_input_results(tmp_path_factory, tiny_model_factory, vocab_dir, request):
    from tiny_model import VOCAB_DIR

    tiny = tiny_model_factory()
    bpe = tiny_model_factory(vocab_from=VOCAB_DIR / "ggml-vocab-llama-bpe.gguf")
    smol = None
    skip_model = "no model case selected"
    if any(c.model for c in _selected_cases(request)):
        try:
            smol = request.getfixturevalue("smollm2_path")
        except pytest.skip.Exception as e:  # PYLLAMA_OFFLINE=1 and not cached: skip those cases only
            skip_model = str(e)
    folder = tmp_path_factory.mktemp("broken-models")
    _write_broken_files(folder, tiny, smol)
    env = {"T_TINY": str(tiny), "T_BPE": str(bpe), "T_FILES": str(folder), "T_SMOL": str(smol or ""),
           "T_TMP": str(tmp_path_factory.mktemp("bad-input-tmp"))}
    cases = [c for c in _selected_cases(request) if smol is not None or not c.model]

    def run(c: Case):
        try:
            return run_python_subprocess(PRELUDE + c.code, timeout=c.timeout, env=env)
        except BaseException as e:  # pytest.fail on timeout raises Failed (a BaseException)
            return e

    workers = max(2, min(4, 2 * (os.cpu_count() or 1)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = dict(zip((c.id for c in cases), pool.map(run, cases)))
    results["__skip_model__"] = skip_model
    return results


def _selected_cases(request) -> list:
    """The cases whose tests pytest selected (so `-k grammar` runs only those children)."""
    ids = set()
    for item in request.session.items:
        if item.module is request.module and hasattr(item, "callspec") and "bad_case" in item.callspec.params:
            ids.add(item.callspec.params["bad_case"].id)
    return [c for c in CASES if c.id in ids] or list(CASES)


def _params():
    out = []
    for c in CASES:
        marks = list(c.marks)
        if c.model:
            marks.append(pytest.mark.model)
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


def _ids_unique():
    ids = [c.id for c in CASES]
    dupes = {i for i in ids if ids.count(i) > 1}
    assert not dupes, dupes


_ids_unique()


@pytest.mark.parametrize("bad_case", _params())
def test_bad_input(bad_case: Case, bad_input_results) -> None:
    if bad_case.id not in bad_input_results and bad_case.model:
        pytest.skip(bad_input_results["__skip_model__"])
    res = bad_input_results[bad_case.id]
    if isinstance(res, BaseException):
        raise res  # timed out: the child hung
    out, err = res.stdout, res.stderr
    tail = f"\n--- code ---\n{bad_case.code[:2000]}\n--- stdout ---\n{out[-2000:]}\n--- stderr ---\n{err[-3000:]}"
    assert res.returncode >= 0, f"the interpreter died with signal {-res.returncode}{tail}"
    if bad_case.exc is None:
        assert res.returncode == 0 and "OK" in out, f"valid input failed (exit {res.returncode}){tail}"
        return
    assert res.returncode != 0, f"bad input was silently accepted{tail}"
    assert res.returncode == 1, f"exit status {res.returncode}, expected 1 (a Python exception){tail}"
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    excs = (bad_case.exc,) if isinstance(bad_case.exc, str) else bad_case.exc
    name = last.split(":", 1)[0].rsplit(".", 1)[-1]
    assert name in excs, f"expected {' or '.join(excs)}, the last line is {last!r}{tail}"
    for w in bad_case.words:
        assert w in last, f"{w!r} missing from the error line {last!r}{tail}"
