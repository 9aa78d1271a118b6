"""llguidance's limits and the words of its errors: shared by the server, which checks a
grammar when it builds one, and the engine, which compiles and follows it. Imports no torch.
"""
from __future__ import annotations

import re

import llguidance

# llguidance's own defaults, spelled out: the server checks grammars against the same ones;
# verbose errors would put the parser's state and the grammar in the message
PARSER_LIMITS = llguidance.LLParserLimits(
    max_items_in_row=2000, initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000, step_max_items=50_000,
    max_lexer_states=250_000, max_grammar_size=500_000, precompute_large_lexemes=True, verbose_errors=False)
MESSAGE_CHARS = 600  # of an llguidance error, in a client's error message
# llguidance's words for each limit it enforces (LLParserLimits' fields)
LIMIT_MESSAGES = {
    "max_items_in_row": re.compile(r"row has \d+ items"),
    "step_max_items": re.compile(r"Too many items"),
    "max_lexer_states": re.compile(r"too many states"),
    "max_grammar_size": re.compile(r"grammar size .*too big"),
    "initial_lexer_fuel": re.compile(r"initial lexer configuration|lexer precomputation failed|too many expressions"),
    "step_lexer_fuel": re.compile(r"fuel exhausted"),
}


def limit_of(message: str) -> str | None:
    """The LLParserLimits field an llguidance error message reports, if it reports one."""
    return next((name for name, pattern in LIMIT_MESSAGES.items() if pattern.search(message)), None)


def describe(message: str) -> str:
    """llguidance's error message, naming the limit it hit (and its value) when it hit one."""
    message = message.replace("<non-verbose/>", "").strip()
    if len(message) > MESSAGE_CHARS:  # llguidance quotes the grammar's text around an error
        message = message[:MESSAGE_CHARS] + " ..."
    limit = limit_of(message)
    if limit is None:
        return message
    return f"{message} (the grammar engine's limit {limit}, {getattr(PARSER_LIMITS, limit)})"
