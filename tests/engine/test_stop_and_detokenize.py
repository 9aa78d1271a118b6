"""Stop conditions and incremental text: stop strings across token boundaries, EOS, lengths."""
from __future__ import annotations

from pathlib import Path

from gptserve.engine.detokenizer import StreamDetokenizer
from gptserve.engine.outputs import FinishReason
from gptserve.engine.sampling_params import SamplingParams
from gptserve.model.tokenizer import Tokenizer
from tests.engine.conftest import random_prompts

TOKENIZER_DIR = Path(__file__).parents[2] / "gptserve" / "weights" / "default_model"


def stream(text: str, stop: list[str], include: bool = False) -> tuple[str, str | None]:
    tok = Tokenizer.from_folder(TOKENIZER_DIR)
    detok = StreamDetokenizer(tok, stop, include)
    out = ""
    for t in tok.encode(text):
        piece, hit = detok.push(t)
        out += piece
        if hit:
            return out, hit
    return out + detok.flush(), None


def test_a_stop_string_spanning_tokens_is_cut_with_everything_after_it():
    assert stream("Hello world, this is a test", ["ld, th"]) == ("Hello wor", "ld, th")


def test_the_stop_string_can_be_kept_on_request():
    assert stream("Hello world, this is a test", ["ld, th"], include=True) == ("Hello world, th", "ld, th")


def test_the_earliest_of_several_stop_strings_wins():
    assert stream("one two three four", ["four", "two"]) == ("one ", "two")


def test_text_that_only_starts_like_a_stop_string_is_released_at_the_end():
    assert stream("abc abd", ["abd!"]) == ("abc abd", None)


def pieces(text: str, stop: list[str]) -> list[tuple[str, str]]:
    """(token text, what that token releases) for each token of `text`, up to a stop."""
    tok = Tokenizer.from_folder(TOKENIZER_DIR)
    detok = StreamDetokenizer(tok, stop)
    out = []
    for t in tok.encode(text):
        piece, hit = detok.push(t)
        out.append((tok.decode([t]), piece))
        if hit:
            break
    return out


def test_text_that_cannot_begin_a_stop_string_goes_out_with_its_own_token():
    out = pieces(" And God said, Let there be light", ["\nUser:"])
    assert all(token == released for token, released in out)


def test_only_a_tail_that_may_grow_into_a_stop_string_is_held():
    out = pieces("one\nUs two\nUser: three", ["\nUser:"])
    assert "".join(released for _, released in out) == "one\nUs two"
    held_at = next(i for i, (token, _) in enumerate(out) if "\n" in token)
    assert "\n" not in out[held_at][1]  # "\n" could begin the stop string: held
    assert all(token == released for token, released in out[:held_at])  # before it, nothing is held


def test_multibyte_characters_split_over_tokens_are_never_broken():
    tok = Tokenizer.from_folder(TOKENIZER_DIR)
    text = "naïve 日本語 🎉👩‍👩‍👧"
    detok = StreamDetokenizer(tok, [])
    pieces = [detok.push(t)[0] for t in tok.encode(text)]
    assert "".join(pieces) + detok.flush() == text
    assert all("\ufffd" not in p for p in pieces)


def _text_and_tokens(engine, prompt, **kw):
    engine.add_request("x", prompt, SamplingParams(temperature=0, **kw))
    text, ids, last = "", [], None
    while engine.has_unfinished():
        for out in engine.step():
            for c in out.choices:
                text += c.text
                ids += c.token_ids
                last = c
    return text, ids, last


def test_engine_stops_at_a_string_across_token_boundaries(make_engine):
    engine = make_engine()
    prompt = random_prompts(1, 8, 9, seed=11)[0]
    full, ids, _ = _text_and_tokens(engine, prompt, max_tokens=30, ignore_eos=True)
    pieces = [engine.tokenizer.decode([t]) for t in ids]
    # a stop string made of the end of one token and the start of the next
    k = next(i for i in range(5, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2
             and pieces[i].isprintable() and pieces[i + 1].isprintable())
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    cut = full.index(stop)
    text, _, last = _text_and_tokens(engine, prompt, max_tokens=30, ignore_eos=True, stop=[stop])
    assert text == full[:cut]
    assert last.finish_reason is FinishReason.STOP and last.stop_reason == stop


def test_eos_stops_unless_ignored_and_max_tokens_gives_length(make_engine):
    engine = make_engine()
    eos = engine.tokenizer.eos_token_id
    text, ids, last = _text_and_tokens(engine, [1, 2, 3], max_tokens=5, logit_bias={eos: 100.0})
    assert (text, last.finish_reason) == ("", FinishReason.STOP)
    _, ids, last = _text_and_tokens(engine, [1, 2, 3], max_tokens=5, logit_bias={eos: 100.0}, ignore_eos=True)
    assert ids == [eos] * 5 and last.finish_reason is FinishReason.LENGTH


def test_a_stop_token_id_ends_the_choice_and_is_reported(make_engine):
    engine = make_engine()
    _, ids, _ = _text_and_tokens(engine, [4, 5, 6], max_tokens=10, ignore_eos=True)
    _, ids2, last = _text_and_tokens(engine, [4, 5, 6], max_tokens=10, ignore_eos=True, stop_token_ids=[ids[3]])
    assert ids2 == ids[:ids.index(ids[3]) + 1]
    assert last.finish_reason is FinishReason.STOP and last.stop_reason == ids[3]
