"""Upstream llama.cpp's JSON-schema-to-grammar test cases, run through pyllama's converter.

The cases (schema + whether upstream accepts it) are read at test time from
tests/test-json-schema-to-grammar.cpp of the pinned llama.cpp: vendor/llama.cpp/tests/ when the
vendored tree has it, otherwise the pinned source archive in pyllama's download cache
(scripts/vendor_llama_cpp.py).  Nothing is copied into this repository.

For every schema upstream accepts, pyllama either
* accepts it: llama.cpp parses the grammar (``_core.validate_grammar``) and completions
  sampled under the grammar are JSON that validates with ``jsonschema``; or
* refuses it with a JSONSchemaError naming the keyword, and the case is one of the documented
  differences (KNOWN_REFUSALS, listed in docs/grammars.md).
Schemas upstream refuses must be refused here too.  Grammars reach llama.cpp only in a child
process (a grammar that aborted llama.cpp would otherwise take pytest down with it).
"""

from __future__ import annotations

import importlib.util
import json
import re
import tarfile
import textwrap
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

jsonschema = pytest.importorskip("jsonschema")

from pyllama.errors import JSONSchemaError  # noqa: E402
from pyllama.grammar import json_schema_to_gbnf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM_FILE = "tests/test-json-schema-to-grammar.cpp"

#: Schemas upstream accepts and pyllama refuses, with the keyword named in the error (keep in
#: step with the "Differences from llama.cpp" table in docs/grammars.md).
KNOWN_REFUSALS = {
    # upstream reads an object under prefixItems as `items`; JSON Schema requires a list there
    "string array": "prefixItems",
    "nullable string array": "prefixItems",
    "array with empty items and prefixItems": "prefixItems",
    # upstream drops a pattern it cannot convert (any string); pyllama says so instead
    "unsupported regexp in a property": "pattern",
}

SAMPLES = 3          # completions sampled per accepted schema
MAX_TOKENS = 48


# --------------------------------------------------------------------------- reading the cases


def _upstream_source() -> Tuple[Optional[str], str]:
    """(text of upstream's test file, where it came from) or (None, why not)."""
    vendored = ROOT / "vendor" / "llama.cpp" / UPSTREAM_FILE
    if vendored.is_file():
        return vendored.read_text(encoding="utf-8"), str(vendored)
    spec = importlib.util.spec_from_file_location("_vendor_llama_cpp", ROOT / "scripts" / "vendor_llama_cpp.py")
    vendor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vendor)  # type: ignore[union-attr]
    pin = vendor.load_pin()
    archive = vendor.cache_dir() / pin["archive"]
    if not archive.is_file():
        return None, (f"{vendored} is not vendored and the pinned archive is not cached ({archive}); "
                      "run scripts/vendor_llama_cpp.py")
    member = f"{pin['subtree']}/{UPSTREAM_FILE}"
    with tarfile.open(archive, "r:gz") as tar:
        try:
            f = tar.extractfile(member)
        except KeyError:
            return None, f"{archive} has no {member}"
        return f.read().decode("utf-8"), f"{archive}:{member}"


def _cxx_string(src: str, i: int) -> Tuple[str, int]:
    """The value of the C++ string literal(s) at src[i:] (adjacent literals joined), and the
    index after them.  Raw strings R"d(...)d" and ordinary "..." with simple escapes."""
    parts: List[str] = []
    while True:
        while src[i] in " \t\r\n":
            i += 1
        if src.startswith('R"', i):
            open_paren = src.index("(", i + 2)
            close = ")" + src[i + 2:open_paren] + '"'
            end = src.index(close, open_paren + 1)
            parts.append(src[open_paren + 1:end])
            i = end + len(close)
        elif src[i] == '"':
            j, out = i + 1, []
            while src[j] != '"':
                if src[j] == "\\":
                    out.append({"n": "\n", "t": "\t", "r": "\r"}.get(src[j + 1], src[j + 1]))
                    j += 2
                else:
                    out.append(src[j])
                    j += 1
            parts.append("".join(out))
            i = j + 1
        elif parts:
            return "".join(parts), i
        else:
            raise ValueError(f"no string literal at offset {i}: {src[i:i + 40]!r}")


_CASE_RE = re.compile(r"\btest\(\{\s*(SUCCESS|FAILURE)\s*,")


def upstream_cases(src: str) -> List[Tuple[str, str, str]]:
    """[(status "SUCCESS"/"FAILURE", name, schema JSON text)] of every test({...}) in the file."""
    cases = []
    for m in _CASE_RE.finditer(src):
        name, i = _cxx_string(src, m.end())
        schema, _ = _cxx_string(src, src.index(",", i) + 1)
        cases.append((m.group(1), name, schema))
    return cases


_SOURCE, _ORIGIN = _upstream_source()
CASES = upstream_cases(_SOURCE) if _SOURCE is not None else []
pytestmark = pytest.mark.skipif(_SOURCE is None, reason=_ORIGIN)


def test_cases_were_found():
    assert len(CASES) >= 50, f"only {len(CASES)} cases parsed from {_ORIGIN}: has the file's format changed?"
    assert {status for status, _, _ in CASES} == {"SUCCESS", "FAILURE"}
    assert set(KNOWN_REFUSALS) <= {name for _, name, _ in CASES}, "a documented difference is no longer upstream"


# --------------------------------------------------------------------------- llama.cpp, in a child


_CHILD = textwrap.dedent("""
    import json, sys
    import pyllama
    from pyllama import _core
    cases = json.load(open(sys.argv[1]))
    model_path = sys.argv[2]
    vocab = pyllama.Model(model_path, vocab_only=True).vocab
    llm = pyllama.LLM(model_path, n_ctx=256, n_threads=1, verbose=False)
    # Short completions: favour the end of generation and the characters that close strings,
    # objects and arrays (the grammar still decides what is allowed).
    bias = {llm.vocab.eos: 30.0}
    for t in range(llm.vocab.n_tokens):
        if llm.vocab.token_to_piece(t).strip() in (b'"', b'}', b']', b'",', b'"}', b'"]', b'}]', b']}'):
            bias[t] = 8.0
    for name, gbnf, samples, max_tokens in cases:
        print(json.dumps({"name": name, "phase": "start"}), flush=True)
        _core.validate_grammar(vocab, gbnf)
        outs = []
        for seed in range(samples):
            c = llm.complete("{", grammar=gbnf, max_tokens=max_tokens, temperature=1.0, seed=seed,
                             logit_bias=bias)
            outs.append([c.text, c.finish_reason])
        print(json.dumps({"name": name, "phase": "done", "samples": outs}), flush=True)
""")


@pytest.fixture(scope="module")
def llama_results(tiny_model_path, run_python, tmp_path_factory):
    """{case name: [(text, finish_reason)] or an error string} for every schema pyllama
    converts, from one child process."""
    jobs = []
    for status, name, schema in CASES:
        try:
            jobs.append([name, json_schema_to_gbnf(schema), SAMPLES, MAX_TOKENS])
        except JSONSchemaError:
            pass
    cases_file = tmp_path_factory.mktemp("upstream-json-schema") / "cases.json"
    cases_file.write_text(json.dumps(jobs))
    code = f"import sys; sys.argv[1:] = [{str(cases_file)!r}, {str(tiny_model_path)!r}]\n" + _CHILD
    proc = run_python(code, timeout=900)
    results: dict = {}
    current = None
    for line in proc.stdout.splitlines():
        event = json.loads(line)
        if event["phase"] == "start":
            current = event["name"]
        else:
            results[event["name"]] = event["samples"]
            current = None
    if current is not None:   # the child died (or raised) on this case
        results[current] = f"exit status {proc.returncode}: {proc.stderr[-1500:]}"
    return results


def _validator(schema):
    """jsonschema's validator for the schema's dialect (draft 2020-12, or draft 7 for the
    legacy list form of items)."""
    for cls in (jsonschema.Draft202012Validator, jsonschema.Draft7Validator):
        try:
            cls.check_schema(schema)
        except jsonschema.SchemaError:
            continue
        return cls(schema, format_checker=cls.FORMAT_CHECKER)
    raise AssertionError(f"jsonschema rejects the schema itself: {schema!r}")


# --------------------------------------------------------------------------- the cases


@pytest.mark.parametrize("status,name,schema", CASES, ids=[name for _, name, _ in CASES])
def test_upstream_case(status, name, schema, llama_results):
    doc = json.loads(schema)
    try:
        gbnf = json_schema_to_gbnf(doc)
    except JSONSchemaError as exc:
        keyword = getattr(exc, "keyword", None)
        assert keyword is not None and keyword in str(exc), f"the error does not name the keyword: {exc}"
        if status == "FAILURE":
            return
        assert name in KNOWN_REFUSALS, (f"upstream accepts this schema, pyllama refuses it ({exc}); support it "
                                        "or add it to KNOWN_REFUSALS and docs/grammars.md")
        assert keyword == KNOWN_REFUSALS[name], str(exc)
        return
    assert status == "SUCCESS", f"upstream refuses this schema, pyllama converts it to:\n{gbnf}"
    assert name not in KNOWN_REFUSALS, "pyllama now accepts this schema: remove it from KNOWN_REFUSALS and the docs"
    samples = llama_results.get(name)
    assert samples is not None, "the child process never reached this case"
    assert not isinstance(samples, str), f"llama.cpp rejected or crashed on the grammar: {samples}\n{gbnf}"
    finished = [text for text, reason in samples if reason in ("stop", "eog")]
    assert finished, f"no sample finished within {MAX_TOKENS} tokens: {samples}"
    validator = _validator(doc)
    for text in finished:
        value = json.loads(text)
        errors = [e.message for e in validator.iter_errors(value)]
        assert not errors, f"sample {text!r} does not validate: {errors}\n{gbnf}"
