"""How far counted repetitions expand (server/repetition.py): what the server limits with
--max-regex-repetition, as a regex and in a Lark grammar."""
from __future__ import annotations

import pytest

from gptserve.server.repetition import lark_expansion, regex_expansion


@pytest.mark.parametrize("regex, expansion", [
    ("abc", 0), ("a*b+c?", 0),  # no counts: nothing expands
    ("[0-9]{3}-[a-z]{2}", 3), ("a{30000}", 30000), ("a{2,7}", 7), ("a{5,}", 5),
    ("(abc){100}", 300),  # what a count repeats, times the count
    ("(a{1000}){1000}", 1_000_000), ("((a{100}){100}){100}", 1_000_000),  # nested counts multiply
    (r"\d{4}", 4), (r"\p{L}{10}", 10), (r"\{9999\}", 0),  # escapes are one item; escaped braces no count
    ("[]{]{3}", 3), ("[a-z&&[^aeiou]]{6}", 6), ("[(]{5}", 5),  # classes are one item, brackets and all
])
def test_regex_expansion(regex: str, expansion: int):
    assert regex_expansion(regex) == expansion


@pytest.mark.parametrize("grammar, expansion", [
    ('start: "(" NUM ("+" NUM)* ")"\nNUM: /[1-9]/', 0),
    ('start: "a"~30000', 30000), ('start: "ab"~10', 20),  # a string by its length
    ('start: ("ab" | "c")~100..200', 600), ("start: (x~10)~10", 100),
    ("start: T\nT: /a{300}/", 300), ("start: /(a{100}){3}/~5", 1500),  # a regex terminal's own counts
    ('// "a"~99999 in a comment\nstart: "a"', 0), ('start: "~99999"', 0),  # nor in a comment or string
])
def test_lark_expansion(grammar: str, expansion: int):
    assert lark_expansion(grammar) == expansion
