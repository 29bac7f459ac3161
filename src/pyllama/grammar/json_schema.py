"""JSON Schema -> GBNF: a grammar whose outputs are JSON documents valid under the schema.

:func:`json_schema_to_gbnf` converts a schema (dict, JSON text or pydantic model class).
Conversions are cached (a small LRU keyed by the schema's JSON text), so calling
``llm.complete(..., json_schema=S)`` again with the same ``S`` costs a dictionary lookup,
not a conversion.  The supported subset of JSON Schema is listed in docs/grammars.md.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from threading import Lock
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import unquote

from pyllama._gbnf_check import MAX_REPETITION as _MAX_REPETITION
from pyllama._gbnf_check import precheck_gbnf
from pyllama.errors import GrammarError, JSONSchemaError
from pyllama.grammar._text import (MAX_JSON_NESTING, WHITESPACE_RULE, _JSON_UNSAFE, _gbnf_class, _gbnf_literal,
                                   _normalize, _quantifier, _schema_error, json_nesting)
from pyllama.grammar.regex import regex_to_gbnf

__all__ = ["json_schema_to_gbnf", "json_schema_cache_clear", "MAX_SCHEMA_DEPTH"]

# Keywords with no effect on the generated text.
_ANNOTATIONS = frozenset({
    "$schema", "$id", "$comment", "$anchor", "$vocabulary", "title", "description", "default",
    "examples", "example", "deprecated", "readOnly", "writeOnly", "contentEncoding",
    "contentMediaType", "contentSchema", "discriminator", "$defs", "definitions", "xml",
    "externalDocs",
})
# Keywords we cannot turn into a grammar; they raise JSONSchemaError.
_UNSUPPORTED = frozenset({
    "not", "if", "then", "else", "patternProperties", "dependentRequired", "dependentSchemas",
    "dependencies", "uniqueItems", "multipleOf", "contains", "minContains", "maxContains",
    "propertyNames", "unevaluatedProperties", "unevaluatedItems", "minProperties",
    "maxProperties", "$dynamicRef", "$dynamicAnchor", "$recursiveRef", "$recursiveAnchor",
})
_OBJECT_KEYWORDS = frozenset({"properties", "required", "additionalProperties"})
_ARRAY_KEYWORDS = frozenset({"items", "prefixItems", "additionalItems", "minItems", "maxItems"})
_STRING_KEYWORDS = frozenset({"minLength", "maxLength", "pattern"})
_NUMBER_KEYWORDS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})
_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")

_DATE = (r"[0-9]{4}-((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)"
         r"|02-(0[1-9]|1[0-9]|2[0-8]))")
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
_FORMATS = {
    "date": _DATE,
    "time": _TIME,
    "date-time": _DATE + "T" + _TIME,
    "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
}

_FRACTION = '("." [0-9]{1,16})?'
_EXPONENT = '([eE] [-+]? [0-9]{1,3})?'

# Building blocks, added to a grammar only when used.  {name} is replaced by the rule names
# chosen for the named dependencies (they may get suffixes when the schema uses the same names).
_PRIMITIVES: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "ws": (WHITESPACE_RULE.split("::=", 1)[1].strip(), ()),
    "char": ('[^"\\\\\\x7F\\x00-\\x1F] | "\\\\" (["\\\\/bfnrt] | "u" [0-9a-fA-F]{4})', ()),
    "string": ('"\\"" {char}* "\\""', ("char",)),
    "integer": ('"-"? ("0" | [1-9] [0-9]{0,15})', ()),
    "number": ('"-"? ("0" | [1-9] [0-9]{0,15}) ' + _FRACTION + " " + _EXPONENT, ()),
    "key-char": ('[^"\\\\\\x7F\\x00-\\x1F] | "\\\\" ["\\\\bfnrt]', ()),
    "boolean": ('"true" | "false"', ()),
    "null": ('"null"', ()),
    "value": ('{object} | {array} | {string} | {number} | {boolean} | {null}',
              ("object", "array", "string", "number", "boolean", "null")),
    "object": ('"{" {ws} ({string} {ws} ":" {ws} {value} {ws} ("," {ws} {string} {ws} ":" {ws} {value} {ws})*)? "}"',
               ("ws", "string", "value")),
    "array": ('"[" {ws} ({value} {ws} ("," {ws} {value} {ws})*)? "]"', ("ws", "value")),
}

_RULE_NAME_RE = re.compile(r"^[a-zA-Z0-9-]+$")
#: How deeply a schema's subschemas may nest (properties, items, anyOf branches ..., each
#: ``$ref`` and ``allOf`` expansion counting as a level).  The converter walks the schema
#: recursively: the limit keeps that walk far from Python's recursion limit, so a deeper
#: schema is a JSONSchemaError (a ValueError), not a RecursionError.  Real schemas nest a
#: few levels; the document itself may nest at most MAX_JSON_NESTING objects/arrays.
MAX_SCHEMA_DEPTH = 64
_MAX_SCHEMA_DEPTH = MAX_SCHEMA_DEPTH


def _json_pointer_escape(token: str) -> str:
    return str(token).replace("~", "~0").replace("/", "~1")


def _child(path: str, *tokens: Any) -> str:
    return path + "".join("/" + _json_pointer_escape(str(t)) for t in tokens)


def _json_text(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False)


def _as_int_bound(value: Any, name: str, path: str) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
        raise _schema_error(f"{name} must be a finite number, got {value!r}", path, name)
    return value


class _SchemaConverter:
    def __init__(self, document: Any, root: str) -> None:
        self.doc = document
        self.root = root
        self.rules: Dict[str, Optional[str]] = {}
        self.used = {root, "root"}   # "root" stays free for a wrapper grammar's start rule
        self.ref_rules: Dict[str, str] = {}
        self.prims: Dict[str, str] = {}
        self.depth = 0

    # -- names and rules -----------------------------------------------------------------

    def new_name(self, hint: str) -> str:
        base = re.sub(r"[^a-zA-Z0-9]+", "-", hint).strip("-") or "rule"
        name, k = base, 2
        while name in self.used:
            name, k = f"{base}-{k}", k + 1
        self.used.add(name)
        return name

    def prim(self, key: str) -> str:
        if key not in self.prims:
            name = self.new_name(key)
            self.prims[key] = name
            self.rules[name] = None
            body, deps = _PRIMITIVES[key]
            names = {d: self.prim(d) for d in deps}
            self.rules[name] = re.sub(r"\{([a-z]+)\}", lambda m: names.get(m.group(1), m.group(0)), body)
        return self.prims[key]

    def format_rule(self, key: str, pattern: str, path: str) -> str:
        """Rule for a supported string format (a JSON string matching `pattern`)."""
        pkey = "format-" + key
        if pkey not in self.prims:
            name = self.new_name(key)
            self.prims[pkey] = name
            self.rules[name] = self.pattern_string(pattern, path)
        return self.prims[pkey]

    def named(self, hint: str, body: str) -> str:
        name = self.new_name(hint)
        self.rules[name] = body
        return name

    def grammar(self, schema: Any) -> str:
        body = self.visit(schema, "#", self.root, inline=True)
        lines = [f"{self.root} ::= {body}"]
        lines += [f"{name} ::= {rule}" for name, rule in self.rules.items()]
        return "\n".join(lines) + "\n"

    # -- $ref ------------------------------------------------------------------------------

    def resolve(self, ref: Any, path: str) -> Tuple[Any, str]:
        if not isinstance(ref, str):
            raise _schema_error(f"$ref must be a string, got {ref!r}", path, "$ref")
        if not ref.startswith("#"):
            raise _schema_error(f"remote $ref {ref!r} is not supported (only local refs like '#/$defs/Name')",
                                path, "$ref")
        if ref != "#" and not ref.startswith("#/"):
            raise _schema_error(f"$ref {ref!r} to an anchor is not supported (use a JSON pointer like "
                                "'#/$defs/Name')", path, "$ref")
        node = self.doc
        for raw in ref[2:].split("/") if ref != "#" else []:
            token = unquote(raw).replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and token in node:
                node = node[token]
            elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
                node = node[int(token)]
            else:
                raise _schema_error(f"$ref {ref!r} does not resolve in this schema", path, "$ref")
        return node, ref

    def ref_rule(self, ref: str, path: str) -> str:
        target, target_path = self.resolve(ref, path)
        if ref in self.ref_rules:
            return self.ref_rules[ref]
        hint = target_path.rsplit("/", 1)[-1] if target_path != "#" else "root-ref"
        name = self.new_name(unquote(hint))
        self.ref_rules[ref] = name
        self.rules[name] = None  # placeholder keeps the order; recursion finds the name
        self.rules[name] = self.visit(target, target_path, name, inline=True)
        return name

    def deref(self, schema: Any, path: str) -> Any:
        """A schema with its top-level $ref (and allOf) merged in."""
        seen = 0
        while isinstance(schema, dict) and "$ref" in schema:
            seen += 1
            if seen > 50:
                raise _schema_error("$ref chain too long or circular", path, "$ref")
            target, _ = self.resolve(schema["$ref"], path)
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            schema = self.merge([target, rest], path) if _meaningful(rest) else target
        return schema

    # -- allOf / merging -------------------------------------------------------------------

    def merge(self, schemas: List[Any], path: str) -> Dict[str, Any]:
        self.depth += 1
        try:
            if self.depth > _MAX_SCHEMA_DEPTH:
                raise _schema_error(f"allOf/$ref merging nested more than {MAX_SCHEMA_DEPTH} levels deep (a $ref "
                                    "cycle?)", path, "allOf")
            return self._merge(schemas, path)
        finally:
            self.depth -= 1

    def _merge(self, schemas: List[Any], path: str) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for i, sub in enumerate(schemas):
            sub = self.deref(sub, path)
            if sub is True:
                continue
            if sub is False:
                raise _schema_error("allOf contains `false`, which no value satisfies", path, "allOf")
            if not isinstance(sub, dict):
                raise _schema_error(f"expected a schema object, got {type(sub).__name__}", path)
            self.check_keywords(sub, path)
            if "allOf" in sub:
                rest = {k: v for k, v in sub.items() if k != "allOf"}
                sub = self.merge([rest] + list(sub["allOf"]), _child(path, "allOf"))
            for key, value in sub.items():
                if key in _ANNOTATIONS:
                    continue
                if key not in out:
                    out[key] = value
                    continue
                out[key] = self.merge_keyword(key, out[key], value, path)
        return out

    def merge_keyword(self, key: str, a: Any, b: Any, path: str) -> Any:
        if a == b:
            return a
        if key == "properties":
            merged = dict(a)
            for name, sub in b.items():
                merged[name] = sub if name not in merged else {"allOf": [merged[name], sub]}
            return merged
        if key == "required":
            return list(dict.fromkeys(list(a) + list(b)))
        if key == "type":
            ta = set([a] if isinstance(a, str) else a)
            tb = set([b] if isinstance(b, str) else b)
            both = ta & tb
            if "integer" in (ta | tb) and "number" in (ta | tb):
                if ("integer" in ta and "number" in tb) or ("number" in ta and "integer" in tb):
                    both.add("integer")
            if not both:
                raise _schema_error(f"allOf combines incompatible types {a!r} and {b!r}", path, "type")
            return [t for t in _TYPES if t in both]
        if key in ("minimum", "minLength", "minItems"):
            return max(a, b)
        if key in ("maximum", "maxLength", "maxItems"):
            return min(a, b)
        if key == "additionalProperties":
            if a is False or b is False:
                return False
            if a is True:
                return b
            if b is True:
                return a
            return {"allOf": [a, b]}
        if key in ("items", "additionalItems"):
            return {"allOf": [a, b]}
        if key == "enum":
            keep = [v for v in a if any(_json_text(v) == _json_text(w) for w in b)]
            if not keep:
                raise _schema_error("allOf combines enums with no value in common", path, "enum")
            return keep
        raise _schema_error(f"cannot merge different values of {key!r} in allOf", path, "allOf")

    # -- the schema walk -------------------------------------------------------------------

    def check_keywords(self, schema: Dict[str, Any], path: str) -> None:
        for key in schema:
            if key in _UNSUPPORTED:
                if key == "uniqueItems" and schema[key] is False:
                    continue
                raise _schema_error(f"unsupported JSON Schema keyword {key!r}: pyllama cannot express it as "
                                    "a grammar", path, key)

    def visit(self, schema: Any, path: str, hint: str, inline: bool = False) -> str:
        """GBNF expression for `schema`; `inline` means the caller makes it a rule body."""
        self.depth += 1
        try:
            if self.depth > _MAX_SCHEMA_DEPTH:
                raise _schema_error(f"schema nested too deeply: more than {MAX_SCHEMA_DEPTH} levels of subschemas "
                                    "(pyllama's limit; or a $ref cycle through allOf/siblings)", path)
            return self._visit(schema, path, hint, inline)
        finally:
            self.depth -= 1

    def _visit(self, schema: Any, path: str, hint: str, inline: bool) -> str:
        if schema is True:
            return self.prim("value")
        if schema is False:
            raise _schema_error("the schema is `false`, which no value satisfies", path)
        if not isinstance(schema, dict):
            raise _schema_error(f"expected a schema object, got {type(schema).__name__} {schema!r}", path)
        self.check_keywords(schema, path)
        if "$ref" in schema:
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            if not _meaningful(rest):
                return self.ref_rule(schema["$ref"], path)
            return self.visit(self.deref(schema, path), path, hint, inline)
        if "allOf" in schema:
            if not isinstance(schema["allOf"], list) or not schema["allOf"]:
                raise _schema_error("allOf must be a non-empty list", path, "allOf")
            rest = {k: v for k, v in schema.items() if k != "allOf"}
            return self.visit(self.merge([rest] + schema["allOf"], path), path, hint, inline)
        if "anyOf" in schema or "oneOf" in schema:
            if "anyOf" in schema and "oneOf" in schema:
                raise _schema_error("anyOf together with oneOf in one schema is not supported", path, "oneOf")
            key = "anyOf" if "anyOf" in schema else "oneOf"
            branches = schema[key]
            if not isinstance(branches, list) or not branches:
                raise _schema_error(f"{key} must be a non-empty list", path, key)
            rest = {k: v for k, v in schema.items() if k != key}
            alts = []
            for i, branch in enumerate(branches):
                if _meaningful(rest):
                    branch = self.merge([rest, branch], _child(path, key, i))
                alts.append(self.visit(branch, _child(path, key, i), hint))
            return _alternatives(alts, inline)
        if "const" in schema:
            return _gbnf_literal(_json_text(schema["const"]))
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise _schema_error("enum must be a non-empty list", path, "enum")
            return _alternatives([_gbnf_literal(_json_text(v)) for v in values], inline)

        types = schema.get("type")
        if types is None:
            keys = set(schema)
            if keys & _OBJECT_KEYWORDS:
                types = ["object"]
            elif keys & _ARRAY_KEYWORDS:
                types = ["array"]
            elif keys & _STRING_KEYWORDS or schema.get("format") in _FORMATS:
                types = ["string"]
            elif keys & _NUMBER_KEYWORDS:
                types = ["number"]
            else:
                return self.prim("value")
        if isinstance(types, str):
            types = [types]
        if not isinstance(types, list) or not types:
            raise _schema_error(f"type must be a type name or a non-empty list of them, got {types!r}", path, "type")
        types = list(dict.fromkeys(types))
        if schema.get("nullable") is True and "null" not in types:
            types.append("null")
        if "integer" in types and "number" in types:
            types.remove("integer")
        alts = [self.visit_type(t, schema, path, hint, inline and len(types) == 1) for t in types]
        return _alternatives(alts, inline)

    def visit_type(self, t: Any, schema: Dict[str, Any], path: str, hint: str, inline: bool) -> str:
        if t == "null":
            return self.prim("null")
        if t == "boolean":
            return self.prim("boolean")
        if t == "integer":
            return self.integer(schema, path)
        if t == "number":
            return self.number(schema, path)
        if t == "string":
            return self.string(schema, path, hint, inline)
        if t == "object":
            return self.object(schema, path, hint, inline)
        if t == "array":
            return self.array(schema, path, hint, inline)
        raise _schema_error(f"unknown type {t!r} (expected one of {', '.join(_TYPES)})", path, "type")

    # -- strings -------------------------------------------------------------------------------

    def pattern_string(self, pattern: str, path: str) -> str:
        return f'"\\"" {regex_to_gbnf(pattern, path)} "\\""'

    def string(self, schema: Dict[str, Any], path: str, hint: str, inline: bool) -> str:
        pattern = schema.get("pattern")
        fmt = schema.get("format")
        min_len = schema.get("minLength")
        max_len = schema.get("maxLength")
        if pattern is not None:
            if not isinstance(pattern, str):
                raise _schema_error(f"pattern must be a string, got {pattern!r}", path, "pattern")
            if min_len is not None or max_len is not None:
                raise _schema_error("pattern together with minLength/maxLength is not supported; put the "
                                    "length into the pattern (e.g. '^[a-z]{1,10}$')", path, "pattern")
            body = self.pattern_string(pattern, _child(path, "pattern"))
            return body if inline else self.named(hint, body)
        if isinstance(fmt, str) and fmt in _FORMATS:
            return self.format_rule(fmt, _FORMATS[fmt], _child(path, "format"))
        for key, value in (("minLength", min_len), ("maxLength", max_len)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise _schema_error(f"{key} must be a non-negative integer, got {value!r}", path, key)
        if min_len is None and max_len is None:
            return self.prim("string")
        lo = min_len or 0
        if max_len is not None and max_len < lo:
            raise _schema_error(f"maxLength {max_len} is below minLength {lo}", path, "maxLength")
        if lo > _MAX_REPETITION:
            raise _schema_error(f"minLength {lo} is above {_MAX_REPETITION}, the most a llama.cpp grammar can "
                                "repeat", path, "minLength")
        hi = max_len if max_len is not None and max_len <= _MAX_REPETITION else None
        return f'"\\"" {self.prim("char")}{_quantifier(lo, hi)} "\\""'

    # -- numbers -------------------------------------------------------------------------------

    def bounds(self, schema: Dict[str, Any], path: str) -> Tuple[Optional[float], bool, Optional[float], bool]:
        lo = _as_int_bound(schema.get("minimum"), "minimum", path)
        hi = _as_int_bound(schema.get("maximum"), "maximum", path)
        lo_excl = hi_excl = False
        xlo, xhi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        if isinstance(xlo, bool):  # draft 4
            lo_excl = xlo and lo is not None
        elif xlo is not None:
            xlo = _as_int_bound(xlo, "exclusiveMinimum", path)
            if lo is None or xlo >= lo:
                lo, lo_excl = xlo, True
        if isinstance(xhi, bool):
            hi_excl = xhi and hi is not None
        elif xhi is not None:
            xhi = _as_int_bound(xhi, "exclusiveMaximum", path)
            if hi is None or xhi <= hi:
                hi, hi_excl = xhi, True
        return lo, lo_excl, hi, hi_excl

    def integer(self, schema: Dict[str, Any], path: str) -> str:
        lo, lo_excl, hi, hi_excl = self.bounds(schema, path)
        if lo is None and hi is None:
            return self.prim("integer")
        ilo = None if lo is None else (math.floor(lo) + 1 if lo_excl else math.ceil(lo))
        ihi = None if hi is None else (math.ceil(hi) - 1 if hi_excl else math.floor(hi))
        if ilo is not None and ihi is not None and ilo > ihi:
            raise _schema_error(f"no integer satisfies the bounds [{lo}, {hi}]", path, "minimum")
        alts = []
        if ihi is None or ihi >= 0:  # the non-negative part
            alts.append(_uint_range(max(ilo, 0) if ilo is not None else 0, ihi))
        if ilo is None or ilo < 0:  # the negative part, by magnitude
            mag_lo = max(1, -ihi) if ihi is not None else 1
            mag_hi = -ilo if ilo is not None else None
            alts.append(f'"-" {_paren(_uint_range(mag_lo, mag_hi))}')
        return _paren(" | ".join(alts)) if len(alts) > 1 else alts[0]

    def number(self, schema: Dict[str, Any], path: str) -> str:
        lo, lo_excl, hi, hi_excl = self.bounds(schema, path)
        if lo is None and hi is None:
            return self.prim("number")
        for name, v in (("minimum", lo), ("maximum", hi)):
            if v is not None and v != int(v):
                raise _schema_error(f"{name} {v!r} on a number: only whole-number bounds are supported for "
                                    "type number (integers may have any bounds)", path, name)
        lo = None if lo is None else int(lo)
        hi = None if hi is None else int(hi)
        if lo is not None and hi is not None and (lo > hi or (lo == hi and (lo_excl or hi_excl))):
            raise _schema_error(f"no number satisfies the bounds ({lo}, {hi})", path, "minimum")
        alts = []
        if hi is None or hi > 0 or (hi == 0 and not hi_excl):
            if lo is not None and lo >= 0:
                alts += _magnitude(lo, lo_excl, hi, hi_excl)
            else:
                alts += _magnitude(0, False, hi, hi_excl)
        if lo is None or lo < 0:
            if hi is not None and hi < 0:
                neg = _magnitude(-hi, hi_excl, None if lo is None else -lo, lo_excl)
            else:
                neg = _magnitude(0, True, None if lo is None else -lo, lo_excl)
            if neg:
                alts.append('"-" ' + _paren(" | ".join(neg)))
        if not alts:
            raise _schema_error(f"no number satisfies the bounds ({lo}, {hi})", path, "minimum")
        return _paren(" | ".join(alts)) if len(alts) > 1 else alts[0]

    # -- objects -------------------------------------------------------------------------------

    def object(self, schema: Dict[str, Any], path: str, hint: str, inline: bool) -> str:
        props = schema.get("properties", {})
        if not isinstance(props, dict):
            raise _schema_error("properties must be an object", path, "properties")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise _schema_error("required must be a list of property names", path, "required")
        additional = schema.get("additionalProperties")
        if additional is None:
            # pyllama's default: an object that declares properties gets no others; a bare
            # {"type": "object"} is a free-form object.
            additional = not props
        props = dict(props)
        for name in required:
            if name not in props:
                if additional is False:
                    raise _schema_error(f"property {name!r} is required but not allowed (not in properties "
                                        "and additionalProperties is false)", path, "required")
                props[name] = additional
        if not props and additional is True:
            return self.prim("object")
        ws = self.prim("ws")
        members = []
        names = list(props)
        for name, sub in props.items():
            value = self.visit(sub, _child(path, "properties", name), f"{hint}-{name}")
            members.append((f'{_gbnf_literal(_json_text(name))} {ws} ":" {ws} {value} {ws}', name in required))
        extra_first = extra_rest = ""
        if additional is not False:
            value = self.visit(additional, _child(path, "additionalProperties"), f"{hint}-additional")
            key = self.key_not_in(list(props), hint) if props else self.prim("string")
            kv = self.named(f"{hint}-additional-kv", f'{key} {ws} ":" {ws} {value} {ws}')
            extra_rest = f'("," {ws} {kv})*'
            extra_first = f"({kv} {extra_rest})?"
        # rest[i]: members i.. after something was written (each starts with ","),
        # first[i]: members i.. when nothing was written yet.  Linear size, unambiguous.
        rest, first = extra_rest, extra_first
        for i in range(len(members) - 1, -1, -1):
            kv, is_required = members[i]
            after = names[i + 1] if i + 1 < len(names) else "extra"
            # rest is used twice below and first nests once per optional member: long ones get
            # their own rules, so the text stays linear and the group nesting shallow.
            if len(rest) > 60:
                rest = self.named(f"{hint}-rest-{after}", rest)
            if is_required:
                rest, first = _join('","', ws, kv, rest), _join(kv, rest)
            else:
                if len(first) > 60:
                    first = self.named(f"{hint}-first-{after}", first)
                rest, first = (_join(f'("," {ws} {kv})?', rest),
                               f"({_join(kv, rest)} | {first})" if first else f"({_join(kv, rest)})?")
        body = _join('"{"', ws, first, '"}"')
        return body if inline else self.named(hint, body)

    def key_not_in(self, names: List[str], hint: str) -> str:
        """A JSON string that is none of `names`: extra keys must not repeat declared ones.
        Keys are written with the short escapes only (no \\u, no \\/), so each key has one
        spelling and a trie of the declared spellings is enough."""
        trie: Dict[Any, Any] = {}
        for name in names:
            node = trie
            for unit in re.findall(r"\\u[0-9a-fA-F]{4}|\\.|.", _json_text(name)[1:-1], re.S):
                node = node.setdefault(unit, {})
            node[None] = True
        key_char = self.prim("key-char")

        def build(node: Dict[Any, Any], label: str) -> str:
            alts = [] if None in node else [""]
            plain = [u for u in node if u is not None and len(u) == 1]
            escaped = [u[1] for u in node if u is not None and len(u) == 2]
            for unit, child in node.items():
                if unit is not None:
                    alts.append(f"{_gbnf_literal(unit)} {build(child, label + '-' + str(len(alts)))}")
            other = [_gbnf_class(_normalize(_JSON_UNSAFE + [(ord(u), ord(u)) for u in plain]), negated=True)]
            rest = [ch for ch in '"\\bfnrt' if ch not in escaped]
            if rest:
                other.append('"\\\\" ' + _gbnf_class(_normalize([(ord(ch), ord(ch)) for ch in rest])))
            alts.append(f"({' | '.join(other)}) {key_char}*")
            return self.named(label, " | ".join(a for a in alts) if alts[0] else "| " + " | ".join(alts[1:]))

        return f'"\\"" {build(trie, f"{hint}-other-key")} "\\""'

    # -- arrays -------------------------------------------------------------------------------

    def array(self, schema: Dict[str, Any], path: str, hint: str, inline: bool) -> str:
        items = schema.get("items")
        prefix = schema.get("prefixItems")
        if isinstance(items, list):  # draft 4-7 tuple form
            if prefix is not None:
                raise _schema_error("items as a list together with prefixItems", path, "items")
            prefix, items = items, schema.get("additionalItems")
        if prefix is not None and not isinstance(prefix, list):
            # llama.cpp reads an object here as `items`; JSON Schema requires a list.
            raise _schema_error(f"prefixItems must be a list of schemas, got {type(prefix).__name__}; for one "
                                "schema that every item follows, use items", path, "prefixItems")
        prefix = list(prefix or [])
        min_items = schema.get("minItems", 0)
        max_items = schema.get("maxItems")
        for key, value in (("minItems", min_items), ("maxItems", max_items)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise _schema_error(f"{key} must be a non-negative integer, got {value!r}", path, key)
        if items is False:
            max_items = len(prefix) if max_items is None else min(max_items, len(prefix))
        if max_items is not None and max_items < min_items:
            raise _schema_error(f"maxItems {max_items} is below minItems {min_items}"
                                + (" (items is false)" if items is False else ""), path, "maxItems")
        ws = self.prim("ws")
        n_prefix = len(prefix) if max_items is None else min(len(prefix), max_items)
        elems = [f"{self.visit(s, _child(path, 'prefixItems', i), f'{hint}-{i}')} {ws}" for i, s in enumerate(prefix[:n_prefix])]
        # The repeated part after the prefix.
        tail = ""
        rep_lo = max(0, min_items - n_prefix)
        rep_hi = None if max_items is None else max_items - n_prefix
        item = None
        if rep_hi != 0 and items is not False:
            item = f"{self.visit(True if items is None else items, _child(path, 'items'), f'{hint}-item')} {ws}"
        if item is not None:
            if rep_lo > _MAX_REPETITION:
                raise _schema_error(f"minItems {min_items} is above what a llama.cpp grammar can repeat", path,
                                    "minItems")
            hi = rep_hi if rep_hi is not None and rep_hi <= _MAX_REPETITION else None
            if not elems:
                # item ("," item){lo-1, hi-1}, optional when lo == 0
                more = f'("," {ws} {item}){_quantifier(max(rep_lo - 1, 0), None if hi is None else hi - 1)}' \
                    if hi != 1 else ""
                content = _join(item, more)
                body = _join('"["', ws, content if rep_lo >= 1 else f"({content})?", '"]"')
                return body if inline else self.named(hint, body)
            tail = f'("," {ws} {item}){_quantifier(rep_lo, hi)}'
        elif rep_lo > 0:
            raise _schema_error(f"minItems {min_items} cannot be met (items is false)", path, "minItems")
        # Positions 1..n of the prefix: the first `min_items` are required.
        rest = tail
        for i in range(len(elems) - 1, 0, -1):
            piece = _join('","', ws, elems[i], rest)
            rest = piece if i < min_items else f"({piece})?"
            if len(rest) > 60:
                rest = self.named(f"{hint}-from-{i}", rest)
        content = _join(elems[0], rest) if elems else ""
        if elems and min_items < 1:
            content = f"({content})?"
        body = _join('"["', ws, content, '"]"')
        return body if inline else self.named(hint, body)


def _meaningful(schema: Dict[str, Any]) -> bool:
    return any(k not in _ANNOTATIONS for k in schema)


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def _paren(text: str) -> str:
    return f"({text})"


def _alternatives(alts: List[str], inline: bool) -> str:
    alts = list(dict.fromkeys(alts))
    if len(alts) == 1:
        return alts[0]
    text = " | ".join(alts)
    return text if inline else f"({text})"


def _digit_class(a: int, b: int) -> str:
    return f'"{a}"' if a == b else f"[{a}-{b}]"


def _same_length_range(a: str, b: str) -> str:
    """GBNF for the digit strings of length len(a) between a and b (inclusive, a <= b)."""
    if a == b:
        return f'"{a}"'
    n = len(a)
    if n == 1:
        return _digit_class(int(a), int(b))
    if a[0] == b[0]:
        return f'"{a[0]}" {_paren(_same_length_range(a[1:], b[1:]))}'
    x, y = int(a[0]), int(b[0])
    alts = []
    if a[1:] != "0" * (n - 1):
        alts.append(f'"{x}" {_paren(_same_length_range(a[1:], "9" * (n - 1)))}')
        x += 1
    last = None
    if b[1:] != "9" * (n - 1):
        last = f'"{y}" {_paren(_same_length_range("0" * (n - 1), b[1:]))}'
        y -= 1
    if x <= y:
        alts.append(f"{_digit_class(x, y)} [0-9]{{{n - 1}}}")
    if last:
        alts.append(last)
    return alts[0] if len(alts) == 1 else _paren(" | ".join(alts))


def _uint_range(lo: int, hi: Optional[int]) -> str:
    """GBNF for non-negative integers (no leading zeros) in [lo, hi]; hi None: up to 16 digits
    (or the length of lo, if longer)."""
    alts = []
    d_lo = len(str(lo))
    d_hi = len(str(hi)) if hi is not None else max(16, d_lo)
    for d in range(d_lo, d_hi + 1):
        a = max(lo, 10 ** (d - 1) if d > 1 else 0)
        b = (10 ** d - 1) if hi is None else min(hi, 10 ** d - 1)
        if a > b:
            continue
        if hi is None and a == 10 ** (d - 1) and d > 1:
            alts.append(f"[1-9] [0-9]{{{d - 1},{d_hi - 1}}}")
            break
        alts.append(_same_length_range(str(a), str(b)))
    return alts[0] if len(alts) == 1 else _paren(" | ".join(alts))


def _magnitude(c: int, c_excl: bool, d: Optional[int], d_excl: bool) -> List[str]:
    """Alternatives for decimal numbers x (no sign, no exponent) with c <(=) x <(=) d."""
    low_int = c + 1 if c_excl else c
    alts = []
    if d is None:
        alts.append(f"{_uint_range(low_int, None)} {_FRACTION}")
    else:
        if low_int <= d - 1:
            alts.append(f"{_uint_range(low_int, d - 1)} {_FRACTION}")
        if not d_excl and d >= low_int:
            alts.append(f'"{d}" ("." [0]{{1,16}})?')
    if c_excl and (d is None or c < d):
        alts.append(f'"{c}" "." [0-9]{{0,15}} [1-9]')
    return alts


def json_schema_to_gbnf(schema: Any, *, root: str = "root") -> str:
    """A GBNF grammar whose outputs are JSON documents valid under `schema`.

    `schema` is a dict, JSON text, or a pydantic model class (its ``model_json_schema()``).
    Objects that declare ``properties`` get no other properties unless
    ``additionalProperties`` says otherwise; optional properties may be left out and
    properties come in the declared order.  Whitespace between tokens is bounded (see
    :data:`WHITESPACE_RULE`).  Keywords pyllama cannot express raise JSONSchemaError naming
    the keyword and where it is; the supported subset is listed in docs/grammars.md.
    """
    if not isinstance(root, str) or not _RULE_NAME_RE.match(root):
        raise ValueError(f"root must be a GBNF rule name (letters, digits, '-'), got {root!r}")
    schema = _schema_document(schema)
    if json_nesting(schema) > MAX_JSON_NESTING:
        raise JSONSchemaError(f"the JSON schema nests objects/arrays more than {MAX_JSON_NESTING} levels deep "
                              "(pyllama's limit)")
    key = _cache_key(schema, root)
    if key is not None:
        with _CACHE_LOCK:
            grammar = _CACHE.get(key)
            if grammar is not None:
                _CACHE.move_to_end(key)
                return grammar
    try:
        grammar = _SchemaConverter(schema, root).grammar(schema)
    except RecursionError:
        # A safety net only: the depth limits above keep the walk far from Python's limit
        # unless the caller itself is already deep in the stack.
        raise JSONSchemaError(f"the JSON schema is nested too deeply to convert (pyllama allows "
                              f"{MAX_SCHEMA_DEPTH} levels of subschemas)") from None
    try:
        precheck_gbnf(grammar)
    except JSONSchemaError:
        raise
    except GrammarError as e:
        raise JSONSchemaError(f"the schema produces a grammar llama.cpp cannot use: {e}") from None
    if key is not None:
        with _CACHE_LOCK:
            _CACHE[key] = grammar
            if len(_CACHE) > _CACHE_ENTRIES:
                _CACHE.popitem(last=False)
    return grammar


# Converted schemas by (root, the schema's JSON text).  The text keeps the key order, which
# matters: properties are generated in their declared order.  Only successes are cached.
_CACHE: "OrderedDict[Tuple[str, str], str]" = OrderedDict()
_CACHE_LOCK = Lock()
_CACHE_ENTRIES = 64


def json_schema_cache_clear() -> None:
    """Forget the cached conversions (for tests and measurements)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _cache_key(schema: Any, root: str) -> Optional[Tuple[str, str]]:
    """(root, canonical JSON text) of a schema, or None when it has no faithful JSON text
    (non-string keys, NaN, objects json cannot write): such schemas are converted every time."""
    try:
        text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False,
                          default=_unkeyable)
    except (TypeError, ValueError, RecursionError):
        return None
    if _ambiguous_as_json(schema):
        return None
    return root, text


def _unkeyable(value: Any) -> Any:
    raise TypeError(f"not JSON: {type(value).__name__}")


def _ambiguous_as_json(value: Any) -> bool:
    """True when two schemas the converter treats differently could share this JSON text:
    json.dumps writes {1: x} like {"1": x} and a tuple like a list."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            for k, child in v.items():
                if not isinstance(k, str):
                    return True
                stack.append(child)
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, tuple):
            return True
    return False


def _schema_document(schema: Any) -> Any:
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        return schema.model_json_schema()
    if isinstance(schema, (str, bytes)):
        try:
            return json.loads(schema)
        except ValueError as e:
            raise JSONSchemaError(f"the JSON schema is not valid JSON: {e}") from None
        except RecursionError:
            raise JSONSchemaError(f"the JSON schema nests objects/arrays more than {MAX_JSON_NESTING} levels "
                                  "deep (pyllama's limit)") from None
    if isinstance(schema, (dict, bool)):
        return schema
    if hasattr(schema, "model_json_schema"):  # a pydantic model instance
        return type(schema).model_json_schema()
    raise TypeError(f"json_schema must be a dict, JSON text or a pydantic model class, not {type(schema).__name__}")
