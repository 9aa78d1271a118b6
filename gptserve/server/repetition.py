"""How far the counted repetitions of a regex or a Lark grammar expand.

llguidance follows a regex by derivatives, and a counted repetition costs what it expands
to, whatever its fuel limits (they bound other work): `a{30000}` makes every token mask
take a second, `(a{1000}){1000}` never finishes one, and a mask is computed inside the
engine's step, for the whole batch. So the server refuses a repetition whose expansion (the
size of what it repeats, times its count, times the counts of the repetitions around it)
passes --max-regex-repetition. Sizes are counted in items (a character, a class, an escape),
a Lark string by its length; `*` and `+` are free: derivatives handle them in one state.
"""
from __future__ import annotations

import re

COUNT = re.compile(r"\{(\d+)(?:,(\d*))?\}")  # {n}, {n,} and {n,m}
LARK_COUNT = re.compile(r"~\s*(\d+)(?:\s*\.\.\s*(\d+))?")  # item~n and item~n..m


def regex_expansion(regex: str) -> int:
    """The largest expansion of a counted repetition in `regex` (0 when it has none)."""
    return _regex_sizes(regex)[1]


def lark_expansion(grammar: str) -> int:
    """The largest expansion of a counted repetition in a Lark grammar: its `item~n` (groups
    included) and the counted repetitions inside its regex terminals. Repetitions across
    rules are not multiplied: a rule's repetitions grow the grammar, which llguidance bounds."""
    levels, last, worst, i = [0], 0, 0, 0
    while i < len(grammar):
        c = grammar[i]
        if grammar.startswith("//", i):  # a comment, to the end of the line
            end = grammar.find("\n", i)
            i = len(grammar) if end < 0 else end
            continue
        item = None
        if c == '"':
            end = _string_end(grammar, i, '"')
            item, i = max(1, end - i - 2), end
        elif c == "/":
            end = _string_end(grammar, i, "/")
            size, inner = _regex_sizes(grammar[i + 1:end - 1])
            worst, item, i = max(worst, inner), max(1, size), end
        elif c in "([{":
            levels.append(0)
            i += 1
            continue
        elif c in ")]}":
            item = levels.pop() if len(levels) > 1 else 0
            i += 1
        elif c == "~" and (m := LARK_COUNT.match(grammar, i)):
            expanded = last * int(m.group(2) or m.group(1))
            worst, levels[-1], last = max(worst, expanded), levels[-1] + expanded - last, expanded
            i = m.end()
            continue
        elif c.isalnum() or c == "_":
            end = i
            while end < len(grammar) and (grammar[end].isalnum() or grammar[end] in "_."):
                end += 1
            item, i = 1, end
        else:
            i += 1
            continue
        levels[-1] += item
        last = item
    return worst


def _regex_sizes(regex: str) -> tuple[int, int]:
    """(the expanded size of the whole regex, the largest expansion of one repetition)."""
    levels, last, worst, i = [0], 0, 0, 0  # levels: the expanded size of each open group so far
    while i < len(regex):
        c = regex[i]
        if c == "(":
            levels.append(0)
            i += 1
            continue
        if c == ")" and len(levels) > 1:
            last = levels.pop()
            levels[-1] += last
            i += 1
            continue
        if c == "{" and (m := COUNT.match(regex, i)):
            count = int(m.group(2)) if m.group(2) else int(m.group(1))  # {n,m}: m; {n,} and {n}: n
            expanded = last * count
            worst, levels[-1], last = max(worst, expanded), levels[-1] + expanded - last, expanded
            i = m.end()
            continue
        if c in "*+?|^$":
            i += 1
            continue
        if c == "\\":
            i = _escape_end(regex, i)
        elif c == "[":
            i = _class_end(regex, i)
        else:
            i += 1
        levels[-1] += 1
        last = 1
    return sum(levels), worst


def _escape_end(regex: str, i: int) -> int:
    """Past the escape at i: \\x, or \\p{...}, \\x{...} and \\u{...}."""
    if regex[i + 1:i + 2] in ("p", "P", "x", "u") and regex[i + 2:i + 3] == "{":
        end = regex.find("}", i + 3)
        return len(regex) if end < 0 else end + 1
    return i + 2


def _class_end(regex: str, i: int) -> int:
    """Past the character class opening at i (classes nest: [a-z&&[^aeiou]])."""
    depth = 0
    while i < len(regex):
        c = regex[i]
        if c == "\\":
            i += 2
            continue
        i += 1
        if c == "[":
            depth += 1
            i += regex.startswith("^", i)
            i += regex.startswith("]", i)  # a "]" first in a class is itself
        elif c == "]":
            depth -= 1
            if depth == 0:
                return i
    return i


def _string_end(text: str, i: int, quote: str) -> int:
    """Past the string or regex literal opening at i (backslash escapes, then flags)."""
    j = i + 1
    while j < len(text) and text[j] != quote:
        j += 2 if text[j] == "\\" else 1
    j += 1
    while j < len(text) and text[j].isalpha():  # flags: "..."i, /.../s
        j += 1
    return min(j, len(text))
