"""JSON Schema -> llama.cpp GBNF grammar for `extract` tasks, and the schema check.

Why our own converter: the xllamacpp build routes `json_schema` through llguidance,
which rejects some vocabularies (the generated tiny model's among them); plain GBNF
works with every vocabulary llama.cpp loads.

The grammar is a guide, the validator is the judge. Every schema that is a valid JSON
Schema (Draft 2020-12) is accepted; the grammar constrains what it can express (type,
properties and required, items with minItems/maxItems, enum, const, anyOf/oneOf,
minLength/maxLength) and lets any JSON value through where it cannot (pattern,
format, minimum, $ref, allOf with several parts, ...). The launcher then validates the
output against the whole schema, so a result's `data` is always valid, or the task
fails `extract_invalid`. Before this, unsupported keywords were refused with 422,
which made the API reject requests its own OpenAPI document allowed.

Objects are emitted with every listed property in schema order, plus any required
name that `properties` does not list (with any value), compact (no whitespace). Free
strings are capped at MAX_STRING characters so that generation always ends.

A leaf module: it imports nothing of the appliance, so the API (which checks a schema
up front) and the launcher (which needs the grammar) share it without depending on
each other. `compile_schema` caches by the schema's canonical JSON, so a schema used
again and again is converted once per process.
"""
from __future__ import annotations

import functools
import json
from typing import Any

import jsonschema

MAX_STRING = 256
MAX_ITEMS = 1000
MAX_DEPTH = 16        # deeper parts of a schema get the any-value rule
MAX_SCHEMA_DEPTH = 64  # deeper than this is refused: a check must not recurse without bound

_PRIMITIVES = {
    "boolean": '("true" | "false")',
    "null": '"null"',
    "integer": '("-"? ("0" | [1-9] [0-9]{0,17}))',
    "number": '("-"? ("0" | [1-9] [0-9]{0,17}) ("." [0-9]{1,17})? ([eE] [-+]? [0-9]{1,2})?)',
}
_CHAR = r'([^"\\\x00-\x1f] | "\\" ["\\/bfnrt])'
# Any JSON value, compact; the rule names are fixed so that one copy serves every use.
_ANY_RULES = {
    "any-value": 'any-object | any-array | any-string | ' + _PRIMITIVES["number"] + ' | "true" | "false" | "null"',
    "any-object": '"{" (any-string ":" any-value ("," any-string ":" any-value)*)? "}"',
    "any-array": '"[" (any-value ("," any-value)*)? "]"',
    "any-string": f'"\\"" {_CHAR}{{0,{MAX_STRING}}} "\\""',
}
_TYPES = {"string", "integer", "number", "boolean", "null", "object", "array"}


class SchemaError(ValueError):
    """The schema is not a valid JSON Schema (or is nested beyond reason)."""


def _literal(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        if d > MAX_SCHEMA_DEPTH:
            break
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((c, d + 1) for c in children)
    return deepest


class _Builder:
    def __init__(self) -> None:
        self.rules: dict[str, str] = {}

    def rule(self, name: str, body: str) -> str:
        base, n = name, 1
        while name in self.rules and self.rules[name] != body:
            n += 1
            name = f"{base}{n}"
        self.rules[name] = body
        return name

    def any_value(self) -> str:
        self.rules.update(_ANY_RULES)
        return "any-value"

    def visit(self, schema: Any, name: str, depth: int) -> str:
        if depth > MAX_DEPTH or not isinstance(schema, dict):
            return self.any_value()  # `true`, or too deep to spell out
        if "const" in schema:
            return _literal(schema["const"])
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return "(" + " | ".join(_literal(v) for v in schema["enum"]) + ")"
        for key in ("anyOf", "oneOf"):
            if isinstance(schema.get(key), list) and schema[key]:
                options = [self.visit(o, f"{name}-{i}", depth + 1) for i, o in enumerate(schema[key])]
                return "(" + " | ".join(options) + ")"
        if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) == 1:
            return self.visit(schema["allOf"][0], name, depth + 1)
        kind = schema.get("type")
        if kind is None:
            kind = "object" if "properties" in schema else "array" if "items" in schema else None
        if isinstance(kind, list):
            kinds = [k for k in kind if k in _TYPES]
            if not kinds:
                return self.any_value()
            return "(" + " | ".join(self.visit({**schema, "type": k}, name, depth + 1) for k in kinds) + ")"
        if kind in _PRIMITIVES:
            return _PRIMITIVES[kind]
        if kind == "string":
            hi = _bounded(schema.get("maxLength"), MAX_STRING, MAX_STRING)
            lo = min(_bounded(schema.get("minLength"), 0, MAX_STRING), hi)
            return self.rule(f"{name}-string", f'"\\"" {_CHAR}{{{lo},{hi}}} "\\""')
        if kind == "array":
            items = schema.get("items")
            item = self.visit(items, f"{name}-item", depth + 1) if isinstance(items, dict) else self.any_value()
            hi = _bounded(schema.get("maxItems"), 64, MAX_ITEMS)
            lo = min(_bounded(schema.get("minItems"), 0, MAX_ITEMS), hi)
            if hi == 0:
                return '"[]"'
            rest = f'("," {item}){{{max(0, lo - 1)},{hi - 1}}}'
            body = f'"[" {item} {rest} "]"' if lo >= 1 else f'"[" ({item} {rest})? "]"'
            return self.rule(f"{name}-array", body)
        if kind == "object":
            props = schema.get("properties")
            props = props if isinstance(props, dict) else {}
            required = [r for r in schema.get("required") or () if isinstance(r, str) and r not in props]
            parts = [f"{_literal(key)} \":\" {self.visit(sub, f'{name}-{_safe(key)}', depth + 1)}"
                     for key, sub in props.items()]
            parts += [f"{_literal(key)} \":\" {self.any_value()}" for key in dict.fromkeys(required)]
            if not parts:
                self.any_value()
                return "any-object"
            return self.rule(f"{name}-object", '"{" ' + ' "," '.join(parts) + ' "}"')
        return self.any_value()


def _bounded(value: Any, default: int, cap: int) -> int:
    return min(value, cap) if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


def _safe(key: str) -> str:
    cleaned = "".join(c if c.isalnum() else "-" for c in key).strip("-").lower()
    return cleaned or "prop"


def _check_schema(schema: Any) -> None:
    """Raise SchemaError unless `schema` is a valid JSON Schema (Draft 2020-12); its depth
    was checked by compile_schema."""
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "(top)"
        raise SchemaError(f"not a valid JSON Schema at {where}: {exc.message[:200]}") from None


@functools.lru_cache(maxsize=256)
def _compile(canonical: str) -> str:
    schema = json.loads(canonical)
    _check_schema(schema)
    b = _Builder()
    root = b.visit(schema, "root", 0)
    lines = [f"root ::= {root}"] + [f"{name} ::= {body}" for name, body in b.rules.items()]
    return "\n".join(lines) + "\n"


def compile_schema(schema: Any) -> str:
    """The GBNF grammar for `schema`, checked first (SchemaError if it is not a schema)."""
    if _depth(schema) > MAX_SCHEMA_DEPTH:  # before json.dumps, which recurses
        raise SchemaError(f"the schema is nested more than {MAX_SCHEMA_DEPTH} levels deep")
    try:
        canonical = json.dumps(schema, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"not a JSON value: {exc}") from None
    return _compile(canonical)
