"""Serving benchmark: a load generator for any OpenAI-compatible server.

Like vLLM's benchmark_serving: streamed requests to /v1/completions,
/v1/chat/completions, /v1/responses (OpenAI's Responses API) or /v1/messages
(Anthropic's Messages API), closed-loop (`--concurrency N` requests in flight) or open-loop
(Poisson arrivals at `--request-rate R` per second, optionally capped by
`--concurrency`). Reports request throughput, output tokens/s, and TTFT, TPOT, ITL and
end-to-end latency at mean/p50/p90/p99, plus failures and outputs of the wrong length.

Workload: synthetic (prompt and output lengths drawn with `--seed`) or a JSONL file.
Synthetic prompts are text made of random words that are each one GPT-2 token, so every
GPT-2 server tokenizes them to the same, known length (`--prompt-format ids` sends the
token ids instead, where the server takes them). Lengths are fixed by `ignore_eos` and
`max_tokens`; `usage.completion_tokens` from `stream_options.include_usage` counts the
output where the server sends it, else one token per streamed chunk with text.

    python bench/serve.py --base-url http://127.0.0.1:8000 --concurrency 16 \\
        --num-requests 200 --input-len 128 --output-len 128 --result-file out.json
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions", "responses": "/v1/responses",
             "messages": "/v1/messages"}
CONVERSATIONAL = ("chat", "responses", "messages")  # prompts are a list of messages
DEFAULT_VOCAB = Path(__file__).resolve().parents[1] / "gptserve" / "weights" / "default_model"
ENDOFTEXT_ID = 50256


@dataclass
class RequestSpec:
    prompt: str | list[int] | list[dict]  # text or token ids; chat: a list of messages
    prompt_len: int | None  # expected prompt tokens, when known
    output_len: int
    model: str | None = None  # None: --model


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_len: int | None = None
    expected_output_len: int = 0
    output_tokens: int = 0
    prompt_tokens: int | None = None  # as the server reported in usage
    usage_reported: bool = False
    finish_reason: str | None = None
    ttft: float = 0.0  # seconds to the first chunk with text
    latency: float = 0.0  # seconds to the end of the stream
    itl: list[float] = field(default_factory=list)  # seconds between chunks with text
    start: float = 0.0  # seconds since the run began


# ---------------------------------------------------------------- workload

def one_token_words(vocab_folder: Path) -> list[tuple[str, int]]:
    """(" word", id) pairs for vocab entries that are a space plus ASCII letters and that
    GPT-2's BPE encodes back to exactly that one token."""
    from gptserve.model.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(vocab_folder)
    vocab = json.loads((vocab_folder / "vocab.json").read_text())
    words = []
    for piece, token_id in vocab.items():
        word = piece[1:]
        if piece.startswith("\u0120") and word.isascii() and word.isalpha() and 2 <= len(word) <= 10:
            if tok.encode(" " + word) == [token_id]:
                words.append((" " + word, token_id))
    words.sort(key=lambda w: w[1])
    return words


def synthetic_workload(n: int, input_len: int, output_len: int, range_ratio: float, seed: int,
                       prompt_format: str, endpoint: str, vocab_folder: Path) -> list[RequestSpec]:
    """n requests, lengths uniform in [L*(1-r), L*(1+r)], prompts of random one-token words."""
    rng = random.Random(seed)
    words = one_token_words(vocab_folder)
    specs = []
    for _ in range(n):
        plen = rng.randint(max(1, int(input_len * (1 - range_ratio))), max(1, int(input_len * (1 + range_ratio))))
        olen = rng.randint(max(1, int(output_len * (1 - range_ratio))), max(1, int(output_len * (1 + range_ratio))))
        chosen = [rng.choice(words) for _ in range(plen)]
        if prompt_format == "ids":
            prompt: str | list[int] | list[dict] = [t for _, t in chosen]
        else:
            prompt = "".join(w for w, _ in chosen)  # " the cat ...": one token per word
        if endpoint in CONVERSATIONAL:
            prompt = [{"role": "user", "content": prompt}]
            plen_known = None  # the chat template adds tokens that differ between servers
        else:
            plen_known = plen
        specs.append(RequestSpec(prompt, plen_known, olen))
    return specs


def jsonl_workload(path: Path, n: int, endpoint: str, default_output_len: int) -> list[RequestSpec]:
    """Lines like {"prompt": "..." | [ids], "max_tokens": 128} or {"messages": [...], ...}."""
    specs = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        olen = int(row.get("max_tokens") or row.get("output_len") or default_output_len)
        if endpoint in CONVERSATIONAL:
            prompt = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
        else:
            prompt = row["prompt"]
        plen = row.get("prompt_len") or (len(prompt) if isinstance(prompt, list) and endpoint not in CONVERSATIONAL
                                         else None)
        specs.append(RequestSpec(prompt, plen, olen))
    if not specs:
        raise SystemExit(f"{path}: no requests")
    return [specs[i % len(specs)] for i in range(n)]


# ---------------------------------------------------------------- one request

def request_body(args: argparse.Namespace, spec: RequestSpec) -> dict:
    body: dict = {"model": spec.model or args.model, "temperature": args.temperature, "stream": True}
    if args.endpoint == "responses":
        body.update(input=spec.prompt, max_output_tokens=spec.output_len)
    elif args.endpoint == "messages":
        body.update(messages=spec.prompt, max_tokens=spec.output_len)
    else:
        body.update(max_tokens=spec.output_len, stream_options={"include_usage": True})
        body["messages" if args.endpoint == "chat" else "prompt"] = spec.prompt
    if not args.no_ignore_eos:
        body["ignore_eos"] = True
    if args.eos_logit_bias:  # for servers without ignore_eos
        body["logit_bias"] = {str(ENDOFTEXT_ID): -100}
    body.update(args.extra_body)
    return body


@dataclass
class StreamEvent:
    """What one SSE event of any endpoint says, in the same terms."""

    texts: list[str] = field(default_factory=list)  # one per choice (or block) with new text
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None


def read_event(endpoint: str, event: dict) -> StreamEvent:
    out = StreamEvent()
    kind = event.get("type", "")
    if "error" in event and endpoint != "responses" or kind in ("error", "response.failed"):
        out.error = json.dumps(event.get("error") or event.get("response", {}).get("error") or event)[:300]
    elif endpoint == "responses":
        if kind == "response.output_text.delta":
            out.texts.append(event["delta"])
        elif kind in ("response.completed", "response.incomplete"):
            usage = event["response"].get("usage") or {}
            out.finish_reason = event["response"]["status"]
            out.prompt_tokens, out.completion_tokens = usage.get("input_tokens"), usage.get("output_tokens")
    elif endpoint == "messages":
        if kind == "content_block_delta" and event["delta"].get("type") == "text_delta":
            out.texts.append(event["delta"]["text"])
        elif kind == "message_start":
            out.prompt_tokens = event["message"]["usage"].get("input_tokens")
        elif kind == "message_delta":
            out.finish_reason = event["delta"].get("stop_reason")
            out.completion_tokens = event.get("usage", {}).get("output_tokens")
    else:
        for choice in event.get("choices") or []:
            text = choice.get("text") if endpoint == "completions" else (choice.get("delta") or {}).get("content")
            if text:
                out.texts.append(text)
            out.finish_reason = choice.get("finish_reason") or out.finish_reason
        usage = event.get("usage")
        if usage:
            out.prompt_tokens, out.completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
    return out


async def send_request(client: httpx.AsyncClient, url: str, args: argparse.Namespace,
                       spec: RequestSpec, t0: float) -> RequestResult:
    """Stream one request; parse the SSE events ourselves. A request whose reused keep-alive
    connection the server had closed while idle (llama.cpp's server does; httpx then sees it
    disconnect before any response) is sent once more on a new connection: nothing reached
    the server, so nothing is counted twice."""
    result = await _send_once(client, url, args, spec, t0)
    if result.error.startswith("RemoteProtocolError") and result.ttft == 0.0:
        result = await _send_once(client, url, args, spec, t0)
    return result


async def _send_once(client: httpx.AsyncClient, url: str, args: argparse.Namespace,
                     spec: RequestSpec, t0: float) -> RequestResult:
    result = RequestResult(prompt_len=spec.prompt_len, expected_output_len=spec.output_len)
    chunks_with_text = 0
    start = time.perf_counter()
    result.start = start - t0
    last = start
    try:
        async with client.stream("POST", url, json=request_body(args, spec)) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:300]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, "event:" lines
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = read_event(args.endpoint, json.loads(data))
                if event.error:
                    result.error = f"stream error: {event.error}"
                    return result
                now = time.perf_counter()
                for _ in event.texts:
                    if chunks_with_text == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    chunks_with_text += 1
                    last = now
                result.finish_reason = event.finish_reason or result.finish_reason
                if event.prompt_tokens is not None:
                    result.prompt_tokens = event.prompt_tokens
                if event.completion_tokens is not None:
                    result.usage_reported = True
                    result.output_tokens = event.completion_tokens
        result.latency = time.perf_counter() - start
        if not result.usage_reported:
            result.output_tokens = chunks_with_text
        result.ok = chunks_with_text > 0
        if not result.ok:
            result.error = "stream ended without any text"
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


# ---------------------------------------------------------------- the run

async def run_benchmark(args: argparse.Namespace, specs: list[RequestSpec]) -> tuple[list[RequestResult], float]:
    url = args.base_url.rstrip("/") + ENDPOINTS[args.endpoint]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    bar = progress_bar(len(specs), args.disable_tqdm)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), limits=limits, headers=headers,
                                 trust_env=False) as client:
        for _ in range(args.warmup):
            # a prompt of its own, so no measured request starts from a warm prefix cache
            prompt = [{"role": "user", "content": " warm up"}] if args.endpoint in CONVERSATIONAL else " warm up"
            warm = await send_request(client, url, args, RequestSpec(prompt, None, 4), time.perf_counter())
            if not warm.ok:
                raise SystemExit(f"warm-up request failed: {warm.error}")
        limit = asyncio.Semaphore(args.concurrency) if args.concurrency else None
        rng = random.Random(args.seed + 1)
        t0 = time.perf_counter()

        async def one(spec: RequestSpec) -> RequestResult:
            if limit is None:
                r = await send_request(client, url, args, spec, t0)
            else:
                async with limit:
                    r = await send_request(client, url, args, spec, t0)
            bar.update(1)
            return r

        deadline = t0 + args.max_duration if args.max_duration else float("inf")
        tasks = []
        for spec in specs:
            if time.perf_counter() >= deadline:
                break
            tasks.append(asyncio.create_task(one(spec)))
            if args.request_rate and args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))  # Poisson arrivals
        timeout = None if deadline == float("inf") else max(0.0, deadline - time.perf_counter())
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:  # past --max-duration: dropped, counted as cancelled
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        duration = time.perf_counter() - t0
    bar.close()
    return [t.result() for t in tasks if not t.cancelled()], duration


def progress_bar(total: int, disable: bool):
    try:
        from tqdm import tqdm
        return tqdm(total=total, disable=disable, file=sys.stderr)
    except ImportError:
        class NoBar:
            def update(self, n: int) -> None: ...
            def close(self) -> None: ...
        return NoBar()


# ---------------------------------------------------------------- the report

def percentiles(values: list[float], scale: float = 1000.0) -> dict:
    """mean/p50/p90/p99 in ms (linear interpolation, as numpy's default)."""
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    xs = sorted(values)

    def pct(q: float) -> float:
        pos = (len(xs) - 1) * q / 100
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {"mean": sum(xs) / len(xs) * scale, "p50": pct(50) * scale, "p90": pct(90) * scale,
            "p99": pct(99) * scale}


def summarize(results: list[RequestResult], duration: float, num_requests: int) -> dict:
    done = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum((r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len or 0) for r in done)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error[:120]] = errors.get(r.error[:120], 0) + 1
    return {
        "duration_s": duration,
        "completed": len(done),
        "failed": len(results) - len(done),
        "cancelled": num_requests - len(results),  # past --max-duration
        "errors": errors,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(done) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft_ms": percentiles([r.ttft for r in done]),
        "tpot_ms": percentiles(tpot),
        "itl_ms": percentiles([x for r in done for x in r.itl]),
        "e2el_ms": percentiles([r.latency for r in done]),
        # checks that the server did the work we asked for
        "usage_reported": sum(r.usage_reported for r in done),
        "wrong_output_len": sum(r.output_tokens != r.expected_output_len for r in done),
        "wrong_prompt_len": sum(r.prompt_tokens is not None and r.prompt_len is not None
                                and r.prompt_tokens != r.prompt_len for r in done),
        "finish_reasons": {k: sum(r.finish_reason == k for r in done) for k in {r.finish_reason for r in done}},
    }


def print_report(s: dict) -> None:
    line = "-" * 50
    print(f"{' Serving benchmark ':=^50}")
    rows = [("Successful requests", s["completed"]), ("Failed requests", s["failed"]),
            ("Cancelled (past --max-duration)", s["cancelled"]),
            ("Benchmark duration (s)", f"{s['duration_s']:.2f}"),
            ("Total input tokens", s["total_input_tokens"]), ("Total output tokens", s["total_output_tokens"]),
            ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
            ("Output token throughput (tok/s)", f"{s['output_throughput']:.2f}"),
            ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.2f}")]
    for name, value in rows:
        print(f"{name:<38}{value:>12}")
    for key, title in (("ttft_ms", "Time to first token"), ("tpot_ms", "Time per output token (excl. 1st)"),
                       ("itl_ms", "Inter-token latency"), ("e2el_ms", "End-to-end latency")):
        print(f"{' ' + title + ' ':-^50}")
        for stat in ("mean", "p50", "p90", "p99"):
            v = s[key][stat]
            print(f"{stat + ' (ms)':<38}{'n/a' if v is None else f'{v:.2f}':>12}")
    print(line)
    print(f"{'usage reported in stream':<38}{s['usage_reported']:>12}")
    print(f"{'outputs of the wrong length':<38}{s['wrong_output_len']:>12}")
    print(f"{'prompts of the wrong length':<38}{s['wrong_prompt_len']:>12}")
    for error, count in s["errors"].items():
        print(f"error x{count}: {error}")
    print("=" * 50)


# ---------------------------------------------------------------- CLI

def first_model(base_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30, trust_env=False)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    p.add_argument("--models", default=None,
                   help="comma-separated model names the requests take in turn (several models or LoRA adapters)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--endpoint", choices=list(ENDPOINTS), default="completions")
    p.add_argument("--concurrency", type=int, default=None,
                   help="requests in flight (closed loop; with --request-rate, a cap)")
    p.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals per second (open loop)")
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--dataset", default="synthetic", help="'synthetic' or a JSONL file")
    p.add_argument("--input-len", type=int, default=128, help="synthetic: mean prompt tokens")
    p.add_argument("--output-len", type=int, default=128, help="synthetic: mean output tokens (max_tokens)")
    p.add_argument("--range-ratio", type=float, default=0.0, help="synthetic: lengths uniform in L*(1±r)")
    p.add_argument("--prompt-format", choices=["text", "ids"], default="text",
                   help="synthetic completions: text of one-token words, or token-id lists")
    p.add_argument("--vocab", type=Path, default=DEFAULT_VOCAB, help="folder with GPT-2's vocab.json/merges.txt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-ignore-eos", action="store_true", help="don't send ignore_eos")
    p.add_argument("--eos-logit-bias", action="store_true", help="also send logit_bias {50256: -100}")
    p.add_argument("--extra-body", type=json.loads, default={}, help="JSON merged into every request body")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests before the run")
    p.add_argument("--max-duration", type=float, default=None,
                   help="seconds: start no request after this, cancel those still running")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--result-file", type=Path, default=None, help="write the summary (and config) as JSON")
    p.add_argument("--save-requests", action="store_true", help="include every request's result in the JSON")
    p.add_argument("--label", default=None, help="a name stored in the JSON (e.g. the server)")
    p.add_argument("--disable-tqdm", action="store_true")
    args = p.parse_args(argv)
    if args.concurrency is None and args.request_rate is None:
        args.concurrency = 1
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.model is None:
        args.model = first_model(args.base_url, args.api_key)
    if args.dataset == "synthetic":
        specs = synthetic_workload(args.num_requests, args.input_len, args.output_len, args.range_ratio,
                                   args.seed, args.prompt_format, args.endpoint, args.vocab)
    else:
        specs = jsonl_workload(Path(args.dataset), args.num_requests, args.endpoint, args.output_len)
    if args.models:
        names = args.models.split(",")
        specs = [dataclasses.replace(s, model=names[i % len(names)]) for i, s in enumerate(specs)]
    results, duration = asyncio.run(run_benchmark(args, specs))
    summary = summarize(results, duration, len(specs))
    print_report(summary)
    if args.result_file:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "api_key"}
        record = {"label": args.label, "config": config, **summary}
        if args.save_requests:
            record["requests"] = [asdict(r) for r in results]
        args.result_file.parent.mkdir(parents=True, exist_ok=True)
        args.result_file.write_text(json.dumps(record, indent=2))
    return summary


if __name__ == "__main__":
    main()
