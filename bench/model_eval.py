"""How well the bundled default model does its API tasks, on held-out prompts, through the real server.

The prompts come from the evaluation split of scripts/default_model_data.py (values and
Bible verses the training split never uses). The script starts `gptserve serve` as a
subprocess on 127.0.0.1 (a free port; or uses `--base-url`), sends every request with the
official `openai` client (AsyncOpenAI, 8 at a time, temperature 0) and checks the answers:

- chat: small talk, one to three turns, max_tokens 128; passes when the answer ends its
  turn (finish_reason "stop"). Target 0.90.
- json: extraction and classification with response_format json_object or json_schema
  (strict), max_tokens 64; passes when it stops, parses and validates against the schema
  the prompt names (json_object too). Also reported: the rate per kind, and "exact" (the
  parsed value equals the expected one). Target 0.95.
- tools_required: first-turn requests that a listed tool fits (tasks tools and agent, half
  each; agent prompts carry long instructions and tool descriptions), tool_choice
  "required", max_tokens 200; passes when a call names the expected tool with exactly the
  expected arguments. Target 0.80.
- tools_auto: first-turn requests of both tasks, half of them fitted by a listed tool and
  half by none, tool_choice "auto", max_tokens 128; passes when the model calls a tool
  exactly when one fits. Target 0.70.
- tool_result: the turn after a tool's result (tools and agent, half each), tool_choice
  "auto", max_tokens 128; passes when the model answers in words (finish_reason "stop", no
  call). Also reported: "uses_result" (every value of the result and the call's arguments
  that the reference answer quotes is in the answer, case-insensitive) and "exact_answer"
  (the reference answer itself is in it).
- qa: questions about the Bible, max_tokens 96; passes when the answer holds the key (the
  person, the verse's text or the book), case-insensitive. No target: a baseline.
- prose_loss (`--prose`, in this process, no server): the mean next-token cross-entropy in
  nats, float32 on the CPU, over every 512-token window of the held-out prose (the end of
  Revelation), the windows the previous model's held-out loss was measured on.

A request the server refuses (too long for the context, say) is a failure, with its error.
The rates, the failure samples (at most 3 per metric), the errors by status, any 5xx with
its request, the model, the CPU, the command and the date go to `--result-file`.

    python bench/model_eval.py --n 100 --prose
    python bench/model_eval.py --n 40 --only qa,chat,json --prose --result-file bench/results/model_eval_old.json
    python bench/model_eval.py --base-url http://127.0.0.1:8000 --only json   # a server already running
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import jsonschema
import openai

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "bench"))
import default_model_data as data  # noqa: E402
from soak import free_port, wait_until_healthy  # noqa: E402  (bench/soak.py: the same server start)

METRICS = ("chat", "json", "tools_required", "tools_auto", "tool_result", "qa")
TARGETS = {"chat": 0.90, "json": 0.95, "tools_required": 0.80, "tools_auto": 0.70}
MAX_FAILURE_SAMPLES = 3
TAIL_CHARS = 200
CONCURRENCY = 8

# ---------------------------------------------------------------- held-out examples


def split(count: int, parts: int) -> list[int]:
    """`count` as `parts` shares that differ by at most one, the larger first."""
    return [count // parts + (i < count % parts) for i in range(parts)]


def draw(gen: data.Generator, task: str, accept: Callable[[data.Example], bool], count: int) -> list[data.Example]:
    """The first `count` examples of `task` that `accept` keeps."""
    chosen: list[data.Example] = []
    for _ in range(count * 1000):
        if len(chosen) == count:
            break
        ex = gen.example(task)
        if accept(ex):
            chosen.append(ex)
    if len(chosen) < count:
        raise RuntimeError(f"the generator gave fewer than {count} fitting {task} examples")
    return chosen


def draw_tasks(gen: data.Generator, tasks: tuple[str, ...], accept: Callable[[data.Example], bool],
               count: int) -> list[data.Example]:
    """`count` accepted examples, shared evenly between `tasks`."""
    return [ex for task, k in zip(tasks, split(count, len(tasks))) for ex in draw(gen, task, accept, k)]


def first_turn(ex: data.Example) -> bool:
    return ex.messages[-1]["role"] == "user"


def calls(ex: data.Example) -> bool:
    return first_turn(ex) and ex.expected.get("call") is not None


def answers_in_words(ex: data.Example) -> bool:
    return first_turn(ex) and "call" in ex.expected and ex.expected["call"] is None


TOOL_TASKS = ("tools", "agent")


def select_examples(metric: str, n: int, corpus_dir: Path, seed: int) -> list[data.Example]:
    """The metric's `n` examples, from a generator of its own (so `--only` changes none)."""
    gen = data.Generator(corpus_dir, "eval", seed * 100 + METRICS.index(metric))
    if metric in ("chat", "json", "qa"):
        return [gen.example(metric) for _ in range(n)]
    if metric == "tools_required":
        return draw_tasks(gen, TOOL_TASKS, calls, n)
    if metric == "tools_auto":
        with_call, without = split(n, 2)
        return draw_tasks(gen, TOOL_TASKS, calls, with_call) + draw_tasks(gen, TOOL_TASKS, answers_in_words, without)
    if metric == "tool_result":
        return draw_tasks(gen, TOOL_TASKS, lambda ex: "answer" in ex.expected, n)
    raise ValueError(metric)


# ---------------------------------------------------------------- requests


def openai_messages(messages: list[dict]) -> list[dict]:
    """The generator's messages as the OpenAI API takes them: tool-call arguments as JSON text."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.dumps(
                c["function"]["arguments"], ensure_ascii=False)}} for c in m["tool_calls"]]
        out.append(m)
    return out


def request_options(metric: str, ex: data.Example) -> dict:
    """The request's parameters besides model and messages."""
    if metric == "chat":
        return {"max_tokens": 128}
    if metric == "qa":
        return {"max_tokens": 96}
    if metric == "json":
        if ex.kind == "json_object":
            fmt = {"type": "json_object"}
        else:
            fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ex.schema, "strict": True}}
        return {"max_tokens": 64, "response_format": fmt}
    if metric == "tools_required":
        return {"max_tokens": 200, "tools": ex.tools, "tool_choice": "required"}
    if metric in ("tools_auto", "tool_result"):
        return {"max_tokens": 128, "tools": ex.tools, "tool_choice": "auto"}
    raise ValueError(metric)


@dataclass
class Reply:
    """What came back for one request: a choice, or the error that came instead."""
    content: str = ""
    tool_calls: list[tuple[str, str]] = field(default_factory=list)  # (name, arguments text)
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None
    status: str | None = None  # "400 BadRequestError", ... for errors

    def shown(self) -> str:
        if self.error is not None:
            return ""
        calls = " ".join(f"{name}({args})" for name, args in self.tool_calls)
        text = self.content + (" " if self.content and calls else "") + calls
        if len(text) <= TAIL_CHARS:
            return text
        return text[:TAIL_CHARS // 2] + " … " + text[-TAIL_CHARS // 2:]  # how it began, and how it ended


async def ask(client: openai.AsyncOpenAI, model: str, ex: data.Example, options: dict) -> Reply:
    try:
        r = await client.chat.completions.create(model=model, messages=openai_messages(ex.messages),
                                                 temperature=0, **options)
    except openai.APIStatusError as e:
        return Reply(error=str(e)[:500], status=f"{e.status_code} {type(e).__name__}")
    except openai.APIError as e:  # connection lost, timeout: no status
        return Reply(error=str(e)[:500], status=type(e).__name__)
    choice = r.choices[0]
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
    return Reply(choice.message.content or "", calls, choice.finish_reason,
                 r.usage.completion_tokens if r.usage else 0)


# ---------------------------------------------------------------- checks


@dataclass
class Verdict:
    passed: bool
    reason: str = ""
    flags: dict[str, bool] = field(default_factory=dict)  # the metric's other rates
    group: str | None = None  # the breakdown it counts in


def check_chat(ex: data.Example, reply: Reply) -> Verdict:
    ok = reply.finish_reason == "stop"
    return Verdict(ok, "" if ok else f"finish_reason {reply.finish_reason}")


def check_qa(ex: data.Example, reply: Reply) -> Verdict:
    key = ex.expected["key"]
    ok = key.lower() in reply.content.lower()
    return Verdict(ok, "" if ok else f"no {key!r} in the answer")


def check_json(ex: data.Example, reply: Reply) -> Verdict:
    verdict = Verdict(False, group=ex.kind, flags={"exact": False})
    if reply.finish_reason != "stop":
        verdict.reason = f"finish_reason {reply.finish_reason}"
        return verdict
    try:
        value = json.loads(reply.content)
    except json.JSONDecodeError as e:
        verdict.reason = f"not JSON: {e}"
        return verdict
    verdict.flags["exact"] = value == ex.expected["value"]
    try:
        jsonschema.validate(value, ex.schema)
    except jsonschema.ValidationError as e:
        verdict.reason = f"fails the schema: {e.message}"
        return verdict
    verdict.passed = True
    return verdict


def parsed_arguments(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def check_tools_required(ex: data.Example, reply: Reply) -> Verdict:
    want = ex.expected["call"]
    ok = any(name == want["name"] and parsed_arguments(args) == want["arguments"] for name, args in reply.tool_calls)
    reason = "" if ok else (f"no tool call (finish_reason {reply.finish_reason})" if not reply.tool_calls else
                            f"expected {want['name']}({json.dumps(want['arguments'], ensure_ascii=False)})")
    return Verdict(ok, reason, group=ex.task)


def check_tools_auto(ex: data.Example, reply: Reply) -> Verdict:
    should_call = ex.expected["call"] is not None
    called = bool(reply.tool_calls)
    ok = called == should_call
    reason = "" if ok else ("answered in words where a tool fits" if should_call else "called a tool where none fits")
    return Verdict(ok, reason, group=f"{ex.task}/{'call' if should_call else 'no_call'}")


def quoted_values(ex: data.Example) -> list[str]:
    """The tool result's and the call's values that the reference answer quotes."""
    answer = ex.expected["answer"].lower()
    result = json.loads(ex.messages[-1]["content"])
    arguments = ex.messages[-2]["tool_calls"][0]["function"]["arguments"]
    values = [str(v) for v in (*result.values(), *arguments.values()) if not isinstance(v, (dict, list))]
    return sorted({v for v in values if v.lower() in answer})


def check_tool_result(ex: data.Example, reply: Reply) -> Verdict:
    text = reply.content.lower()
    flags = {"uses_result": all(v.lower() in text for v in quoted_values(ex)),
             "exact_answer": ex.expected["answer"].lower() in text}
    ok = reply.finish_reason == "stop" and not reply.tool_calls
    reason = "" if ok else ("called a tool again" if reply.tool_calls else f"finish_reason {reply.finish_reason}")
    return Verdict(ok, reason, flags, group=ex.task)


CHECKS: dict[str, Callable[[data.Example, Reply], Verdict]] = {
    "chat": check_chat, "json": check_json, "tools_required": check_tools_required,
    "tools_auto": check_tools_auto, "tool_result": check_tool_result, "qa": check_qa}


def judge(metric: str, ex: data.Example, reply: Reply) -> Verdict:
    """The metric's check; a request that got an error fails, and counts in its group."""
    verdict = CHECKS[metric](ex, reply)
    if reply.error is not None:
        verdict.passed, verdict.reason = False, reply.error
        verdict.flags = dict.fromkeys(verdict.flags, False)
    return verdict


# ---------------------------------------------------------------- one metric


def rate(passes: int, n: int) -> dict:
    return {"n": n, "passes": passes, "rate": round(passes / n, 4) if n else None}


def prompt_tail(ex: data.Example) -> str:
    last = ex.messages[-1]
    return f"[{len(ex.messages)} messages] {last['role']}: {last.get('content') or ''}"[-TAIL_CHARS:]


def summarise(metric: str, examples: list[data.Example], replies: list[Reply], verdicts: list[Verdict],
              options: list[dict], wall_s: float) -> tuple[dict, list[dict]]:
    """The metric's rates, breakdowns, errors and failure samples; and its 5xx (with requests)."""
    summary = rate(sum(v.passed for v in verdicts), len(verdicts))
    summary["target"] = TARGETS.get(metric)
    for flag in sorted({f for v in verdicts for f in v.flags}):
        summary[flag] = rate(sum(v.flags.get(flag, False) for v in verdicts), len(verdicts))
    groups: dict[str, list[Verdict]] = {}
    for v in verdicts:
        if v.group is not None:
            groups.setdefault(v.group, []).append(v)
    if groups:
        summary["groups"] = {g: {**rate(sum(v.passed for v in vs), len(vs)),
                                 **{f: rate(sum(v.flags.get(f, False) for v in vs), len(vs))["rate"]
                                    for f in sorted({f for v in vs for f in v.flags})}}
                             for g, vs in sorted(groups.items())}
    summary["errors"] = dict(Counter(r.status for r in replies if r.status is not None))
    summary["completion_tokens"] = sum(r.completion_tokens for r in replies)
    summary["wall_s"] = round(wall_s, 1)
    summary["failures"] = [
        {"prompt_tail": prompt_tail(ex), "output": reply.shown(), "reason": verdict.reason}
        for ex, reply, verdict in zip(examples, replies, verdicts) if not verdict.passed][:MAX_FAILURE_SAMPLES]
    server_errors = [{"metric": metric, "status": r.status, "error": r.error,
                      "request": {"messages": openai_messages(ex.messages), "temperature": 0, **o}}
                     for ex, r, o in zip(examples, replies, options)
                     if r.status is not None and r.status[:1] == "5"]
    return summary, server_errors


async def run_metric(client: openai.AsyncOpenAI, model: str, metric: str,
                     examples: list[data.Example]) -> tuple[dict, list[dict]]:
    semaphore = asyncio.Semaphore(CONCURRENCY)
    options = [request_options(metric, ex) for ex in examples]

    async def one(ex: data.Example, opts: dict) -> Reply:
        async with semaphore:
            return await ask(client, model, ex, opts)

    started = time.monotonic()
    replies = await asyncio.gather(*(one(ex, o) for ex, o in zip(examples, options)))
    wall_s = time.monotonic() - started
    verdicts = [judge(metric, ex, r) for ex, r in zip(examples, replies)]
    return summarise(metric, examples, replies, verdicts, options, wall_s)


async def run_metrics(base_url: str, metrics: list[str], examples: dict[str, list[data.Example]]) -> dict:
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=900)
    try:
        card = (await client.models.list()).data[0]
        out: dict = {"served_model": card.id, "max_model_len": getattr(card, "max_model_len", None),
                     "metrics": {}, "server_errors_5xx": []}
        for metric in metrics:
            summary, server_errors = await run_metric(client, card.id, metric, examples[metric])
            out["metrics"][metric] = summary
            out["server_errors_5xx"].extend(server_errors)
            print(f"{metric}: {summary['passes']}/{summary['n']} in {summary['wall_s']} s"
                  + (f", errors {summary['errors']}" if summary["errors"] else ""), flush=True)
        return out
    finally:
        await client.close()


# ---------------------------------------------------------------- the server


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


@contextlib.contextmanager
def server(args: argparse.Namespace, info: dict) -> Iterator[str]:
    """The base URL of `--base-url`, or of a `gptserve serve` started here and stopped after."""
    if args.base_url:
        info["server"] = {"base_url": args.base_url}
        yield args.base_url.rstrip("/")
        return
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "gptserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               *(["--model", args.model] if args.model else []), *(["--dtype", args.dtype] if args.dtype else [])]
    log_path = Path(tempfile.mkdtemp(prefix="gptserve-model-eval-")) / "server.log"
    print("server:", shlex.join(command), f"(log: {log_path})", flush=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
    try:
        wait_until_healthy(proc, base, log_path)
        yield base
    finally:
        returncode = stop(proc)
        log_text = log_path.read_text(errors="replace")
        info["server"] = {"command": shlex.join(["gptserve", *command[3:]]), "exit_code": returncode,
                          "tracebacks_in_log": log_text.count("Traceback")}


# ---------------------------------------------------------------- prose loss


def prose_loss(model: str | None, corpus_dir: Path) -> dict:
    """Mean next-token cross-entropy (nats, float32, CPU) over the held-out prose's 512-token windows."""
    from contextlib import nullcontext

    import train_default_model as train  # torch and numpy: only for --prose

    from gptserve.model.tokenizer import Tokenizer
    from gptserve.weights.loader import load_model, resolve_model_path

    started = time.monotonic()
    path = resolve_model_path(model)
    net = load_model(path)  # float32, CPU
    _, held_out = train.prose_tokens(corpus_dir, Tokenizer.from_folder(path), 0.02)
    rows = train.consecutive_windows(held_out, train.OLD_VAL_WINDOW)
    loss = train.evaluate(net, rows, 2, nullcontext)
    return {"loss_nats": round(loss, 4), "windows": len(rows), "window_tokens": train.OLD_VAL_WINDOW,
            "held_out_tokens": len(held_out), "dtype": "float32", "device": "cpu",
            "wall_s": round(time.monotonic() - started, 1)}


# ---------------------------------------------------------------- report


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def fmt_rate(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}"


def markdown(result: dict) -> str:
    lines = ["| metric | n | passes | rate | target | also |", "|---|---|---|---|---|---|"]
    for metric, m in result.get("metrics", {}).items():
        target = m["target"]
        verdict = "" if target is None else (" ✓" if m["rate"] is not None and m["rate"] >= target else " ✗")
        also = [f"{k} {fmt_rate(v['rate'])}" for k, v in m.items() if isinstance(v, dict) and "rate" in v]
        if m["errors"]:
            also.append("errors " + ", ".join(f"{k}: {v}" for k, v in m["errors"].items()))
        lines.append(f"| {metric} | {m['n']} | {m['passes']} | {fmt_rate(m['rate'])}{verdict} | "
                     f"{'-' if target is None else f'≥ {target:.2f}'} | {'; '.join(also)} |")
        for group, g in m.get("groups", {}).items():
            extra = [f"{k} {fmt_rate(v)}" for k, v in g.items() if k not in ("n", "passes", "rate")]
            lines.append(f"| · {group} | {g['n']} | {g['passes']} | {fmt_rate(g['rate'])} | | {'; '.join(extra)} |")
    if "prose_loss" in result:
        p = result["prose_loss"]
        lines.append(f"| prose_loss (nats) | {p['windows']} windows | | {p['loss_nats']:.3f} | | "
                     f"{p['window_tokens']}-token windows, {p['dtype']} |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100, help="examples per metric")
    p.add_argument("--seed", type=int, default=7, help="seed of the evaluation generators")
    p.add_argument("--model", default=None, help="model folder or Hub id (default: the bundled model)")
    p.add_argument("--dtype", default=None, help="passed to the server (default: its own, auto)")
    p.add_argument("--only", default=None,
                   help=f"comma-separated metrics to run, of {', '.join(METRICS)}, prose (default: all but prose)")
    p.add_argument("--prose", action="store_true", help="also the held-out prose loss, in this process")
    p.add_argument("--base-url", default=None, help="an already running server, e.g. http://127.0.0.1:8000 "
                   "(--model then names only the model of --prose and of the record)")
    p.add_argument("--corpus-dir", type=Path, default=Path("runs/corpus"),
                   help="kjv.txt and devil.txt; written from the Debian packages when absent")
    p.add_argument("--result-file", type=Path, default=Path("bench/results/model_eval.json"))
    args = p.parse_args()
    wanted = list(METRICS) if args.only is None else [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = set(wanted) - set(METRICS) - {"prose"}
    if unknown or not wanted:
        p.error(f"--only takes metrics of {', '.join(METRICS)}, prose; got {args.only!r}")
    args.prose = args.prose or "prose" in wanted
    args.metrics = [m for m in METRICS if m in wanted]
    if args.n < 2:
        p.error("--n must be at least 2")
    return args


def main() -> int:
    args = parse_args()
    corpus_dir = args.corpus_dir if args.corpus_dir.is_absolute() else REPO / args.corpus_dir
    if not (corpus_dir / "kjv.txt").exists() or not (corpus_dir / "devil.txt").exists():
        print(f"writing the corpus to {corpus_dir}", flush=True)
        data.extract_corpus(corpus_dir)
    from gptserve.weights.loader import DEFAULT_MODEL_DIR

    started = time.monotonic()
    result: dict = {"model": args.model or str(DEFAULT_MODEL_DIR.relative_to(REPO)), "dtype": args.dtype or "auto",
                    "cpu": cpu_name(), "command": shlex.join(["python", *sys.argv]),
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "n": args.n, "seed": args.seed,
                    "concurrency": CONCURRENCY}
    if args.metrics:
        examples = {m: select_examples(m, args.n, corpus_dir, args.seed) for m in args.metrics}
        with server(args, result) as base:
            result.update(asyncio.run(run_metrics(base, args.metrics, examples)))
    if args.prose:
        result["prose_loss"] = prose_loss(args.model, corpus_dir)
    result["wall_s"] = round(time.monotonic() - started, 1)

    print(markdown(result))
    for error in result.get("server_errors_5xx", []):
        print(f"5xx in {error['metric']}: {error['status']}: {error['error']}")
    if result.get("server", {}).get("tracebacks_in_log"):
        print(f"the server log has {result['server']['tracebacks_in_log']} traceback(s): {result['server']['log']}")
    out = args.result_file if args.result_file.is_absolute() else REPO / args.result_file
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
