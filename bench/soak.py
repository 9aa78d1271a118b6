"""Soak test: the real server under mixed, hostile load for a long time, then checked.

Starts `gptserve serve` as a subprocess on 127.0.0.1 (a free port) and keeps
`--concurrency` clients busy for `--duration` seconds, each sending one request after
another: chat or completions, streamed or whole, n from 1 to 4, random stop strings,
short and long prompts (up to most of the context), logprobs now and then, a list of
prompts now and then, a share through the official openai client (the rest through
httpx), and a share of clients that go away mid-request. A share of requests is hostile
(`--hostile-rate`): pathological JSON Schemas, choices, regexes and tool sets, unknown
Anthropic blocks, oversized Responses input, token ids out of range; each must be answered
4xx or served, never 5xx. A few fixed greedy "canary" requests recur throughout; each must
always get the same text.

At the end it checks, and exits 1 if any check fails:
- no 5xx and no error event in any stream;
- every request that was not abandoned complete and well-formed: the right number of
  choices, each with one finish_reason (stop or length), streams ending with [DONE], no
  stop string in any text, usage consistent with max_tokens, canaries unchanged;
- once the load stops, every KV block free and nothing running or waiting (/metrics);
- the server's resident memory (VmRSS) grown less than 5% from the end of warm-up;
- no traceback in the server's log, and the server exits cleanly on SIGTERM.

    python bench/soak.py                      # the bundled model, 10 minutes
    python bench/soak.py --tiny --duration 60 # a tiny random checkpoint, one minute
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai

STOP_POOL = [" the", ".", "\n", " and", "ing", "!", " of", ","]
COMMON_WORDS = ("time person year way day thing man world life hand part child eye woman place work week case "
                "point government company number group problem fact house water room money story month lot "
                "right study book job word business issue side kind head service friend father power hour game "
                "line end member law car city community name president team minute idea kid body information "
                "back parent face others level office door health art war history party result change morning "
                "reason research girl guy moment air teacher force education good new first last long great "
                "little own other old big high different small large next early young important few public "
                "bad same able go make know think take see come want look use find give tell work call try ask "
                "need feel become leave put mean keep let begin seem help talk turn start show hear play run "
                "move like live believe hold bring happen write provide sit stand lose pay meet include").split()


# ---------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tiny_checkpoint(folder: Path) -> Path:
    """A random GPT-2 of 2 layers and 64 wide (256 context), with the bundled tokenizer."""
    import shutil

    import torch

    from gptserve.config import ModelConfig
    from gptserve.model.gpt2 import GPT2
    from gptserve.weights.loader import DEFAULT_MODEL_DIR, save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(GPT2(ModelConfig(n_embd=64, n_layer=2, n_head=4, n_positions=256)), folder)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(DEFAULT_MODEL_DIR / name, folder / name)
    return folder


def rss_bytes(pid: int) -> int:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc; install psutil")


def metrics(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line.startswith("gptserve_") and " " in line}


# ---------------------------------------------------------------- the workload


def deep_schema(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


USER = [{"role": "user", "content": "Answer."}]
BIG_TEXT = "word " * 300_000  # under the body limit, far over any context
HOSTILE = [  # (path, body without model): each is answered 4xx or served, never 5xx
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 8, "response_format": {
        "type": "json_schema", "json_schema": {"name": "deep", "schema": deep_schema(200)}}}),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 8, "response_format": {
        "type": "json_schema", "json_schema": {"name": "wide", "schema": {"anyOf": [
            {"const": f"branch {i}"} for i in range(3000)]}}}}),
    ("/v1/completions", {"prompt": "Pick:", "max_tokens": 8,
                         "structured_outputs": {"choice": [f"option {i}" for i in range(3000)]}}),
    ("/v1/completions", {"prompt": "Match:", "max_tokens": 8, "structured_outputs": {"regex": "(a|"}}),
    ("/v1/completions", {"prompt": "Match:", "max_tokens": 8, "structured_outputs": {"regex": "(a*)*" * 200}}),
    ("/v1/completions", {"prompt": "Parse:", "max_tokens": 8, "structured_outputs": {"grammar": "start: start"}}),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 8, "tool_choice": "required", "tools": [
        {"type": "function", "function": {"name": f"tool_{i}", "parameters": {"type": "object"}}}
        for i in range(2000)]}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "temperature": 1e-300}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "temperature": 1.0, "repetition_penalty": 5e-324}),
    ("/v1/completions", {"prompt": "And God said", "max_tokens": 0, "echo": True, "logprobs": 1}),
    ("/v1/completions", {"prompt": [50_257], "max_tokens": 2}),
    ("/v1/responses", {"input": BIG_TEXT, "max_output_tokens": 4}),
    ("/v1/responses", {"input": [{"type": "unknown_item"}]}),
    ("/v1/messages", {"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "no_such_block"}]}]}),
    ("/v1/messages", {"max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}]}),
    ("/v1/embeddings", {"input": [[99_999_999]]}),
    ("/v1/embeddings", {"input": ["word"] * 20_000}),
]


@dataclass
class Spec:
    endpoint: str  # chat | completions
    client: str  # httpx | openai
    stream: bool
    body: dict
    num_choices: int  # n times the number of prompts
    stops: list[str]
    abandon_after: int | None = None  # events to read before going away (streams); 0: a whole answer
    canary: int | None = None
    path: str = ""  # hostile requests: the route


@dataclass
class Tally:
    requests: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    canaries: dict[int, str] = field(default_factory=dict)
    completion_tokens: int = 0

    def fail(self, spec: Spec, message: str) -> None:
        if len(self.failures) < 200:
            self.failures.append(f"{spec.endpoint}/{spec.client}/{'stream' if spec.stream else 'whole'}: {message}"
                                 f" | body={json.dumps(spec.body)[:300]}")


class Workload:
    def __init__(self, words: list[str], max_model_len: int, model: str, rng: random.Random, abandon_rate: float,
                 openai_share: float, hostile_rate: float):
        self.words, self.ctx, self.model, self.rng = words, max_model_len, model, rng
        self.abandon_rate, self.openai_share, self.hostile_rate = abandon_rate, openai_share, hostile_rate

    def prompt(self, num_words: int) -> str:
        return "".join(self.rng.choice(self.words) for _ in range(num_words))

    def canary(self, i: int) -> Spec:
        words = "".join(self.words[(i * 7 + k) % len(self.words)] for k in range(12))
        body = {"model": self.model, "messages": [{"role": "user", "content": f"Canary {i}:{words}"}],
                "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        stream = self.rng.random() < 0.5
        client = "openai" if self.rng.random() < self.openai_share else "httpx"
        return Spec("chat", client, stream, {**body, "stream": stream}, 1, [], canary=i)

    def next(self) -> Spec:
        rng = self.rng
        if rng.random() < 0.1:
            return self.canary(rng.randrange(8))
        if rng.random() < self.hostile_rate:
            path, body = rng.choice(HOSTILE)
            return Spec("hostile", "httpx", False, {"model": self.model, **body}, 0, [], path=path)
        endpoint = "chat" if rng.random() < 0.6 else "completions"
        stream = rng.random() < 0.75
        client = "openai" if rng.random() < self.openai_share else "httpx"
        n = rng.choice([1, 1, 1, 1, 2, 3, 4])
        long = rng.random() < 0.2
        num_words = rng.randint(self.ctx // 2, self.ctx * 3 // 4) if long else rng.randint(3, 40)
        room = self.ctx - num_words - 24  # the chat template's tokens and a margin
        max_tokens = max(1, min(rng.randint(8, 128), room))
        stops = rng.sample(STOP_POOL, rng.randint(1, 3)) if rng.random() < 0.3 else []
        body: dict = {"model": self.model, "max_tokens": max_tokens, "n": n, "stream": stream,
                      "temperature": rng.choice([0, 0.7, 1.0]), "ignore_eos": rng.random() < 0.5}
        if stops:
            body["stop"] = stops
        if stream and rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
        num_prompts = 1
        if endpoint == "chat":
            body["messages"] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content":
                                                                            self.prompt(num_words)}]
            if rng.random() < 0.1:
                body.update(logprobs=True, top_logprobs=rng.randint(0, 5))
        else:
            if not long and rng.random() < 0.1:
                num_prompts = 2
                body["prompt"] = [self.prompt(num_words), self.prompt(num_words)]
            else:
                body["prompt"] = self.prompt(num_words)
            if rng.random() < 0.1:
                body["logprobs"] = rng.randint(0, 5)
        spec = Spec(endpoint, client, stream, body, n * num_prompts, stops)
        if rng.random() < self.abandon_rate:
            spec.abandon_after = rng.randint(1, 20) if stream else 0
        return spec


# ---------------------------------------------------------------- one request


@dataclass
class Answer:
    texts: dict[int, str] = field(default_factory=dict)
    finishes: dict[int, list[str]] = field(default_factory=dict)
    completion_tokens: int | None = None
    done: bool = False  # streams: [DONE] seen (httpx) or the stream ended (openai)
    ids: set = field(default_factory=set)


def add_choice(answer: Answer, index: int, text: str | None, finish: str | None) -> None:
    answer.texts[index] = answer.texts.get(index, "") + (text or "")
    if finish:
        answer.finishes.setdefault(index, []).append(finish)


def check(spec: Spec, answer: Answer, tally: Tally) -> None:
    """A complete answer is well-formed: every choice finished once, no stop string, usage adds up."""
    if spec.stream and not answer.done:
        return tally.fail(spec, "the stream did not end with [DONE]")
    if len(answer.ids) > 1:
        tally.fail(spec, f"chunks of one stream carry different ids: {answer.ids}")
    if sorted(answer.finishes) != list(range(spec.num_choices)):
        return tally.fail(spec, f"choices with a finish_reason: {sorted(answer.finishes)}, "
                                f"expected 0..{spec.num_choices - 1}")
    for index, finishes in answer.finishes.items():
        if len(finishes) != 1 or finishes[0] not in ("stop", "length"):
            tally.fail(spec, f"choice {index} finished with {finishes}")
    for index, text in answer.texts.items():
        hit = next((s for s in spec.stops if s in text), None)
        if hit is not None:
            tally.fail(spec, f"choice {index}'s text contains the stop string {hit!r}")
    max_tokens = spec.body["max_tokens"]
    if answer.completion_tokens is not None:
        tally.completion_tokens += answer.completion_tokens
        all_length = all(f == ["length"] for f in answer.finishes.values())
        if answer.completion_tokens > spec.num_choices * max_tokens or \
                (all_length and answer.completion_tokens != spec.num_choices * max_tokens):
            tally.fail(spec, f"usage.completion_tokens {answer.completion_tokens} for {spec.num_choices} choices "
                             f"of max_tokens {max_tokens}, finishes {answer.finishes}")
    if spec.body["temperature"] == 0:  # greedy: the n choices of one prompt are the same text
        n = spec.body.get("n", 1)
        for first in range(0, spec.num_choices, n):
            if len({answer.texts.get(first + i, "") for i in range(n)}) > 1:
                tally.fail(spec, f"greedy choices {first}..{first + n - 1} differ")
    if spec.canary is not None:
        first = tally.canaries.setdefault(spec.canary, answer.texts.get(0, ""))
        if answer.texts.get(0, "") != first:
            tally.fail(spec, f"canary {spec.canary} changed: {first!r} then {answer.texts.get(0)!r}")


async def via_hostile(http: httpx.AsyncClient, spec: Spec, tally: Tally) -> None:
    """A hostile request: any 4xx in its API's shape, or served; never a 5xx."""
    response = await http.post(spec.path, json=spec.body, timeout=600)
    tally.statuses[response.status_code] += 1
    if response.status_code >= 500:
        tally.fail(spec, f"{spec.path}: HTTP {response.status_code}: {response.text[:300]}")
    elif response.status_code >= 400 and "error" not in response.json():
        tally.fail(spec, f"{spec.path}: HTTP {response.status_code} without an error body: {response.text[:300]}")


async def via_httpx(http: httpx.AsyncClient, spec: Spec, tally: Tally) -> None:
    path = "/v1/chat/completions" if spec.endpoint == "chat" else "/v1/completions"
    answer = Answer()
    if not spec.stream:
        try:
            response = await http.post(path, json=spec.body, timeout=1.0 if spec.abandon_after == 0 else 600)
        except httpx.ReadTimeout:
            if spec.abandon_after == 0:
                tally.requests["abandoned"] += 1
                return
            raise
        tally.statuses[response.status_code] += 1
        if response.status_code != 200:
            return tally.fail(spec, f"HTTP {response.status_code}: {response.text[:300]}")
        reply = response.json()
        answer.ids.add(reply["id"])
        for choice in reply["choices"]:
            text = choice["message"]["content"] if spec.endpoint == "chat" else choice["text"]
            add_choice(answer, choice["index"], text, choice["finish_reason"])
        answer.completion_tokens = reply["usage"]["completion_tokens"]
        return check(spec, answer, tally)
    async with http.stream("POST", path, json=spec.body, timeout=600) as response:
        tally.statuses[response.status_code] += 1
        if response.status_code != 200:
            return tally.fail(spec, f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        events = 0
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if answer.done:
                return tally.fail(spec, f"an event after [DONE]: {data[:200]}")
            if data == "[DONE]":
                answer.done = True
                continue
            event = json.loads(data)
            if "error" in event:
                return tally.fail(spec, f"error event: {data[:300]}")
            answer.ids.add(event["id"])
            for choice in event["choices"]:
                text = choice["delta"].get("content") if spec.endpoint == "chat" else choice["text"]
                add_choice(answer, choice["index"], text, choice["finish_reason"])
            if event.get("usage"):
                answer.completion_tokens = event["usage"]["completion_tokens"]
            events += 1
            if spec.abandon_after is not None and events >= spec.abandon_after:
                tally.requests["abandoned"] += 1
                return  # leaving the block closes the connection mid-stream
    check(spec, answer, tally)


async def via_openai(client: openai.AsyncOpenAI, spec: Spec, tally: Tally) -> None:
    body = dict(spec.body)
    known = {"model", "max_tokens", "n", "stream", "temperature", "stop", "stream_options", "messages", "prompt",
             "logprobs", "top_logprobs"}
    extra = {k: body.pop(k) for k in list(body) if k not in known}
    create = client.chat.completions.create if spec.endpoint == "chat" else client.completions.create
    answer = Answer()
    try:
        if spec.abandon_after == 0:
            await asyncio.wait_for(create(**body, extra_body=extra), timeout=1.0)
        else:
            reply = await create(**body, extra_body=extra)
    except asyncio.TimeoutError:
        tally.requests["abandoned"] += 1
        return
    except openai.APIStatusError as e:
        tally.statuses[e.status_code] += 1
        return tally.fail(spec, f"HTTP {e.status_code}: {e.message[:300]}")
    tally.statuses[200] += 1
    if spec.abandon_after == 0:  # it answered within the second: a whole answer after all
        return
    if not spec.stream:
        answer.ids.add(reply.id)
        for choice in reply.choices:
            text = choice.message.content if spec.endpoint == "chat" else choice.text
            add_choice(answer, choice.index, text, choice.finish_reason)
        answer.completion_tokens = reply.usage.completion_tokens
        return check(spec, answer, tally)
    events = 0
    try:
        async for chunk in reply:
            answer.ids.add(chunk.id)
            for choice in chunk.choices:
                text = choice.delta.content if spec.endpoint == "chat" else choice.text
                add_choice(answer, choice.index, text, choice.finish_reason)
            if chunk.usage:
                answer.completion_tokens = chunk.usage.completion_tokens
            events += 1
            if spec.abandon_after is not None and events >= spec.abandon_after:
                tally.requests["abandoned"] += 1
                return
        answer.done = True  # the SDK ends its iteration at [DONE]
    except openai.APIError as e:  # an error event in the stream
        return tally.fail(spec, f"stream error: {e}")
    finally:
        await reply.close()
    check(spec, answer, tally)


async def worker(base: str, workload: Workload, deadline: float, tally: Tally) -> None:
    limits = httpx.Limits(max_connections=4, max_keepalive_connections=4)
    async with httpx.AsyncClient(base_url=base, limits=limits, trust_env=False) as http, \
            openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600) as client:
        while time.monotonic() < deadline:
            spec = workload.next()
            tally.requests["sent"] += 1
            tally.requests[f"{spec.endpoint} {spec.client} {'stream' if spec.stream else 'whole'}"] += 1
            try:
                if spec.endpoint == "hostile":
                    await via_hostile(http, spec, tally)
                elif spec.client == "openai":
                    await via_openai(client, spec, tally)
                else:
                    await via_httpx(http, spec, tally)
            except Exception as e:  # noqa: BLE001 - a broken answer or connection: that request fails
                tally.fail(spec, f"{type(e).__name__}: {e}")


# ---------------------------------------------------------------- the run


async def load(base: str, args: argparse.Namespace, model: str, max_model_len: int, words: list[str],
               pid: int) -> tuple[Tally, list[tuple[float, int]]]:
    tally = Tally()
    start = time.monotonic()
    deadline = start + args.duration
    workers = [asyncio.create_task(worker(base, Workload(words, max_model_len, model, random.Random(args.seed + i),
                                                         args.abandon_rate, args.openai_share, args.hostile_rate),
                                              deadline, tally))
               for i in range(args.concurrency)]
    rss: list[tuple[float, int]] = []  # (seconds since the start, bytes), every 5 s
    while not all(w.done() for w in workers):
        rss.append((time.monotonic() - start, rss_bytes(pid)))
        if len(rss) % 6 == 0:
            print(f"  {rss[-1][0]:5.0f} s  {tally.requests['sent']:6d} sent  {len(tally.failures)} failures  "
                  f"RSS {rss[-1][1] / 2**20:.0f} MiB", flush=True)
        await asyncio.wait(workers, timeout=5)
    for w in workers:
        w.result()  # a worker that crashed is a failure of the soak itself
    return tally, rss


def one_token_words() -> list[str]:
    from gptserve.model.tokenizer import Tokenizer
    from gptserve.weights.loader import DEFAULT_MODEL_DIR

    tok = Tokenizer.from_folder(DEFAULT_MODEL_DIR)
    return [" " + w for w in COMMON_WORDS if len(tok.encode(" " + w)) == 1]


def wait_until_healthy(proc: subprocess.Popen, base: str, log_path: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise SystemExit("the server did not start")
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)


def run(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="gptserve-soak-"))
    model = str(make_tiny_checkpoint(work / "tiny")) if args.tiny else args.model
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "gptserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--device", args.device, *(["--model", model] if model else []),
               *(["--kv-cache-memory", args.kv_cache_memory] if args.kv_cache_memory else []), *args.server_arg]
    log_path = work / "server.log"
    print("server:", " ".join(command), f"(log: {log_path})", flush=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    checks: dict[str, bool] = {}
    try:
        wait_until_healthy(proc, base, log_path)
        card = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]
        print(f"model {card['id']}, context {card['max_model_len']}; {args.concurrency} clients for "
              f"{args.duration:.0f} s (warm-up {args.warmup:.0f} s)", flush=True)
        started = time.monotonic()
        tally, rss = asyncio.run(load(base, args, card["id"], card["max_model_len"], one_token_words(), proc.pid))
        elapsed = time.monotonic() - started
        # the load is over: everything must drain
        drained_by = time.monotonic() + 60
        while True:
            m = metrics(base)
            idle = (m.get("gptserve_kv_blocks_used", -1) == 0 and m.get("gptserve_num_requests_running", -1) == 0
                    and m.get("gptserve_num_requests_waiting", -1) == 0)
            if idle or time.monotonic() > drained_by:
                break
            time.sleep(0.5)
        rss_end = rss_bytes(proc.pid)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            returncode = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            returncode = proc.wait()
    log_text = log_path.read_text(errors="replace")

    after_warmup = [b for t, b in rss if t >= args.warmup] or [rss[-1][1]]
    rss_base = after_warmup[0]
    growth = rss_end / rss_base - 1
    server_errors = sum(n for status, n in tally.statuses.items() if status >= 500)
    checks["no 5xx"] = server_errors == 0
    checks["every request not abandoned complete and well-formed"] = not tally.failures
    checks["KV blocks all free, nothing running or waiting"] = idle
    checks["RSS grew < 5% after warm-up"] = growth < 0.05
    checks["no traceback in the server log"] = "Traceback" not in log_text
    checks["server exited cleanly on SIGTERM"] = returncode in (0, -signal.SIGTERM)
    sent, abandoned = tally.requests["sent"], tally.requests["abandoned"]
    result = {
        "model": card["id"], "context": card["max_model_len"], "duration_s": round(elapsed, 1),
        "concurrency": args.concurrency, "requests_sent": sent, "requests_abandoned": abandoned,
        "requests_per_s": round(sent / elapsed, 2), "completion_tokens_counted": tally.completion_tokens,
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "by_kind": {k: v for k, v in sorted(tally.requests.items()) if k not in ("sent", "abandoned")},
        "canaries_seen": len(tally.canaries),
        "preemptions": m.get("gptserve_num_preemptions_total"),
        "generation_tokens": m.get("gptserve_generation_tokens_total"),
        "kv_blocks_used_after": m.get("gptserve_kv_blocks_used"), "kv_blocks_total": m.get("gptserve_kv_blocks_total"),
        "rss_mib_after_warmup": round(rss_base / 2**20, 1), "rss_mib_peak": round(max(b for _, b in rss) / 2**20, 1),
        "rss_mib_end": round(rss_end / 2**20, 1), "rss_growth_pct": round(100 * growth, 2),
        "server_returncode": returncode, "checks": checks, "failures": tally.failures[:20],
        "server_log": str(log_path),
    }
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder or Hub id (default: the bundled model)")
    p.add_argument("--tiny", action="store_true", help="serve a tiny random checkpoint made here instead")
    p.add_argument("--duration", type=float, default=600, help="seconds of load (default: 600)")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds after which resident memory is the baseline (default: a fifth of the duration, "
                        "at most 60)")
    p.add_argument("--concurrency", type=int, default=32, help="clients, each with one request in flight")
    p.add_argument("--abandon-rate", type=float, default=0.1, help="share of requests whose client goes away")
    p.add_argument("--openai-share", type=float, default=0.25, help="share sent through the openai client")
    p.add_argument("--hostile-rate", type=float, default=0.05,
                   help="share of hostile requests (pathological schemas, unknown blocks, ids out of range)")
    p.add_argument("--device", default="auto")
    p.add_argument("--kv-cache-memory", default=None, help="passed to the server, e.g. 64MiB (small: preemptions)")
    p.add_argument("--server-arg", action="append", default=[], help="another argument for `gptserve serve`")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-file", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(60.0, args.duration / 5)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(json.dumps({k: v for k, v in result.items() if k not in ("checks", "failures")}, indent=2))
    for failure in result["failures"]:
        print("FAILURE:", failure)
    for name, ok in result["checks"].items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if args.result_file:
        args.result_file.parent.mkdir(parents=True, exist_ok=True)
        args.result_file.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
