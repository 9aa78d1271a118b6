"""A server with speculative decoding: the same streamed answers as plain decoding, through
the official client, and the guesses counted in /metrics."""
from __future__ import annotations


import httpx
import openai
import pytest

from gptserve.config import SpeculativeConfig
from tests.conftest import prometheus_value
from tests.server.conftest import start_server


@pytest.fixture(scope="module")
def ngram_server(tiny_checkpoint):
    running = start_server(tiny_checkpoint, {"speculative": SpeculativeConfig("ngram")})
    yield running
    running.stop()


def stream_text(client: openai.OpenAI, prompt: str, **kwargs) -> tuple[str, list[str]]:
    chunks = [c.choices[0].text for c in client.completions.create(
        model="tiny-gpt2", prompt=prompt, max_tokens=48, temperature=0, stream=True, **kwargs)]
    return "".join(chunks), chunks


def test_streamed_greedy_text_is_plain_decodings(server, ngram_server):
    for prompt in ("And the LORD said unto Moses", "In the beginning"):
        plain, _ = stream_text(server.client(), prompt)
        speculative, chunks = stream_text(ngram_server.client(), prompt)
        assert speculative == plain
        assert len([c for c in chunks if c]) < 48  # accepted guesses arrive several tokens to an event


def test_stop_strings_cut_inside_an_accepted_run(server, ngram_server):
    plain, _ = stream_text(server.client(), "In the beginning")
    stop = plain[20:24]
    assert stream_text(ngram_server.client(), "In the beginning", stop=[stop])[0] == plain[:plain.index(stop)]


def test_metrics_count_guesses_and_accepted_guesses_by_method(ngram_server):
    stream_text(ngram_server.client(), "And God said, Let there be light")
    text = httpx.get(ngram_server.base_url + "/metrics").text
    drafted = prometheus_value(text, "gptserve_spec_decode_num_draft_tokens_total", method="ngram")
    accepted = prometheus_value(text, "gptserve_spec_decode_num_accepted_tokens_total", method="ngram")
    rate = prometheus_value(text, "gptserve_spec_decode_acceptance_rate", method="ngram")
    assert 0 < accepted <= drafted
    assert rate == pytest.approx(accepted / drafted)
