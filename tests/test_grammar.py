"""pyllama.grammar: shipped grammars, load_grammar, JSON Schema -> GBNF, and the GBNF pre-check.

Two kinds of tests:

* pure Python: what the converter writes, which keywords it refuses, argument checks;
* with llama.cpp's own grammar engine (``pyllama._core``, a vocab-only model): every generated
  grammar must parse, and ``accepts(gbnf, text)`` feeds a text token by token through a grammar
  sampler to check that llama.cpp accepts exactly the documents it should.
"""

from __future__ import annotations

import json
from collections import Counter
import os
import re
from pathlib import Path

import jsonschema
import pytest

import pyllama
from pyllama import grammar as G
from pyllama.errors import GrammarError, JSONSchemaError

VOCAB_NAME = "ggml-vocab-llama-bpe.gguf"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def core():
    import pyllama._core as core  # a failed import is a real failure, not a skip

    return core


@pytest.fixture(scope="module")
def vocab(core, vocab_dir):
    return core.Model(str(vocab_dir / VOCAB_NAME), vocab_only=True).vocab


@pytest.fixture(scope="module")
def accepts(core, vocab):
    """accepts(gbnf, text) -> does llama.cpp's grammar accept exactly `text` (then end)?"""

    def accepts(gbnf: str, text: str) -> bool:
        chain = core.SamplerChain(vocab)
        chain.add_grammar(gbnf)
        for token in vocab.tokenize(text, add_special=False):
            try:
                chain.accept(token)
            except GrammarError:
                return False
        try:
            chain.accept(vocab.eos)  # end of generation is allowed only when the grammar is done
        except GrammarError:
            return False
        return True

    return accepts


@pytest.fixture(scope="module")
def check_schema(core, vocab, accepts):
    """Convert, parse with llama.cpp, and check good/bad documents against grammar and schema."""

    def check(schema, good=(), bad=()):
        gbnf = G.json_schema_to_gbnf(schema)
        core.validate_grammar(vocab, gbnf)
        as_dict = schema.model_json_schema() if isinstance(schema, type) else schema
        for doc in good:
            jsonschema.validate(json.loads(doc), as_dict)  # the test data itself is right
            assert accepts(gbnf, doc), f"grammar rejects valid {doc!r}\n{gbnf}"
        for doc in bad:
            assert not accepts(gbnf, doc), f"grammar accepts invalid {doc!r}\n{gbnf}"
        return gbnf

    return check


# --------------------------------------------------------------------------- shipped grammars


@pytest.mark.parametrize("name", ["json", "json.gbnf", "list", "list.gbnf"])
def test_grammar_path(name):
    path = G.grammar_path(name)
    assert os.path.isabs(path)
    assert Path(path).is_file()
    assert Path(path).parent == Path(pyllama.__file__).resolve().parent / "grammars"
    assert Path(path).name == name.replace(".gbnf", "") + ".gbnf"


def test_grammar_path_unknown_lists_available():
    with pytest.raises(ValueError, match=r"no shipped grammar named 'yaml'.*json.*list"):
        G.grammar_path("yaml")
    with pytest.raises(ValueError):
        G.grammar_path("../grammar")
    with pytest.raises(TypeError):
        G.grammar_path(None)  # type: ignore[arg-type]
    assert {"json", "list"} <= set(G.available_grammars())


def test_shipped_grammars_parse(core, vocab):
    for name in ("json", "list"):
        text = G.load_grammar(grammar_path=G.grammar_path(name))
        core.validate_grammar(vocab, text)
        G.precheck_gbnf(text, n_vocab=vocab.n_tokens)


@pytest.mark.parametrize("doc,ok", [
    ("{}", True),
    ('{"a": 1}', True),
    ('{"a": [1, -2.5e3, "x\\n\\u00e9", null, true, false, {"b": {}}], "c": "q"}', True),
    ('{\n  "a": {\n    "b": []\n  }\n}', True),
    ("[1]", False),                 # the top level is an object
    ('"x"', False),
    ('{"a": 1,}', False),
    ('{"a": 01}', False),
    ('{"a": 1} ', False),           # nothing after the object
    ('{   "a": 1}', False),         # at most one space between tokens
    ('{\n' + " " * 21 + '"a": 1}', False),  # newline + at most 20 spaces
])
def test_json_gbnf(accepts, doc, ok):
    assert accepts(Path(G.grammar_path("json")).read_text(), doc) is ok


@pytest.mark.parametrize("doc,ok", [
    ('["apples"]', True),
    ('["apples", "pears",\n  "a \\"quoted\\" one"]', True),
    ("[]", False),
    ('[""]', False),
    ("[1]", False),
    ('{"a": "b"}', False),
])
def test_list_gbnf(accepts, doc, ok):
    assert accepts(Path(G.grammar_path("list")).read_text(), doc) is ok


def test_whitespace_rule_is_in_shipped_grammars():
    for name in ("json", "list"):
        text = Path(G.grammar_path(name)).read_text()
        assert re.search(r'^ws\s+::= \| " " \| "\\n" \[ \\t\]\{0,20\}$', text, re.M), name


# --------------------------------------------------------------------------- load_grammar


def test_load_grammar_none():
    assert G.load_grammar() is None


def test_load_grammar_two_sources(tmp_path):
    with pytest.raises(ValueError, match="grammar and grammar_path"):
        G.load_grammar(grammar='root ::= "a"', grammar_path=tmp_path / "x.gbnf")
    with pytest.raises(ValueError, match="grammar and json_schema"):
        G.load_grammar(grammar='root ::= "a"', json_schema={})
    with pytest.raises(ValueError, match="grammar_path and json_schema"):
        G.load_grammar(grammar_path="x.gbnf", json_schema={})


def test_load_grammar_text_and_file(tmp_path):
    text = 'root ::= "yes" | "no"\n'
    assert G.load_grammar(grammar=text) == text
    f = tmp_path / "yn.gbnf"
    f.write_text(text, encoding="utf-8")
    assert G.load_grammar(grammar_path=f) == text
    assert G.load_grammar(grammar_path=str(f)) == text


@pytest.mark.parametrize("text", ["", "   \n\t\n"])
def test_load_grammar_empty(tmp_path, text):
    with pytest.raises(GrammarError, match="empty"):
        G.load_grammar(grammar=text)
    f = tmp_path / "empty.gbnf"
    f.write_text(text)
    with pytest.raises(GrammarError, match="empty.*empty.gbnf"):
        G.load_grammar(grammar_path=f)


def test_load_grammar_missing_file(tmp_path):
    missing = tmp_path / "nope.gbnf"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        G.load_grammar(grammar_path=missing)
    with pytest.raises(FileNotFoundError, match=r"grammar_path\('json'\)"):
        G.load_grammar(grammar_path=tmp_path / "json.gbnf")  # hint at the shipped one
    with pytest.raises(IsADirectoryError):
        G.load_grammar(grammar_path=tmp_path)


def test_load_grammar_types():
    with pytest.raises(TypeError):
        G.load_grammar(grammar=123)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        G.load_grammar(grammar_path=123)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        G.load_grammar(json_schema=123)


def test_load_grammar_json_schema():
    text = G.load_grammar(json_schema={"type": "integer"})
    assert text.startswith("root ::= ")
    assert G.load_grammar(json_schema='{"type": "boolean"}') == G.json_schema_to_gbnf({"type": "boolean"})


def test_load_grammar_runs_precheck():
    with pytest.raises(GrammarError, match="nested"):
        G.load_grammar(grammar="root ::= " + "(" * 300 + '"a"' + ")" * 300)


# --------------------------------------------------------------------------- precheck_gbnf


def _deep(n):
    return "root ::= " + "(" * n + '"a"' + ")" * n + "\n"


def _chain(n):
    return "root ::= r0\n" + "".join(f"r{i} ::= r{i + 1}\n" for i in range(n)) + f'r{n} ::= "a"\n'


def _alternatives(n, rule="root"):
    return f"{rule} ::= " + " | ".join(f'"w{i}"' for i in range(n)) + "\n"


def test_precheck_counts_parse_stacks_not_text_size():
    G.precheck_gbnf(_alternatives(10000))  # at the bound: slow in llama.cpp (~1.6 s/token), not stuck
    # A nullable leading rule lets the next element start stacks too (e: 2, x: 4000);
    # a non-nullable one hides what follows it ("x x" starts 5000, not 10000).
    G.precheck_gbnf("root ::= e x\ne ::= \"\" | \"z\"\n" + _alternatives(4000, "x"))
    with pytest.raises(GrammarError, match="parse stacks"):
        G.precheck_gbnf("root ::= e x | x x\ne ::= \"\" | \"z\"\n" + _alternatives(5000, "x"))


def _ambiguous(n):
    return "root ::= r0\n" + "".join(f'r{i} ::= r{i + 1} "a" | r{i + 1} "b"\n' for i in range(n)) + f'r{n} ::= "a"\n'


PRECHECK_REJECTS = [
    pytest.param("", "empty", id="empty"),
    pytest.param(" \n\t ", "empty", id="whitespace"),
    pytest.param('root ::= "a\0"', "NUL", id="nul"),
    pytest.param('root ::= "\ud800"', "not valid text", id="surrogate"),
    pytest.param(_deep(257), "nested more than 256", id="deep-nesting"),
    pytest.param('root ::= "a"{5,2}', "maximum below its minimum", id="repeat-max-below-min"),
    pytest.param('root ::= ("ab" [x]){3 , 1}', "maximum below its minimum", id="repeat-max-below-min-group"),
    pytest.param("root ::= [z-a]", "reversed", id="reversed-range"),
    pytest.param("root ::= [^9-0]", "reversed", id="reversed-negated-range"),
    pytest.param('root ::= root "a" | "b"', "left recursion", id="left-recursion"),
    pytest.param('root ::= x\nx ::= y "a"\ny ::= ("" | "b") x', "left recursion", id="left-recursion-nullable"),
    pytest.param(_chain(2001), "chain of 2003", id="long-chain"),
    pytest.param(_ambiguous(16), "leftmost expansion paths", id="exponential-paths"),
    pytest.param('root ::= "' + "a" * 5000 + '"{1000} "b"{1000}', "elements", id="element-bomb"),
    pytest.param(_alternatives(10001), "more than 10000 parse stacks", id="many-alternatives"),
    pytest.param("root ::= x\nx ::= w | w | w\n" + _alternatives(4000, "w"),
                 "rule 'root' can start more than 10000 parse stacks", id="many-alternatives-through-rules"),
]


@pytest.mark.parametrize("text,match", PRECHECK_REJECTS)
def test_precheck_rejects(text, match):
    with pytest.raises(GrammarError, match=match):
        G.precheck_gbnf(text)


def test_precheck_token_ids():
    G.precheck_gbnf("root ::= <[5]> !<[999999]>", n_vocab=10)
    G.precheck_gbnf("root ::= <[999999]>")  # no vocabulary size given: not checked
    with pytest.raises(GrammarError, match=r"<\[10\]> is outside the vocabulary"):
        G.precheck_gbnf("root ::= <[10]>", n_vocab=10)


PRECHECK_ACCEPTS = [
    pytest.param('root ::= "a"', id="simple"),
    pytest.param(_deep(256), id="nesting-256"),
    pytest.param(_chain(1990), id="chain-1990"),
    pytest.param(_ambiguous(12), id="paths-8k"),
    pytest.param('root ::= [a-z]{0,2000} "x"{2000}', id="max-repetitions"),
    pytest.param('root ::= "a"{3,2500}', id="repeat-over-2000"),  # llama.cpp makes it unbounded
    pytest.param("root ::= [\\x00-\\U0010FFFF]*\r\n# comment\r\nx ::= \"\\u00e9\" | <tok>", id="crlf-escapes"),
    # syntax errors are left to llama.cpp: it stops there, so what follows never reaches it
    pytest.param("root ::= (", id="unclosed"),
    pytest.param('root ::= "a" )\n' + _deep(400), id="error-before-deep-nesting"),
    pytest.param("root ::= undefined-rule", id="undefined"),
    pytest.param("root ::= ", id="empty-rule"),
    pytest.param("# nothing but a comment", id="comment-only"),
    pytest.param('root ::= "a"{2001}', id="repeat-2001"),
]


@pytest.mark.parametrize("text", PRECHECK_ACCEPTS)
def test_precheck_accepts(text):
    G.precheck_gbnf(text)


SYNTAX_ERRORS = [
    ('root ::= ("a"', "line 1, column 14: expecting ')'"),
    ('root ::= "a"\nx := b', "line 2, column 3: expecting ::="),
    ("root ::= *", "expecting preceding item"),
    ("root ::= [a", "unclosed character class"),
    ('root ::= "a"{2,', "expecting '}'"),
    ('root ::= "\\q"', "unknown escape"),
    ('root ::= "a" ]', "expecting newline or end"),
    ("root ::= x\nx ::= y | z", "undefined rule 'y', 'z'"),
    ('x ::= "a"', "no rule named 'root'"),
    ("# only a comment", "no rules"),
    ('root ::= "a"{2001}', "exceeds 2000"),
]


@pytest.mark.parametrize("text,message", SYNTAX_ERRORS)
def test_gbnf_syntax_error(llama_verdicts, text, message):
    """The pre-check's message; in a subprocess (see llama_verdicts): pyllama raises
    GrammarError with it, and llama.cpp's own parser refuses the text as well."""
    assert message in G.gbnf_syntax_error(text)
    v = llama_verdicts[text]
    assert v["checked"].startswith("GrammarError:") and message in v["checked"], v
    assert v["raw"] == "rejected", v


def test_gbnf_syntax_error_none_for_valid(core, vocab):
    for text in ['root ::= "a"', Path(G.grammar_path("json")).read_text(), 'x ::= "a" | <[3]>']:
        root = "x" if text.startswith("x") else "root"
        assert G.gbnf_syntax_error(text, root=root) is None
        core.validate_grammar(vocab, text, root)


# --------------------------------------------------------------------------- pre-check vs llama.cpp
#
# llama.cpp's own parser sees grammars here only in a subprocess (with a timeout): a wrong
# pre-check would crash or hang it.  One subprocess checks every grammar below:
#
#   checked  core.validate_grammar as users call it (pre-check, then llama.cpp), for all;
#   raw      llama.cpp's parser alone (the pre-check switched off), only for grammars that
#            precheck_gbnf calls safe -- the ones it rejects may crash or hang llama.cpp.


def _fuzzed_grammars(n=300, seed=19):
    """Deterministic mutations of small grammars: characters GBNF gives meaning to
    inserted, deleted, duplicated and swapped."""
    import random

    rng = random.Random(seed)
    seeds = ['root ::= "a"', 'root ::= [a-z]+ ("," [a-z]+)*', 'root ::= x{2,3} y?\nx ::= "x" | "yz"\ny ::= [^\\n]',
             'root ::= ("a" | b)* "c"\nb ::= [0-9]{1,4}', 'root ::= <[5]> !<[6]> "t"', "root ::= (\"(\" root \")\")?",
             'root ::= "\\u00e9" [\\x00-\\x7f] "\\\\"', "root ::= item (ws item)*\nitem ::= [a-z]\nws ::= [ \\t]+",
             *(t for t, _ in SYNTAX_ERRORS)]
    alphabet = list('()[]{}|*+?"\\-^.,:=#<>!0123456789 \nabrootx') + ["::=", "root ::= ", "{2001}", "{0,}", "\\x"]
    fragments = [' "q"', " [0-9]", "?", "*", ' | "z"', " (x)", "{1,3}", " ws", "\nws ::= [ ]*", '\nx ::= "w"']
    valid = seeds[:8]
    out = []
    while len(out) < n:
        text = rng.choice(valid if rng.random() < 0.7 else seeds)
        for _ in range(rng.randint(1, 3)):
            i = rng.randint(0, len(text))
            op = rng.randrange(4)
            if op == 0:
                text = text[:i] + rng.choice(alphabet if rng.random() < 0.6 else fragments) + text[i:]
            elif op == 1 and text:
                text = text[:i] + text[i + 1:]
            elif op == 2:
                j = rng.randint(i, min(len(text), i + 12))
                text = text[:j] + text[i:j] + text[j:]
            elif len(text) > 1:
                j = rng.randrange(len(text))
                chars = list(text)
                chars[min(i, len(text) - 1)], chars[j] = chars[j], chars[min(i, len(text) - 1)]
                text = "".join(chars)
        if text not in out:
            out.append(text)
    return out


FUZZED = _fuzzed_grammars()


def _shipped_and_generated():
    texts = [G.load_grammar(grammar_path=G.grammar_path(name)) for name in ("json", "list")]
    for schema in [{}, {"type": "object", "properties": {"a": {"type": "integer", "minimum": -15, "maximum": 123}},
                        "required": ["a"]},
                   {"type": "array", "items": {"enum": ["x", 1, None]}, "minItems": 1, "maxItems": 3},
                   {"type": "string", "pattern": "^[a-f0-9]{4,8}(-x)?$"},
                   {"type": "string", "format": "date-time"}]:
        texts.append(G.json_schema_to_gbnf(schema))
    return texts


TOKEN_TEXT_NOT_IN_VOCAB = 'root ::= "a" | <tok>'   # a token text the vocabulary lacks

AGREEMENT_CORPUS = list(dict.fromkeys(
    [p.values[0] for p in PRECHECK_ACCEPTS]
    + [t for t, _ in SYNTAX_ERRORS]
    + [_deep(256), _chain(1990), _ambiguous(10), "root ::= undefined", "root ::= [a-z]{0,2000}",
       'root ::= "a" | <[999999]>', 'x ::= "a"', "root ::= [\\uD7FF-\\uE000]", TOKEN_TEXT_NOT_IN_VOCAB]
    + _shipped_and_generated()
    + FUZZED))

# Crash-prone: what pyllama refuses before llama.cpp's parser sees it (checked only).
UNSAFE_CORPUS = [p.values[0] for p in PRECHECK_REJECTS] + [
    "root ::= " + "(" * 100000 + '"a"' + ")" * 100000,
    "root ::= r0\n" + "".join(f"r{i} ::= r{i + 1}\n" for i in range(150000)) + 'r150000 ::= "a"',
]

_VERDICT_CHILD = r'''
import json, os, sys
import pyllama._core as core
import pyllama._gbnf_check as check
from pyllama.errors import GrammarError

cases = json.load(open(CASES, encoding="utf-8"))
vocab = core.Model(VOCAB, vocab_only=True).vocab
real_check = check.check_before_llama


def verdict(text, raw):
    check.check_before_llama = (lambda *a, **k: None) if raw else real_check
    try:
        core.validate_grammar(vocab, text)
    except GrammarError as e:
        return "rejected" if raw else "GrammarError: " + str(e)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    finally:
        check.check_before_llama = real_check
    return "ok"


for i, case in enumerate(cases):
    for mode in (("checked", "raw") if case["safe"] else ("checked",)):
        # where a crash happened, and llama.cpp's stderr (its parse errors) per case
        os.write(1, f"START {i} {mode}\n".encode())
        os.write(2, f"\n@@ {i} {mode}\n".encode())
        out = verdict(case["text"], mode == "raw")
        os.write(1, (json.dumps({"i": i, mode: out}) + "\n").encode())
os.write(1, b"ALL DONE\n")
'''


def _run_verdicts(run_python, vocab_dir, tmp_path, texts, safe, timeout):
    cases_file = tmp_path / "cases.json"
    cases_file.write_text(json.dumps([{"text": t, "safe": s} for t, s in zip(texts, safe)]), encoding="utf-8")
    code = (f"VOCAB = {str(vocab_dir / VOCAB_NAME)!r}\nCASES = {str(cases_file)!r}\n" + _VERDICT_CHILD)
    result = run_python(code, timeout=timeout)
    lines = result.stdout.splitlines()
    if result.returncode != 0 or not lines or lines[-1] != "ALL DONE":
        started = [ln for ln in lines if ln.startswith("START ")]
        last = started[-1].split() if started else None
        culprit = texts[int(last[1])] if last else None
        pytest.fail(f"the grammar subprocess died (exit {result.returncode}) in case {last}:\n"
                    f"{culprit!r:.2000}\n--- stderr ---\n{result.stderr[-3000:]}", pytrace=False)
    verdicts = [{} for _ in texts]
    for ln in lines:
        if ln.startswith("{"):
            d = json.loads(ln)
            verdicts[d.pop("i")].update(d)
    llama_stderr = {}
    for chunk in result.stderr.split("\n@@ ")[1:]:
        head, _, body = chunk.partition("\n")
        i, mode = head.split()
        llama_stderr[(int(i), mode)] = body.strip()
    for i, v in enumerate(verdicts):
        v["llama_stderr"] = llama_stderr.get((i, "raw"), "")
    return verdicts


@pytest.fixture(scope="module")
def llama_verdicts(run_python, vocab_dir, vocab, tmp_path_factory):
    """{text: {"safe", "checked", "raw", "llama_stderr"}} for AGREEMENT_CORPUS, from one subprocess."""
    texts = AGREEMENT_CORPUS
    safe = []
    for text in texts:
        try:
            G.precheck_gbnf(text, n_vocab=vocab.n_tokens)
            safe.append(True)
        except GrammarError:
            safe.append(False)
    verdicts = _run_verdicts(run_python, vocab_dir, tmp_path_factory.mktemp("grammars"), texts, safe, timeout=240)
    return {t: dict(v, safe=s) for t, s, v in zip(texts, safe, verdicts)}


def _precheck_verdict(text, vocab):
    from pyllama._gbnf_check import check_before_llama

    try:
        check_before_llama(text, n_vocab=vocab.n_tokens,
                           token_count=lambda t: len(vocab.tokenize(t, False, True)))
    except GrammarError as e:
        return str(e)
    return None


def test_precheck_agrees_with_llama_cpp(llama_verdicts, vocab):
    """For every grammar that is safe to give llama.cpp (precheck_gbnf passes): the full
    pre-check accepts it exactly when llama.cpp's own parser does, and pyllama's
    validate_grammar gives the same answer; its GrammarError is the pre-check's message."""
    disagree = []
    n_safe = n_raw_ok = 0
    for text, v in llama_verdicts.items():
        if not v["safe"]:
            assert v["checked"].startswith("GrammarError:"), (text, v)   # refused before llama.cpp
            continue
        n_safe += 1
        pre = _precheck_verdict(text, vocab)
        llama_ok = v["raw"] == "ok"
        n_raw_ok += llama_ok
        assert v["raw"] in ("ok", "rejected"), (text, v)
        if (pre is None) != llama_ok:
            disagree.append((text, pre, v["raw"], v["llama_stderr"][:300]))
            continue
        if pre is None:
            assert v["checked"] == "ok", (text, v)
        else:
            assert v["checked"] == f"GrammarError: {pre}", (text, v)
    assert not disagree, "pre-check and llama.cpp disagree:\n" + "\n".join(map(repr, disagree))
    # the corpus exercises both answers, and most of it reaches llama.cpp's parser
    assert n_raw_ok >= 40 and n_safe - n_raw_ok >= 200, (n_safe, n_raw_ok)
    assert n_safe >= 0.8 * len(llama_verdicts)


def test_precheck_accepts_what_llama_cpp_parses(llama_verdicts):
    for text in [p.values[0] for p in PRECHECK_ACCEPTS]:
        v = llama_verdicts[text]
        assert v["safe"] and v["raw"] in ("ok", "rejected"), (text[:80], v)


def test_fuzzed_grammars_reach_both_parsers(llama_verdicts):
    """The fuzzed corpus is not all rejected up front: its accepted and refused grammars both
    went through llama.cpp's parser (a generator that only makes garbage tests nothing)."""
    raw = [llama_verdicts[t].get("raw") for t in FUZZED]
    assert raw.count("ok") >= 20 and raw.count("rejected") >= 200, Counter(raw)


def test_precheck_knows_token_texts(llama_verdicts):
    """A <token> reference the vocabulary lacks: llama.cpp refuses it ("invalid token", on
    stderr only); the pre-check tokenizes it as llama.cpp does and names it."""
    v = llama_verdicts[TOKEN_TEXT_NOT_IN_VOCAB]
    assert v["raw"] == "rejected" and "invalid token '<tok>'" in v["llama_stderr"], v
    assert "invalid token '<tok>'" in v["checked"], v
    assert "llama.cpp refused it" not in v["checked"]


def test_precheck_prevents_crash(run_python, vocab_dir, tmp_path):
    """Grammars that crash or hang llama.cpp's parser (C stack overflow on deep nesting, an
    endless loop on a reversed repetition, ...): pyllama refuses each with GrammarError
    before llama.cpp sees it, and the process lives on."""
    verdicts = _run_verdicts(run_python, vocab_dir, tmp_path, UNSAFE_CORPUS, [False] * len(UNSAFE_CORPUS),
                             timeout=120)
    for text, v in zip(UNSAFE_CORPUS, verdicts):
        assert v["checked"].startswith(("GrammarError: ", "ValueError: grammar ")), (text[:80], v)
        assert "llama.cpp refused it" not in v["checked"], (text[:80], v)   # the pre-check's answer


# --------------------------------------------------------------------------- json_schema_to_gbnf: text


def test_schema_output_shape():
    gbnf = G.json_schema_to_gbnf({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]})
    assert gbnf.startswith("root ::= ")
    assert gbnf.endswith("\n")
    assert G.WHITESPACE_RULE in gbnf
    assert '"\\"a\\""' in gbnf  # the key as a literal
    for line in gbnf.splitlines():
        name = line.split(" ::= ")[0]
        assert re.fullmatch(r"[a-zA-Z0-9-]+", name), line  # never llama.cpp's generated NAME_N form


def test_schema_root_name():
    assert G.json_schema_to_gbnf({"type": "null"}, root="answer").startswith("answer ::= null\n")
    with pytest.raises(ValueError, match="rule name"):
        G.json_schema_to_gbnf({}, root="my_root")
    assert G.json_schema_to_gbnf({"type": "string"}, root="string").startswith("string ::= string-2\n")


def test_schema_inputs():
    as_dict = G.json_schema_to_gbnf({"type": "boolean"})
    assert G.json_schema_to_gbnf('{"type": "boolean"}') == as_dict
    assert G.json_schema_to_gbnf(b'{"type": "boolean"}') == as_dict
    with pytest.raises(JSONSchemaError, match="not valid JSON"):
        G.json_schema_to_gbnf("{type: boolean}")
    with pytest.raises(TypeError):
        G.json_schema_to_gbnf(42)


def test_schema_pydantic():
    pydantic = pytest.importorskip("pydantic")
    from typing import List, Optional

    class Pet(pydantic.BaseModel):
        name: str
        kind: str = "cat"

    class Owner(pydantic.BaseModel):
        name: str
        age: int = pydantic.Field(ge=0, le=150)
        pets: List[Pet] = []
        nickname: Optional[str] = None

    from_class = G.json_schema_to_gbnf(Owner)
    assert from_class == G.json_schema_to_gbnf(Owner.model_json_schema())
    assert "Pet ::= " in from_class


@pytest.mark.parametrize("keyword,schema", [
    ("not", {"not": {"type": "string"}}),
    ("if", {"if": {"type": "string"}, "then": {"minLength": 1}}),
    ("patternProperties", {"type": "object", "patternProperties": {"^x": {}}}),
    ("dependentRequired", {"type": "object", "dependentRequired": {"a": ["b"]}}),
    ("uniqueItems", {"type": "array", "uniqueItems": True}),
    ("multipleOf", {"type": "integer", "multipleOf": 3}),
    ("contains", {"type": "array", "contains": {"type": "integer"}}),
    ("propertyNames", {"type": "object", "propertyNames": {"maxLength": 3}}),
    ("minProperties", {"type": "object", "minProperties": 1}),
    ("unevaluatedProperties", {"type": "object", "unevaluatedProperties": False}),
])
def test_schema_unsupported_keywords(keyword, schema):
    with pytest.raises(JSONSchemaError, match=f"'{keyword}'") as info:
        G.json_schema_to_gbnf(schema)
    assert info.value.keyword == keyword
    assert info.value.path == "#"


def test_schema_unsupported_keyword_path():
    schema = {"type": "object", "properties": {"tags": {"type": "array", "items": {"not": {"const": 1}}}}}
    with pytest.raises(JSONSchemaError, match=r"'not'.*#/properties/tags/items") as info:
        G.json_schema_to_gbnf(schema)
    assert info.value.path == "#/properties/tags/items"
    schema = {"$defs": {"A": {"type": "integer", "multipleOf": 2}}, "$ref": "#/$defs/A"}
    with pytest.raises(JSONSchemaError, match=r"'multipleOf'.*#/\$defs/A"):
        G.json_schema_to_gbnf(schema)


@pytest.mark.parametrize("schema,match", [
    ({"$ref": "https://example.com/schema.json"}, "remote \\$ref"),
    ({"$ref": "other.json#/$defs/A"}, "remote \\$ref"),
    ({"$ref": "#/$defs/Missing"}, "does not resolve"),
    ({"$ref": "#anchor"}, "anchor"),
    (False, "false"),
    ({"type": "strng"}, "unknown type"),
    ({"enum": []}, "non-empty"),
    ({"type": "string", "pattern": "(?=a)b"}, "lookaround"),
    ({"type": "string", "pattern": "(a)\\1"}, "backreference"),
    ({"type": "string", "pattern": "\\bword"}, "word boundar"),
    ({"type": "string", "pattern": "a^b"}, "'\\^'"),
    ({"type": "string", "pattern": "a$b"}, "'\\$'"),
    ({"type": "string", "pattern": "\\p{L}"}, "Unicode properties"),
    ({"type": "string", "pattern": "*a"}, "nothing to repeat"),
    ({"type": "string", "pattern": "(ab"}, "missing '\\)'"),
    ({"type": "string", "pattern": "a{3,1}"}, "maximum below"),
    ({"type": "string", "pattern": "[[:alpha:]]"}, "POSIX"),
    ({"type": "string", "pattern": "a", "maxLength": 3}, "minLength/maxLength"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "below minLength"),
    ({"type": "string", "minLength": 3000}, "above 2000"),
    ({"type": "integer", "minimum": 5, "maximum": 4}, "no integer"),
    ({"type": "number", "minimum": 0.5}, "whole-number bounds"),
    ({"type": "number", "exclusiveMinimum": 1, "exclusiveMaximum": 1}, "no number"),
    ({"type": "array", "minItems": 3, "maxItems": 2}, "below minItems"),
    ({"type": "array", "prefixItems": [{}], "items": False, "minItems": 2}, "below minItems"),
    ({"type": "object", "properties": {}, "required": ["a"], "additionalProperties": False}, "required but not allowed"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "incompatible types"),
    ({"allOf": [{"const": 1}, {"const": 2}]}, "cannot merge"),
    ({"$defs": {"A": {"$ref": "#/$defs/B"}, "B": {"$ref": "#/$defs/A"}}, "$ref": "#/$defs/A"}, "left recursion"),
])
def test_schema_errors(schema, match):
    with pytest.raises(JSONSchemaError, match=match):
        G.json_schema_to_gbnf(schema)


def test_schema_annotations_ignored():
    plain = G.json_schema_to_gbnf({"type": "integer"})
    annotated = {"type": "integer", "title": "T", "description": "d", "default": 3, "examples": [1],
                 "$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "urn:x", "$comment": "c",
                 "deprecated": False, "readOnly": True}
    assert G.json_schema_to_gbnf(annotated) == plain
    assert G.json_schema_to_gbnf({"type": "string", "format": "email"}) == G.json_schema_to_gbnf({"type": "string"})


# --------------------------------------------------------------------------- json_schema_to_gbnf: behaviour in llama.cpp


def test_schema_any(check_schema):
    check_schema({}, good=["1", '"x"', "null", '{"a": [true, {}]}', "[]"], bad=["nul", "{,}"])
    check_schema(True, good=["-1.5e3", "false"])


def test_schema_primitives(check_schema):
    check_schema({"type": "null"}, good=["null"], bad=["0"])
    check_schema({"type": "boolean"}, good=["true", "false"], bad=["null", '"true"'])
    check_schema({"type": "integer"}, good=["0", "-12", "1234567890123456"], bad=["1.5", "01", "-", "12345678901234567"])
    check_schema({"type": "number"}, good=["0", "-0.5", "3.14", "1e10", "2.5E-3"], bad=["01", ".5", "1.", "NaN"])
    check_schema({"type": "string"}, good=['""', '"a b"', '"\\"q\\" \\\\ \\n \\u00e9 é"'], bad=['"a', '"\n"', "a"])


def test_schema_type_lists_and_nullable(check_schema, accepts):
    check_schema({"type": ["string", "null"]}, good=['"x"', "null"], bad=["1"])
    check_schema({"type": ["integer", "number"]}, good=["1", "1.5"], bad=['"1"'])
    gbnf = G.json_schema_to_gbnf({"type": "integer", "nullable": True})  # OpenAPI's spelling
    assert accepts(gbnf, "1") and accepts(gbnf, "null") and not accepts(gbnf, '"1"')


def test_schema_enum_const(check_schema):
    check_schema({"enum": ["red", "green", 3, None, {"k": [1, "é"]}]},
                 good=['"red"', '"green"', "3", "null", '{"k":[1,"é"]}'], bad=['"blue"', '"Red"', "4"])
    check_schema({"const": "only"}, good=['"only"'], bad=['"other"'])
    check_schema({"type": "string", "enum": ["a\"b", "c\\d"]}, good=['"a\\"b"', '"c\\\\d"'], bad=['"ab"'])


def test_schema_string_lengths(check_schema):
    check_schema({"type": "string", "minLength": 2, "maxLength": 3},
                 good=['"ab"', '"abc"', '"\\n\\t"'], bad=['"a"', '"abcd"', '""'])
    check_schema({"type": "string", "minLength": 1}, good=['"a"', '"' + "x" * 50 + '"'], bad=['""'])
    check_schema({"type": "string", "maxLength": 0}, good=['""'], bad=['"a"'])


@pytest.mark.parametrize("pattern,good,bad", [
    (r"^\d{3}-[A-Z]+$", ["123-AB"], ["12-AB", "123-ab", "1234-AB"]),
    (r"^(foo|ba[rz])?x*\.y$", ["foo.y", "bazxx.y", ".y"], ["fo.y", "foo.yy"]),
    (r"^[^,\"]+$", ["a b", "line\nbreak", "tab\there"], ["a,b", 'a"b', ""]),
    (r'^a"b\\c$', ['a"b\\c'], ["ab\\c"]),
    (r"^\w+@\w+\.(com|org)$", ["me@x.com", "a_1@b.org"], ["me@x.net", "@x.com"]),
    (r"^\s?\S{2}$", [" ab", "ab"], ["  ab", "a b"]),
    (r"^(?:ab){2,3}(?P<tail>c)?$", ["abab", "ababab", "ababc"], ["ab", "abababab"]),
    (r"^.{2}$", ["é!", "ab"], ["a\nb", "abc"]),
    (r"^[\x41-\x43\u00e9]+$", ["ABCé"], ["D"]),
    (r"^a|b$", ["a", "b"], ["ab", "c"]),
    (r"colou?r", ["color", "colour"], ["colr"]),
    (r"^[-a-c]$", ["-", "b"], ["d"]),
    (r"^x{0}y()$", ["y"], ["xy"]),
])
def test_schema_pattern(check_schema, pattern, good, bad):
    schema = {"type": "string", "pattern": pattern}
    for s in good:
        assert re.search(pattern, s)  # the test data itself is right
    check_schema(schema, good=[json.dumps(s, ensure_ascii=False) for s in good],
                 bad=[json.dumps(s, ensure_ascii=False) for s in bad])


def test_schema_formats(check_schema):
    check_schema({"type": "string", "format": "date"},
                 good=['"2024-02-28"', '"1999-12-31"', '"2023-04-30"'],
                 bad=['"2024-13-01"', '"2024-02-30"', '"2024-04-31"', '"24-01-01"'])
    check_schema({"type": "string", "format": "time"},
                 good=['"23:59:59Z"', '"08:00:00.5+02:00"'], bad=['"24:00:00Z"', '"12:00"'])
    check_schema({"type": "string", "format": "date-time"},
                 good=['"2024-02-28T12:30:00Z"', '"2024-02-28T12:30:00.123-05:30"'],
                 bad=['"2024-02-28 12:30:00Z"', '"2024-02-28T12:30:00"'])
    check_schema({"type": "string", "format": "uuid"},
                 good=['"123e4567-e89b-12d3-a456-426614174000"'],
                 bad=['"123e4567e89b12d3a456426614174000"', '"123e4567-e89b-12d3-a456-42661417400"'])


@pytest.mark.parametrize("bounds", [
    {"minimum": -15, "maximum": 123},
    {"minimum": 0},
    {"minimum": 7},
    {"maximum": -3},
    {"maximum": 42},
    {"exclusiveMinimum": 5, "exclusiveMaximum": 20},
    {"minimum": 100, "maximum": 100},
    {"minimum": 1.5, "maximum": 4.5},
    {"minimum": 10, "exclusiveMinimum": True, "maximum": 19},  # draft 4 form
])
def test_schema_integer_ranges(accepts, core, vocab, bounds):
    schema = {"type": "integer", **bounds}
    gbnf = G.json_schema_to_gbnf(schema)
    core.validate_grammar(vocab, gbnf)
    validator = jsonschema.Draft4Validator(schema) if isinstance(bounds.get("exclusiveMinimum"), bool) \
        else jsonschema.Draft202012Validator(schema)
    for n in list(range(-30, 140)) + [999, 1000, 123456, -1000]:
        assert accepts(gbnf, str(n)) == validator.is_valid(n), (n, gbnf)


@pytest.mark.parametrize("bounds,good,bad", [
    ({"minimum": 0, "maximum": 1}, ["0", "0.5", "1", "1.0", "0.999"], ["1.5", "-0.1", "2", "1.01", "-1"]),
    ({"exclusiveMinimum": 0, "exclusiveMaximum": 10}, ["0.5", "9.99", "5"], ["0", "0.0", "10", "10.0", "-1"]),
    ({"minimum": -2, "maximum": -1}, ["-1", "-1.5", "-2", "-2.0"], ["-2.5", "0", "-0.5"]),
    ({"minimum": 0}, ["0", "12.25", "100000"], ["-1", "-0.5"]),
    ({"maximum": 0}, ["0", "-3.5"], ["0.5", "1"]),
    ({"minimum": -1, "exclusiveMaximum": 1}, ["-1", "-0.5", "0", "0.99"], ["1", "-1.5"]),
])
def test_schema_number_ranges(check_schema, bounds, good, bad):
    check_schema({"type": "number", **bounds}, good=good, bad=bad)


def test_schema_object_required_optional_order(check_schema):
    schema = {"type": "object", "required": ["b"], "properties": {
        "a": {"type": "integer"}, "b": {"type": "string"}, "c": {"type": "boolean"}}}
    check_schema(schema,
                 good=['{"b": "x"}', '{"a": 1, "b": "x"}', '{"a": 1, "b": "x", "c": true}', '{"b": "x", "c": false}'],
                 bad=["{}", '{"a": 1}', '{"b": "x", "a": 1}', '{"b": "x", "d": 1}', '{"a": 1, "b": "x",}',
                      '{"b": 1}'])
    check_schema({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}},
                 good=["{}", '{"a": 1}', '{"b": "x"}', '{"a": 1, "b": "x"}'],
                 bad=['{"b": "x", "a": 1}', '{,"a": 1}', '{"a": 1,}', '{"c": 1}'])


def test_schema_object_many_optional_properties(check_schema, core, vocab):
    props = {f"p{i}": {"type": "integer"} for i in range(400)}
    gbnf = check_schema({"type": "object", "properties": props},
                        good=["{}", '{"p0": 1}', '{"p399": 1}', '{"p3": 1, "p250": 2}'],
                        bad=['{"p250": 1, "p3": 2}'])
    assert len(gbnf) < 200_000


def test_schema_additional_properties(check_schema):
    check_schema({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": True},
                 good=["{}", '{"a": 1}', '{"a": 1, "z": [1]}', '{"z": {}}', '{"ab": 1, "": 2}'],
                 bad=['{"a": "x"}', '{"z": 1, "a": 2}'])
    check_schema({"type": "object", "properties": {"a": {"type": "integer"}, 'q"': {"type": "null"}},
                  "additionalProperties": {"type": "string"}},
                 good=['{"a": 1, "b": "x"}', '{"aa": "x"}', '{"q": "x"}', '{"q\\"": null}'],
                 bad=['{"a": "x"}', '{"q\\"": "x"}', '{"b": 1}'])
    check_schema({"type": "object", "additionalProperties": {"type": "integer"}},
                 good=["{}", '{"x": 1, "y": 2}'], bad=['{"x": "1"}'])
    check_schema({"type": "object"}, good=["{}", '{"x": [1, {"y": null}]}'], bad=["[]"])
    check_schema({"type": "object", "properties": {"a": {}}, "additionalProperties": False},
                 good=['{"a": 1}'], bad=['{"b": 1}'])


def test_schema_required_without_properties(check_schema):
    check_schema({"type": "object", "required": ["id"]}, good=['{"id": 1}', '{"id": "x", "more": 2}'],
                 bad=["{}", '{"more": 2}'])


def test_schema_arrays(check_schema):
    check_schema({"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
                 good=["[1]", "[1, 2, 3]"], bad=["[]", "[1, 2, 3, 4]", '["a"]'])
    check_schema({"type": "array", "items": {"type": "integer"}, "minItems": 2},
                 good=["[1, 2]", "[1, 2, 3, 4, 5]"], bad=["[1]"])
    check_schema({"type": "array", "maxItems": 1}, good=["[]", "[null]"], bad=["[1, 2]"])
    check_schema({"type": "array"}, good=["[]", '[1, "a", null]'], bad=["{}"])
    check_schema({"type": "array", "items": False}, good=["[]"], bad=["[1]"])


def test_schema_prefix_items(check_schema):
    check_schema({"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False},
                 good=["[]", '["a"]', '["a", 1]'], bad=['["a", 1, 2]', "[1]"])
    check_schema({"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "minItems": 2},
                 good=['["a", 1]', '["a", 1, null, "x"]'], bad=['["a"]'])
    check_schema({"type": "array", "prefixItems": [{"type": "string"}], "items": {"type": "boolean"}, "maxItems": 3},
                 good=["[]", '["a"]', '["a", true, false]'], bad=['["a", true, false, true]', '["a", 1]'])
    # the draft 4-7 tuple form
    check_schema({"type": "array", "items": [{"type": "string"}, {"type": "null"}], "additionalItems": False,
                  "$schema": "http://json-schema.org/draft-07/schema#"},
                 good=['["a", null]'], bad=['["a", null, 1]'])


def test_schema_refs_and_recursion(check_schema):
    node = {"$defs": {"Node": {"type": "object", "required": ["v", "next"], "properties": {
        "v": {"type": "integer"}, "next": {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]}}}},
        "$ref": "#/$defs/Node"}
    check_schema(node, good=['{"v": 1, "next": null}', '{"v": 1, "next": {"v": 2, "next": null}}'],
                 bad=['{"v": 1}', '{"v": 1, "next": {"v": 2}}'])
    check_schema({"definitions": {"A": {"type": "string"}}, "type": "object", "required": ["x"],
                  "properties": {"x": {"$ref": "#/definitions/A"}, "y": {"$ref": "#/properties/x"}}},
                 good=['{"x": "q"}', '{"x": "q", "y": "r"}'], bad=['{"x": 1}'])
    tree = {"type": "object", "required": ["kids"], "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}}}
    check_schema(tree, good=['{"kids": []}', '{"kids": [{"kids": []}, {"kids": [{"kids": []}]}]}'],
                 bad=['{"kids": [1]}'])


def test_schema_ref_with_siblings(check_schema):
    check_schema({"$defs": {"S": {"type": "string"}},
                  "properties": {"a": {"$ref": "#/$defs/S", "maxLength": 2, "description": "d"}}, "required": ["a"]},
                 good=['{"a": "xy"}'], bad=['{"a": "xyz"}'])


def test_schema_combinators(check_schema):
    check_schema({"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 1}]},
                 good=["1", '"a"'], bad=['"ab"', "null"])
    check_schema({"oneOf": [{"type": "boolean"}, {"type": "null"}]}, good=["true", "null"], bad=["1"])
    check_schema({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                            {"properties": {"b": {"type": "string"}}, "required": ["b"]}]},
                 good=['{"a": 1, "b": "x"}'], bad=['{"a": 1}', '{"b": "x"}'])
    check_schema({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                  "anyOf": [{"required": ["a"]}, {"required": ["b"]}]},
                 good=['{"a": 1}', '{"b": 1}', '{"a": 1, "b": 2}'], bad=["{}"])
    check_schema({"allOf": [{"type": "integer", "minimum": 0}, {"maximum": 9}]}, good=["0", "9"], bad=["10", "-1"])


def test_schema_pydantic_end_to_end(check_schema):
    pydantic = pytest.importorskip("pydantic")
    import datetime
    import enum
    import uuid
    from typing import Literal, Optional

    class Color(enum.Enum):
        red = "red"
        blue = "blue"

    class Item(pydantic.BaseModel):
        id: uuid.UUID
        name: str = pydantic.Field(min_length=1, max_length=20)
        price: float = pydantic.Field(ge=0)
        tags: list[str] = []

    class Order(pydantic.BaseModel):
        kind: Literal["order"]
        when: datetime.date
        color: Color
        items: list[Item]
        note: Optional[str] = None
        pair: tuple[int, bool]
        extra: dict[str, int] = {}

    good = {"kind": "order", "when": "2024-05-01", "color": "red",
            "items": [{"id": "123e4567-e89b-12d3-a456-426614174000", "name": "pen", "price": 1.5}],
            "note": None, "pair": [1, True], "extra": {"a": 1}}
    doc = json.dumps(good, indent=2)
    gbnf = check_schema(Order, good=[doc, json.dumps(good)],
                        bad=[doc.replace('"red"', '"green"'), doc.replace('"pen"', '""')])
    Order.model_validate_json(doc)
    assert "Item ::= " in gbnf


# --------------------------------------------------------------------------- package layout and caches


def test_public_names_and_modules():
    from pyllama.grammar import gbnf, json_schema, regex

    for name in G.__all__:
        assert hasattr(G, name), name
    assert G.load_grammar is gbnf.load_grammar and G.grammar_path is gbnf.grammar_path
    assert G.json_schema_to_gbnf is json_schema.json_schema_to_gbnf
    assert G.regex_to_gbnf is regex.regex_to_gbnf
    import pyllama._gbnf_check as check

    assert G.precheck_gbnf is check.precheck_gbnf and G.gbnf_syntax_error is check.gbnf_syntax_error


def test_core_layer_imports_nothing_above_it():
    """_core (and the pre-check it owns) must not import the Python modules built on it."""
    import ast

    src = Path(pyllama.__file__).resolve().parent
    tree = ast.parse((src / "_gbnf_check.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m and m.startswith("pyllama")} == {"pyllama.errors"}
    above = ("grammar", "llm", "chat", "tools", "sampling", "integrations", "server", "cli", "models")
    pattern = re.compile(r"^\s*(?:from|import)\s+pyllama\.(%s)\b" % "|".join(above), re.M)
    for f in sorted(src.glob("_*.p[xy][xid]")):
        hits = pattern.findall(f.read_text())
        assert not hits, f"{f.name} imports pyllama.{hits[0]}"


def test_regex_to_gbnf_is_json_encoded():
    assert G.regex_to_gbnf("^a\\.b$") == '"a.b"'
    assert G.regex_to_gbnf('"') == '"\\\\\\""'   # a quote is written \" inside a JSON string
    with pytest.raises(JSONSchemaError) as info:
        G.regex_to_gbnf("(?=a)", "#/x")
    assert info.value.keyword == "pattern" and info.value.path == "#/x"


SCHEMA_30 = {"type": "object",
             "properties": {f"p{i}": [{"type": "string"}, {"type": "integer", "minimum": 0},
                                      {"type": "array", "items": {"type": "number"}}][i % 3] for i in range(30)},
             "required": ["p0", "p5"]}


def test_json_schema_conversion_is_cached(monkeypatch):
    from pyllama.grammar import json_schema

    G.clear_caches()
    calls = []
    real = json_schema._SchemaConverter.grammar

    def counting(self, schema):
        calls.append(1)
        return real(self, schema)

    monkeypatch.setattr(json_schema._SchemaConverter, "grammar", counting)
    first = G.load_grammar(json_schema=SCHEMA_30)
    assert G.load_grammar(json_schema=json.loads(json.dumps(SCHEMA_30))) == first   # an equal dict
    assert G.json_schema_to_gbnf(json.dumps(SCHEMA_30)) == first                    # the same JSON text
    assert len(calls) == 1
    G.json_schema_to_gbnf(SCHEMA_30, root="other")                                  # root is part of the key
    assert len(calls) == 2


def test_json_schema_cache_keeps_property_order():
    a = {"type": "object", "properties": {"x": {"type": "string"}, "y": {"type": "integer"}}, "required": ["x", "y"]}
    b = {"type": "object", "properties": {"y": {"type": "integer"}, "x": {"type": "string"}}, "required": ["x", "y"]}
    ga, gb = G.json_schema_to_gbnf(a), G.json_schema_to_gbnf(b)
    assert ga != gb
    assert ga.index('x\\""') < ga.index('y\\""') and gb.index('y\\""') < gb.index('x\\""')


def test_json_schema_cache_skips_ambiguous_schemas():
    from pyllama.grammar.json_schema import _cache_key

    assert _cache_key({"enum": [1, 2]}, "root") is not None
    assert _cache_key({"enum": (1, 2)}, "root") is None          # a tuple is written like a list
    assert _cache_key({"properties": {1: {}}}, "root") is None    # 1 is written like "1"
    assert _cache_key({"const": float("nan")}, "root") is None
    assert _cache_key({"const": object()}, "root") is None


def test_json_schema_errors_are_not_cached():
    for _ in range(2):
        with pytest.raises(JSONSchemaError, match="'not'"):
            G.json_schema_to_gbnf({"not": {"type": "string"}})


def test_precheck_is_cached_per_text_and_vocab(monkeypatch):
    import pyllama._gbnf_check as check

    G.clear_caches()
    scans = []
    real = check._precheck
    monkeypatch.setattr(check, "_precheck", lambda text, n_vocab: (scans.append(n_vocab), real(text, n_vocab)))
    text = 'root ::= "a" <[5]>'
    G.precheck_gbnf(text)
    G.precheck_gbnf(text)
    G.precheck_gbnf(text, n_vocab=100)
    G.precheck_gbnf(text, n_vocab=100)
    assert scans == [None, 100]
    for _ in range(2):   # a failure is checked (and reported) every time
        with pytest.raises(GrammarError, match="outside the vocabulary"):
            G.precheck_gbnf(text, n_vocab=3)
    assert scans == [None, 100, 3, 3]
