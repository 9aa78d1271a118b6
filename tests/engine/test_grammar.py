"""Grammars in the engine (engine/grammar.py): compiled once on the grammar threads and
probed before their request goes in, so a grammar past one of llguidance's limits, or too
slow to follow, is refused at admission; one that fails later fails its own request alone,
as a grammar failure, with every block given back."""
from __future__ import annotations

import json

import llguidance
import pytest

from gptserve.engine.grammar import GrammarCompiler
from gptserve.engine.outputs import FinishReason, GrammarError
from gptserve.engine.sampling_params import SamplingParams
from gptserve.model.tokenizer import Tokenizer


def lark(text: str) -> str:
    return llguidance.LLMatcher.grammar_from_lark(text)


def choice_rules(n: int) -> str:
    """n alternatives of one Lark rule: the parser holds them all in one row."""
    return " | ".join(json.dumps(f"w{i}") for i in range(n))


@pytest.fixture(scope="module")
def compiler(tiny_checkpoint) -> GrammarCompiler:
    return GrammarCompiler(Tokenizer.from_folder(tiny_checkpoint), 50257)


def test_a_grammar_is_compiled_once_and_copied(compiler: GrammarCompiler):
    grammar = llguidance.LLMatcher.grammar_from_regex("[0-9]{3}")
    assert compiler.prepare(grammar) is compiler.prepare(grammar)
    first, second = compiler.matcher(grammar), compiler.matcher(grammar)
    assert first is not second and first.consume_token(15)  # "0": each sequence its own state
    assert not second.is_error()


def test_a_grammar_past_the_parsers_row_limit_is_refused_when_prepared(compiler: GrammarCompiler):
    with pytest.raises(GrammarError, match="max_items_in_row"):
        compiler.prepare(lark(f"start: {choice_rules(3000)}")).result()
    compiler.prepare(lark(f"start: {choice_rules(1500)}")).result()  # within it: fine


def test_a_grammar_too_slow_to_follow_is_refused_when_prepared(compiler: GrammarCompiler):
    with pytest.raises(GrammarError, match="too slow to follow"):
        compiler.prepare(llguidance.LLMatcher.grammar_from_regex("a{30000}")).result()


def test_a_grammar_that_does_not_compile_is_refused(compiler: GrammarCompiler):
    with pytest.raises(GrammarError, match="does not compile"):
        compiler.prepare(lark("start: undefined_rule")).result()


def test_a_long_chain_of_rules_compiles_on_the_grammar_threads(compiler: GrammarCompiler):
    """Past 3,000 rules llguidance's recursion overflows an 8 MiB thread stack, killing the process."""
    chain = "start: r0\n" + "".join(f"r{i}: r{i + 1}\n" for i in range(20_000)) + 'r20000: "z"\n'
    compiler.prepare(lark(chain)).result()


# 40 characters, then a 3,000-way rule: the admission probe walks 8 tokens, so the parser's
# row limit is met while the answer is written
LATE_TROUBLE = lark("start: " + "c " * 40 + f'word\nc: "x" | "y"\nword: {choice_rules(3000)}')


def test_a_grammar_failing_mid_answer_fails_its_request_alone(make_engine):
    engine = make_engine()
    engine.add_request("late", [1, 2, 3], SamplingParams(max_tokens=80, grammar=LATE_TROUBLE))
    engine.add_request("plain", [4, 5, 6], SamplingParams(max_tokens=60, ignore_eos=True))
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    [failed] = [o for o in outputs if o.request_id == "late" and o.error]
    assert failed.finished and failed.grammar_failed and "max_items_in_row" in failed.error
    plain = [c for o in outputs if o.request_id == "plain" for c in o.choices]
    assert sum(len(c.token_ids) for c in plain) == 60 and plain[-1].finish_reason == FinishReason.LENGTH
