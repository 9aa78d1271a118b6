"""A request's JSON Schema as the grammar compiler gets it: objects closed, numbers bounded.

Both rewrites are what a small model needs to end its answer; both leave alone whatever
the schema itself says:

- Closed objects: an object that lists its properties takes no others unless it says so
  (as vLLM's default). Let loose on extra keys, a small model invents them until max_tokens.
- Bounded numbers (ServerConfig.json_number_bounds, on by default): an integer without a
  minimum or maximum is held to I-JSON's safe range, |n| <= 2^53 - 1; a number without
  multipleOf to at most 17 significant digits, at most 10 of them after the point, and no
  exponent; and any JSON value a schema leaves open (json_object, an open object's values,
  an array without items) is a value whose numbers are so bounded. Unbounded, a small model
  writes digits until max_tokens. llguidance has no option for a number's digits, so the
  bounds are written in the JSON Schema it compiles: minimum and maximum, and per count of
  decimals a multipleOf (llguidance takes 1e-10 at the finest) intersected with the
  schema's own range.
"""
from __future__ import annotations

from typing import Any

SAFE_INTEGER = 2**53 - 1  # I-JSON (RFC 7493): the integers a double holds exactly
NUMBER_DIGITS = 17  # a double's round-trip precision
MAX_DECIMALS = 10
JSON_VALUE = "gptserve-json-value"  # our $defs entry: any JSON value, its numbers bounded
JSON_VALUE_REF = {"$ref": f"#/$defs/{JSON_VALUE}"}

# where JSON Schema keeps subschemas; "not", "if" and "propertyNames" are left alone, as
# bounding what they test would widen what the schema allows
ONE_SCHEMA = ("additionalProperties", "additionalItems", "items", "contains", "then", "else",
              "unevaluatedItems", "unevaluatedProperties")
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
ANNOTATIONS = {"title", "description", "default", "examples", "$comment", "$id", "$schema", "$anchor", "$defs",
               "definitions", "deprecated", "readOnly", "writeOnly"}


def number_forms() -> list[dict]:
    """A JSON number of at most NUMBER_DIGITS significant digits and MAX_DECIMALS decimals,
    one form per count of decimals: an integer, then multiples of 0.1, 0.01, ..."""
    forms: list[dict] = [{"type": "integer", "minimum": -(10**NUMBER_DIGITS - 1), "maximum": 10**NUMBER_DIGITS - 1}]
    for decimals in range(1, MAX_DECIMALS + 1):
        bound = 10 ** (NUMBER_DIGITS - decimals)
        forms.append({"type": "number", "multipleOf": float(f"1e-{decimals}"),
                      "exclusiveMinimum": -bound, "exclusiveMaximum": bound})
    return forms


def json_value() -> dict:
    """Any JSON value, its numbers bounded (the $defs entry JSON_VALUE)."""
    return {"anyOf": [{"type": "null"}, {"type": "boolean"}, {"type": "string"}, *number_forms(),
                      {"type": "array", "items": JSON_VALUE_REF},
                      {"type": "object", "additionalProperties": JSON_VALUE_REF}]}


def prepare_schema(schema: Any, bound_numbers: bool) -> Any:
    """The schema with its objects closed and, with `bound_numbers`, its numbers bounded
    (a new object: the request's is left as it came)."""
    out = _rewrite(schema, bound_numbers)
    if not bound_numbers or not isinstance(out, dict):
        return out
    return {**out, "$defs": {**out.get("$defs", {}), JSON_VALUE: json_value()}}


def rebase_refs(schema: Any, pointer: str) -> Any:
    """The schema with its local $refs ("#...") pointing into it at `pointer`, its place in
    a larger document (a tool's parameters, inside the schema of a call)."""
    if isinstance(schema, list):
        return [rebase_refs(s, pointer) for s in schema]
    if not isinstance(schema, dict):
        return schema
    return {k: (pointer.join(("#", v[1:])) if k == "$ref" and isinstance(v, str) and v.startswith("#")
                else v if k in ("const", "enum", "default", "examples") else rebase_refs(v, pointer))
            for k, v in schema.items()}


def _rewrite(node: Any, bound_numbers: bool) -> Any:
    if node is True:
        return dict(JSON_VALUE_REF) if bound_numbers else True
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in SCHEMA_LISTS and isinstance(value, list):
            out[key] = [_rewrite(v, bound_numbers) for v in value]
        elif key in SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _rewrite(v, bound_numbers) for name, v in value.items()}
        elif key in ONE_SCHEMA:
            out[key] = _rewrite(value, bound_numbers)
        else:
            out[key] = value
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    if bound_numbers:
        _bound(out)
    return out


def _bound(node: dict) -> None:
    """Bound, in place, the numbers and open values one (already rewritten) schema allows."""
    if "const" in node or "enum" in node:
        return
    types = node.get("type")
    types = [types] if isinstance(types, str) else list(types) if isinstance(types, list) else []
    if not types:
        if set(node) <= ANNOTATIONS:  # nothing but words about it: any value
            node.update(JSON_VALUE_REF)
        return
    # a node that is also other schemas ($ref, anyOf, ...) is their intersection: they bound it
    composite = bool({"$ref", "anyOf", "allOf", "oneOf"} & set(node))
    if "number" in types and "multipleOf" not in node and not composite:
        others = [{"type": t} for t in types if t not in ("number", "integer")]
        node["anyOf"] = number_forms() + others  # intersected with the node's own keywords
    elif "integer" in types or "number" in types:
        limit = SAFE_INTEGER if "number" not in types else 10**NUMBER_DIGITS - 1
        _bound_range(node, limit)
    if composite:
        return
    if "object" in types and not {"properties", "additionalProperties", "patternProperties"} & set(node):
        node["additionalProperties"] = dict(JSON_VALUE_REF)
    if "array" in types and "items" not in node:
        node["items"] = dict(JSON_VALUE_REF)


def _bound_range(node: dict, limit: int) -> None:
    """Give a numeric schema the side of [-limit, limit] it lacks (a side beyond it: a window
    of the same width past its own bound)."""
    low = _number(node.get("minimum"), node.get("exclusiveMinimum"))
    high = _number(node.get("maximum"), node.get("exclusiveMaximum"))
    if low is None:
        node["minimum"] = -limit if high is None or high >= -limit else high - 2 * limit
    if high is None:
        node["maximum"] = limit if low is None or low <= limit else low + 2 * limit


def _number(inclusive: Any, exclusive: Any) -> float | None:
    """A schema's bound on one side, whichever keyword gives it (draft 4's boolean
    exclusiveMinimum only qualifies minimum)."""
    for value in (inclusive, exclusive):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
    return None
