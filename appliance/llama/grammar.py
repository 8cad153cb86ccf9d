"""JSON schema -> llama.cpp GBNF grammar, for `extract` tasks.

Why our own: the xllamacpp build routes `json_schema` through llguidance, which
rejects some vocabularies (the generated tiny model's among them); plain GBNF works
with every vocabulary llama.cpp loads. The subset below covers what extraction
schemas use; anything else is refused up front (422), never silently ignored.

Supported: type (string, integer, number, boolean, null, object, array, or a list of
these), properties/required, items/minItems/maxItems, enum, const, anyOf/oneOf,
maxLength/minLength on strings. Objects are emitted with every listed property in
schema order (an optional property that is present is still valid), compact (no
whitespace). Free strings are capped at MAX_STRING characters so that generation
always ends; a shorter string is valid against any schema that allows a longer one.
"""
from __future__ import annotations

import json
from typing import Any

MAX_STRING = 256
MAX_DEPTH = 16

_PRIMITIVES = {
    "boolean": '("true" | "false")',
    "null": '"null"',
    "integer": '("-"? ("0" | [1-9] [0-9]{0,17}))',
    "number": '("-"? ("0" | [1-9] [0-9]{0,17}) ("." [0-9]{1,17})? ([eE] [-+]? [0-9]{1,2})?)',
}
_CHAR = r'([^"\\\x00-\x1f] | "\\" ["\\/bfnrt])'
_KNOWN = {"type", "properties", "required", "items", "minItems", "maxItems", "enum", "const", "anyOf", "oneOf",
          "maxLength", "minLength", "title", "description", "additionalProperties", "$schema", "default",
          "examples"}


class SchemaError(ValueError):
    """The schema uses something this converter cannot enforce."""


def _literal(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


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

    def visit(self, schema: Any, name: str, depth: int) -> str:
        if depth > MAX_DEPTH:
            raise SchemaError(f"nested deeper than {MAX_DEPTH} levels")
        if schema is True or schema == {}:
            raise SchemaError(f"`{name}` allows any value; give it a type")
        if not isinstance(schema, dict):
            raise SchemaError(f"`{name}` is not a schema object")
        unknown = set(schema) - _KNOWN
        if unknown:
            raise SchemaError(f"`{name}` uses unsupported keywords: {', '.join(sorted(unknown))}")
        if "const" in schema:
            return _literal(schema["const"])
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise SchemaError(f"`{name}`: enum must be a non-empty list")
            return "(" + " | ".join(_literal(v) for v in values) + ")"
        for key in ("anyOf", "oneOf"):
            if key in schema:
                options = schema[key]
                if not isinstance(options, list) or not options:
                    raise SchemaError(f"`{name}`: {key} must be a non-empty list")
                return "(" + " | ".join(self.visit(o, f"{name}-{i}", depth + 1) for i, o in enumerate(options)) + ")"
        kind = schema.get("type")
        if isinstance(kind, list):
            if not kind:
                raise SchemaError(f"`{name}`: empty type list")
            return "(" + " | ".join(self.visit({**schema, "type": k}, name, depth + 1) for k in kind) + ")"
        if kind in _PRIMITIVES:
            return _PRIMITIVES[kind]
        if kind == "string":
            lo = schema.get("minLength", 0)
            hi = min(schema.get("maxLength", MAX_STRING), MAX_STRING)
            if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi):
                raise SchemaError(f"`{name}`: bad minLength/maxLength")
            return self.rule(f"{name}-string", f'"\\"" {_CHAR}{{{lo},{hi}}} "\\""')
        if kind == "array":
            items = schema.get("items")
            if items is None:
                raise SchemaError(f"`{name}`: an array needs `items`")
            item = self.visit(items, f"{name}-item", depth + 1)
            lo = schema.get("minItems", 0)
            hi = schema.get("maxItems", 64)
            if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi <= 1000):
                raise SchemaError(f"`{name}`: bad minItems/maxItems")
            if hi == 0:
                return '"[]"'
            rest = f'("," {item}){{{max(0, lo - 1)},{hi - 1}}}'
            body = f'"[" {item} {rest} "]"' if lo >= 1 else f'"[" ({item} {rest})? "]"'
            return self.rule(f"{name}-array", body)
        if kind == "object":
            props = schema.get("properties") or {}
            if not isinstance(props, dict) or not props:
                raise SchemaError(f"`{name}`: an object needs `properties`")
            required = schema.get("required", [])
            missing = [r for r in required if r not in props]
            if missing:
                raise SchemaError(f"`{name}`: required names unknown properties: {', '.join(missing)}")
            parts = []
            for key, sub in props.items():
                value = self.visit(sub, f"{name}-{_safe(key)}", depth + 1)
                parts.append(f"{_literal(key)} \":\" {value}")
            return self.rule(f"{name}-object", '"{" ' + ' "," '.join(parts) + ' "}"')
        raise SchemaError(f"`{name}`: unsupported or missing type {kind!r}")


def _safe(key: str) -> str:
    cleaned = "".join(c if c.isalnum() else "-" for c in key).strip("-").lower()
    return cleaned or "prop"


def schema_to_gbnf(schema: dict) -> str:
    b = _Builder()
    root = b.visit(schema, "root", 0)
    lines = [f"root ::= {root}"] + [f"{name} ::= {body}" for name, body in b.rules.items()]
    return "\n".join(lines) + "\n"
