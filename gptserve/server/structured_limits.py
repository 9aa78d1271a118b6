"""The server's own limits on structured outputs and tools, checked before anything compiles.

A JSON Schema's depth and size, the count of choices and of tools, the length of a regex
or a Lark grammar and how far its counted repetitions expand (repetition.py): each is a
ServerConfig field and a `gptserve serve` flag, and a request over one is a 400 naming its
field and the flag. They keep what reaches the grammar engine to what it compiles in a
second or two and follows at the speed of a step; llguidance's own limits (engine/grammar.py,
PARSER_LIMITS) then catch what is too complex in ways these can't see. The checks walk
without recursion, so a schema nested thousands deep is a 400 like any other.
"""
from __future__ import annotations

from typing import Any, Sequence

from gptserve.config import ServerConfig
from gptserve.server.errors import InvalidRequestError
from gptserve.server.repetition import lark_expansion, regex_expansion


def check_schema_shape(schema: Any, param: str, config: ServerConfig) -> int:
    """400 naming `param` if the schema is nested deeper than --max-schema-depth, has more
    values than --max-schema-size, or a `pattern` whose repetitions expand too far; else its
    size (its values, members' names not counted)."""
    size, todo = 0, [(schema, 1)]
    while todo:
        node, depth = todo.pop()
        size += 1
        if size > config.max_schema_size:
            raise InvalidRequestError(f"{param} has more than {config.max_schema_size} values; this server allows "
                                      f"at most {config.max_schema_size} (--max-schema-size)", param=param)
        if not isinstance(node, (dict, list)):
            continue
        if depth > config.max_schema_depth:
            raise InvalidRequestError(f"{param} is nested more than {config.max_schema_depth} levels deep; this "
                                      f"server allows {config.max_schema_depth} (--max-schema-depth)", param=param)
        if isinstance(node, list):
            todo.extend((v, depth + 1) for v in node)
            continue
        for key, value in node.items():
            if key == "pattern" and isinstance(value, str):
                check_repetition(regex_expansion(value), f"{param} (pattern {value[:40]!r})", param, config)
            todo.append((value, depth + 1))
    return size


def check_tools_size(sizes: Sequence[int], config: ServerConfig) -> None:
    """The tools' schemas together (one grammar) within --max-schema-size."""
    if sum(sizes) > config.max_schema_size:
        raise InvalidRequestError(f"the parameters of the tools have {sum(sizes)} values together; this server "
                                  f"allows at most {config.max_schema_size} (--max-schema-size)", param="tools")


def check_tool_count(num_tools: int, config: ServerConfig, param: str = "tools") -> None:
    if num_tools > config.max_tools:
        raise InvalidRequestError(f"at most {config.max_tools} tools are allowed on this server (--max-tools), "
                                  f"got {num_tools}", param=param)


def check_choices(choices: list[str], config: ServerConfig, param: str = "structured_outputs.choice") -> None:
    if len(choices) > config.max_choices:
        raise InvalidRequestError(f"at most {config.max_choices} choices are allowed on this server (--max-choices), "
                                  f"got {len(choices)}", param=param)


def check_regex(regex: str, param: str, config: ServerConfig) -> None:
    _check_length(regex, param, config)
    check_repetition(regex_expansion(regex), param, param, config)


def check_lark(grammar: str, param: str, config: ServerConfig) -> None:
    _check_length(grammar, param, config)
    check_repetition(lark_expansion(grammar), param, param, config)


def check_repetition(expansion: int, what: str, param: str, config: ServerConfig) -> None:
    if expansion > config.max_regex_repetition:
        raise InvalidRequestError(f"{what} has a counted repetition that expands to {expansion} items; this server "
                                  f"allows {config.max_regex_repetition} (--max-regex-repetition)", param=param)


def _check_length(text: str, param: str, config: ServerConfig) -> None:
    if len(text) > config.max_grammar_length:
        raise InvalidRequestError(f"{param} is {len(text)} characters long; this server allows "
                                  f"{config.max_grammar_length} (--max-grammar-length)", param=param)
