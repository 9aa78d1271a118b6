"""The playground page at /, driven by a real headless Chromium against a real server.

Debian's chromium (`apt-get install -y chromium`) is driven by playwright-core from npm
(tests/server/browser, `npm ci --prefix tests/server/browser`; the test runs it itself
when node_modules is missing). The browser run is skipped only where chromium or npm is
absent. Screenshots of each step go to test-artifacts/playground/.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import pytest

from gptserve.config import SpeculativeConfig
from tests.conftest import prometheus_value
from tests.server.conftest import API_KEY, RunningServer, start_server

BROWSER_DIR = Path(__file__).parent / "browser"
ARTIFACTS = Path(__file__).parents[2] / "test-artifacts" / "playground"
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
LONG_REPLY = 900  # max_tokens of the reply that the test stops


def skip_loudly(reason: str) -> None:
    """Skips, and says why in pytest's warnings summary too (skip reasons need -rs to be seen)."""
    warnings.warn(f"playground browser tests skipped: {reason}", stacklevel=2)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser_driver() -> Path:
    if not Path(CHROMIUM).is_file():
        skip_loudly(f"chromium is not installed at {CHROMIUM} (apt-get install -y chromium)")
    if shutil.which("npm") is None or shutil.which("node") is None:
        skip_loudly("npm is not installed: playwright-core drives the browser from Node")
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=BROWSER_DIR, check=True, timeout=300)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return BROWSER_DIR / "playground.mjs"


def drive(script: Path, server: RunningServer, scenario: str, *args: str) -> dict:
    """Runs one scenario of the browser script; its JSON report of what the page showed."""
    run = subprocess.run(["node", str(script), server.base_url, str(ARTIFACTS), scenario, *args],
                         capture_output=True, text=True, timeout=240, env={**os.environ, "CHROMIUM_PATH": CHROMIUM})
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["ok"], f"{result.get('error')}\n(see {ARTIFACTS}/failure-{scenario}.png)"
    return result


@pytest.fixture(scope="module")
def long_context_server(make_checkpoint) -> RunningServer:
    """The tiny model with 1024 positions, so that a reply can run long enough to be stopped."""
    running = start_server(make_checkpoint(n_positions=1024))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def session(browser_driver, long_context_server) -> dict:
    """One person's visit: a reply, a second one stopped mid-stream, the probability view, the inspect view."""
    return drive(browser_driver, long_context_server, "session")


def metric(server: RunningServer, name: str, **labels: str) -> float:
    with server.http() as http:
        return prometheus_value(http.get("/metrics").text, name, **labels)


def test_the_page_and_its_files_are_served_without_a_key(keyed_server):
    with keyed_server.http() as http:
        page = http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "/static/playground.js" in page.text
        for name, kind in (("playground.js", "javascript"), ("playground.css", "text/css")):
            asset = http.get(f"/static/{name}")
            assert asset.status_code == 200 and kind in asset.headers["content-type"]
        assert http.get("/static/nothing.js").status_code == 404


def test_a_reply_streams_into_the_page(session):
    first = session["first"]
    assert session["title"] == "gptserve playground"
    assert first["finish"] == "length" and first["tokens"] == 24
    assert first["text"].strip()
    assert first["domUpdates"] > 3  # the text grew chunk by chunk, not in one piece
    assert "finish_reason: length" in first["status"]


def test_the_conversation_and_settings_go_with_each_request(session):
    first, second = session["chatRequests"]
    assert [m["role"] for m in first["body"]["messages"]] == ["system", "user"]
    assert [m["role"] for m in second["body"]["messages"]] == ["system", "user", "assistant", "user"]
    assert second["body"]["messages"][2]["content"] == session["first"]["text"]
    assert first["body"]["max_tokens"] == 24 and first["body"]["temperature"] == 0.8
    assert second["body"]["max_tokens"] == LONG_REPLY and second["body"]["temperature"] == 0
    assert all(r["body"]["stream"] and r["body"]["logprobs"] and r["body"]["top_logprobs"] == 5
               for r in session["chatRequests"])


def test_stop_cuts_the_reply_mid_stream_and_the_server_aborts_it(session, long_context_server):
    stopped = session["stopped"]
    assert session["stopEnabledWhileStreaming"]
    assert stopped["finish"] == "stopped"
    assert 5 <= stopped["tokens"] < LONG_REPLY
    assert stopped["sendEnabledAfter"] and not stopped["stopEnabledAfter"]
    deadline = time.monotonic() + 10
    while long_context_server.serving.num_in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert long_context_server.serving.num_in_flight == 0
    assert metric(long_context_server, "gptserve_sequences_finished_total", finish_reason="abort") == 1


def test_the_prompt_tokenization_is_shown(session, long_context_server):
    shown = session["promptTokens"]
    messages = [*session["chatRequests"][0]["body"]["messages"],
                {"role": "assistant", "content": session["first"]["text"]}]
    with long_context_server.http() as http:
        expected = http.post("/tokenize", json={"messages": messages}).json()
    assert shown["ids"] == expected["tokens"]
    assert shown["count"] == f"{expected['count']} of 1024"


def test_the_probability_view_colours_each_token_and_shows_its_alternatives(session):
    probs = session["probs"]
    assert probs["visibleTokens"] >= session["first"]["tokens"] + session["stopped"]["tokens"]
    assert probs["colouredTokens"] == probs["visibleTokens"]
    assert probs["textHidden"]
    assert probs["popupRows"] >= 5  # the chosen token and its top alternatives
    assert probs["popupTitle"].startswith("chosen:")


def test_the_inspect_view_draws_a_heatmap_and_the_next_tokens(session):
    inspect = session["inspect"]
    assert inspect["layers"] == 2 and inspect["heads"] == 4 + 1  # each head, and their mean
    assert inspect["nextTokens"] == 10 and inspect["tokens"] == 11
    for canvas in (inspect["canvas"], inspect["canvasMeanOfHeads"]):
        assert canvas["painted"] > 0.3 * canvas["total"] and canvas["colours"] > 20
    assert inspect["hoverInfo"].startswith("·it (#10) → ·it (#10): 0.")


def test_the_browser_console_has_no_errors(session):
    assert session["consoleErrors"] == []


def test_the_page_asks_for_the_api_key_and_sends_it_as_bearer(browser_driver, keyed_server):
    result = drive(browser_driver, keyed_server, "api-key", API_KEY)
    assert "API key" in result["noticeWithoutKey"]
    assert result["noticeHiddenWithKey"]
    assert result["first"]["finish"] == "length" and result["first"]["text"]
    assert [r["authorization"] for r in result["chatRequests"]] == [f"Bearer {API_KEY}"]


@pytest.fixture(scope="module")
def explained(browser_driver, long_context_server) -> dict:
    """The Explain view on an English prompt, its sliders, a token clicked, then a Chinese prompt."""
    return drive(browser_driver, long_context_server, "explain")


def test_the_explain_view_renders_each_step(explained, long_context_server):
    english, n_layer = explained["english"], 2
    with long_context_server.http() as http:
        tokens = http.post("/tokenize", json={"prompt": "The quick brown fox jumps over the lazy"}).json()["count"]
    assert english["tokens"] == english["embeddingRows"] == english["points"] == tokens
    assert english["strips"] == 2 * tokens  # a token and a position vector per token
    assert english["attentionRows"] == tokens  # the last token sees them all
    assert english["layers"] == n_layer and english["heads"] == 4
    assert english["residualRows"] == 3 and english["neurons"] > 0
    shown = english["next"]  # the 20 most likely of the 50 logits' softmax
    assert len(shown) == 20 and shown == sorted(shown, reverse=True) and 0 < sum(shown) <= 1 + 1e-9
    assert not explained["consoleErrors"]


def test_the_sliders_reshape_the_next_token_distribution_in_the_page(explained):
    at_one, sharper, greedy, top_p = (explained[k] if k != "english" else explained[k]["next"]
                                      for k in ("english", "sharper", "greedy", "topP"))
    assert sharper[0] > at_one[0]  # a lower temperature sharpens
    assert greedy[0] == 1 and not any(greedy[1:])  # temperature 0: the argmax alone
    assert 0 < sum(p > 0 for p in top_p) < sum(p > 0 for p in at_one)  # top-p keeps fewer tokens
    assert explained["chosen"] == 1  # a drawn token is marked


def test_the_whole_attention_map_opens_in_the_inspect_tab(explained):
    seen = explained["inspectFromExplain"]
    assert seen["layer"] == "1" and seen["prompt"] == "The quick brown fox jumps over the lazy" and seen["painted"] > 0


def test_clicking_a_token_reads_every_step_at_it(explained):
    assert explained["third"]["attentionRows"] == 3 and "token 2" in explained["third"]["position"]


def test_a_chinese_prompt_shows_its_characters_across_tokens(explained):
    chinese = explained["chinese"]
    assert "".join(chinese["chars"]) == "你好，世界！🙂"
    assert chinese["splitChars"] > 0  # a character whose bytes lie in two tokens
    assert chinese["tokens"] == chinese["embeddingRows"] > len(chinese["chars"]) - chinese["splitChars"]


@pytest.fixture(scope="module")
def details(browser_driver, make_checkpoint) -> dict:
    """The chat with "show what the server did", on a server that speculates (n-gram)."""
    running = start_server(make_checkpoint(n_positions=1024), {"speculative": SpeculativeConfig("ngram", max_batch=64)})
    try:
        return drive(browser_driver, running, "details")
    finally:
        running.stop()


def test_the_chat_shows_what_the_grammar_allowed_at_each_token(details):
    assert details["requests"][0] == {"token_details": True, "response_format": "json_schema"}
    assert details["constrained"] == details["tokens"] > 0
    assert "the grammar allowed" in details["popup"]


def test_the_chat_marks_tokens_from_confirmed_guesses_and_the_acceptance_rate(details):
    assert details["requests"][1] == {"token_details": True, "response_format": None}
    assert details["guessed"] > 0 and details["guessedData"] == str(details["guessed"])
    assert "from confirmed guesses" in details["status"] and "conversation:" in details["status"]
    assert "a speculative guess, confirmed by the model" in details["guessedPopup"]
    assert not details["consoleErrors"]
