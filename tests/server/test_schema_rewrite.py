"""Schemas as the grammar compiler gets them (server/schema_rewrite.py), checked on the
compiled grammar itself: which JSON texts llguidance lets through, token by token on the
bundled model's vocabulary. Numbers a schema leaves unbounded are bounded (integers to
|n| <= 2^53 - 1, numbers to 17 significant digits and 10 decimals), whatever the schema
bounds stays as it says, objects that list their properties are closed."""
from __future__ import annotations

import asyncio
import json

import llguidance
import llguidance.tiktoken
import pytest

from gptserve.config import ServerConfig
from gptserve.model.tokenizer import Tokenizer
from gptserve.server.protocol import Tool
from gptserve.server.schema_rewrite import SAFE_INTEGER, prepare_schema
from gptserve.server.structured import JSON_LAYOUT, tool_plan
from gptserve.weights.loader import DEFAULT_MODEL_DIR


@pytest.fixture(scope="module")
def lltokenizer() -> llguidance.LLTokenizer:
    tokenizer = Tokenizer.from_folder(DEFAULT_MODEL_DIR)
    return llguidance.tiktoken.lltokenizer_from_encoding(tokenizer.encoding, n_vocab=tokenizer.vocab_size,
                                                         eos_token=tokenizer.eos_token_id)


def accepts(lltokenizer, grammar: str, text: str) -> bool:
    matcher = llguidance.LLMatcher(lltokenizer, grammar, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    return matcher.consume_tokens(lltokenizer.tokenize_str(text)) and matcher.is_accepting()


def schema_accepts(lltokenizer, schema, text: str, bound: bool = True) -> bool:
    grammar = llguidance.LLMatcher.grammar_from_json_schema(prepare_schema(schema, bound), overrides=JSON_LAYOUT)
    return accepts(lltokenizer, grammar, text)


TWO_INTEGERS = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"]}


def test_an_unbounded_integer_is_held_to_the_safe_range(lltokenizer):
    assert schema_accepts(lltokenizer, TWO_INTEGERS, f'{{"a": {SAFE_INTEGER}, "b": -{SAFE_INTEGER}}}')
    assert schema_accepts(lltokenizer, TWO_INTEGERS, '{"a": 0, "b": 42}')
    assert not schema_accepts(lltokenizer, TWO_INTEGERS, f'{{"a": {SAFE_INTEGER + 1}, "b": 1}}')
    assert not schema_accepts(lltokenizer, TWO_INTEGERS, '{"a": 12345678901234567890, "b": 1}')  # 20 digits
    assert schema_accepts(lltokenizer, TWO_INTEGERS, '{"a": 12345678901234567890, "b": 1}', bound=False)


@pytest.mark.parametrize("text, ok", [
    ("3.25", True), ("-0.5", True), ("100", True), ("12345678.123456789", True), ("0.0000000001", True),
    ("12345678901234567", True), ("123456789012345678", False),  # 17 significant digits, not 18
    ("1.23456789012", False), ("0.00000000001", False),  # 10 decimals, not 11
    ("1e5", False), ("1.5E-3", False),  # no exponent
])
def test_an_unbounded_number_has_at_most_17_digits_and_10_decimals(lltokenizer, text: str, ok: bool):
    assert schema_accepts(lltokenizer, {"type": "number"}, text) is ok
    assert schema_accepts(lltokenizer, {"type": "number"}, text, bound=False)


def test_what_the_schema_bounds_stays_its_own(lltokenizer):
    assert schema_accepts(lltokenizer, {"type": "number", "minimum": 0}, "2.5")
    assert not schema_accepts(lltokenizer, {"type": "number", "minimum": 0}, "-1")
    assert schema_accepts(lltokenizer, {"type": "integer", "minimum": 10**15}, str(10**15 + 7))
    assert not schema_accepts(lltokenizer, {"type": "integer", "minimum": 0, "maximum": 9}, "10")
    assert schema_accepts(lltokenizer, {"type": ["number", "null"]}, "null")
    assert schema_accepts(lltokenizer, {"type": ["integer", "string"], "minLength": 2}, '"ab"')
    assert not schema_accepts(lltokenizer, {"type": ["integer", "string"], "minLength": 2}, '"a"')


def test_any_json_object_holds_its_numbers_bounded_at_every_depth(lltokenizer):
    schema = {"type": "object"}  # response_format json_object
    assert schema_accepts(lltokenizer, schema, '{"a": [1.5, {"b": null, "c": true}], "d": "x"}')
    assert not schema_accepts(lltokenizer, schema, '{"a": [1, {"b": 123456789012345678901}]}')
    assert not schema_accepts(lltokenizer, schema, '{"a": 1e400}')
    assert schema_accepts(lltokenizer, schema, '{"a": 1e400}', bound=False)
    assert schema_accepts(lltokenizer, {"type": "array"}, '[1, "x", [true, {"k": -2.25}]]')
    assert not schema_accepts(lltokenizer, {"type": "array"}, "[[" + "9" * 25 + "]]")


def test_objects_that_list_their_properties_take_no_others(lltokenizer):
    listed = {"type": "object", "properties": {"x": {"type": "integer"}}}
    assert schema_accepts(lltokenizer, listed, '{"x": 1}')
    assert not schema_accepts(lltokenizer, listed, '{"x": 1, "y": 2}')
    open_too = {**listed, "additionalProperties": True}
    assert schema_accepts(lltokenizer, open_too, '{"x": 1, "y": [2.5]}')
    assert not schema_accepts(lltokenizer, open_too, '{"x": 1, "y": ' + "7" * 20 + "}")


def test_a_tools_recursive_parameters_resolve_inside_the_call(lltokenizer):
    node = {"type": "object", "properties": {"v": {"type": "integer"},
                                             "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
            "required": ["v", "kids"]}
    tree = {"type": "object", "$ref": "#/$defs/node", "$defs": {"node": node}}
    tools = [Tool.model_validate({"type": "function", "function": {"name": name, "parameters": tree}})
             for name in ("plant", "prune")]
    plan = asyncio.run(tool_plan(tools, "required", False, ServerConfig()))
    call = {"name": "prune", "arguments": {"v": 1, "kids": [{"v": 2, "kids": []}]}}
    assert accepts(lltokenizer, plan.grammar, f"<tool_call>{json.dumps(call)}</tool_call>")
    call["arguments"]["v"] = 10**20
    assert not accepts(lltokenizer, plan.grammar, f"<tool_call>{json.dumps(call)}</tool_call>")
