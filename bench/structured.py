"""Structured outputs: which grammar engine, what a mask costs, and constrained serving
against unconstrained, in one run.

1. Engines: for each test schema (tests/server/test_structured.py), llguidance and (when
   installed: `pip install xgrammar`) xgrammar compile the schema against GPT-2's
   vocabulary, cold and then cached, and replay one valid JSON answer token by token:
   the mean and p99 time to fill one row's token mask.
2. In the engine: 16 constrained sequences stepped by LLMEngine on a random GPT-2 small;
   the time filling the batch's masks against the whole step.
3. Serving: `gptserve serve` on the same model, 16 concurrent streamed requests of 128
   output tokens, unconstrained against a JSON Schema that needs more than 128 tokens (so
   both end by length at 128), alternating over rounds: constrained/unconstrained tok/s.

    python bench/structured.py --json bench/results/structured.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from compare import CACHE, Peer, Server, free_port, make_checkpoint  # noqa: E402
from gptserve.server.schema_rewrite import prepare_schema  # noqa: E402
from gptserve.server.structured import JSON_LAYOUT  # noqa: E402
from tests.server.test_structured import SCHEMAS  # noqa: E402

INSTANCES = {  # one valid answer per schema, as llguidance's default JSON layout writes it
    "nested object": '{"name": "Ada", "address": {"city": "Rome", "zip": 12345}}',
    "array with min and max items": '{"tags": ["a", "c"]}',
    "enum, integer and number": '{"colour": "red", "count": 3, "score": 0.5, "ok": true}',
    "optional field and string lengths": '{"id": "x1", "note": "hi"}',
    "anyOf": '{"kind": "cat", "lives": 9}',
}
LONG_SCHEMA = {"type": "object", "properties": {"values": {
    "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 200, "maxItems": 200}},
    "required": ["values"]}


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def engines(tokenizer) -> dict:
    """Compile (cold, cached) and per-token mask times of each engine on each test schema."""
    out: dict[str, dict] = {}
    import llguidance
    import llguidance.tiktoken
    import llguidance.torch

    t = time.perf_counter()
    lltok = llguidance.tiktoken.lltokenizer_from_encoding(tokenizer.encoding, n_vocab=tokenizer.vocab_size,
                                                          eos_token=tokenizer.eos_token_id)
    res = {"tokenizer_s": time.perf_counter() - t, "schemas": {}}
    bitmask = llguidance.torch.allocate_token_bitmask(1, tokenizer.vocab_size)
    for name, schema in SCHEMAS.items():
        t = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(prepare_schema(schema, True), overrides=JSON_LAYOUT)
        matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        llguidance.LLMatcher(lltok, grammar, log_level=0)  # llguidance caches nothing itself: as cold
        copy_t0 = time.perf_counter()
        matcher_copy = matcher.deep_copy()
        cached = time.perf_counter() - copy_t0  # what gptserve does for a cached grammar: a copy
        masks = []
        for token in tokenizer.encode(INSTANCES[name]):
            t = time.perf_counter()
            llguidance.torch.fill_next_token_bitmask(matcher_copy, bitmask, 0)
            masks.append(time.perf_counter() - t)
            assert matcher_copy.consume_token(token), (name, matcher_copy.get_error())
        res["schemas"][name] = {"compile_cold_ms": cold * 1e3, "compile_cached_ms": cached * 1e3,
                                "mask_mean_us": statistics.mean(masks) * 1e6, "mask_p99_us": percentile(masks, .99) * 1e6}
    out["llguidance"] = res
    try:
        import xgrammar as xgr
    except ImportError:
        out["xgrammar"] = {"skipped": "not installed (pip install xgrammar)"}
        return out
    t = time.perf_counter()
    info = xgr.TokenizerInfo([tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)],
                             vocab_type=xgr.VocabType.RAW, stop_token_ids=[tokenizer.eos_token_id])
    compiler = xgr.GrammarCompiler(info)
    res = {"tokenizer_s": time.perf_counter() - t, "schemas": {}}
    bitmask = xgr.allocate_token_bitmask(1, tokenizer.vocab_size)
    for name, schema in SCHEMAS.items():
        t = time.perf_counter()
        options = dict(any_whitespace=False, separators=(", ", ": "), strict_mode=True)  # the same layout
        compiled = compiler.compile_json_schema(json.dumps(schema), **options)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        compiler.compile_json_schema(json.dumps(schema), **options)  # xgrammar's own cache
        cached = time.perf_counter() - t
        matcher = xgr.GrammarMatcher(compiled)
        masks = []
        for token in tokenizer.encode(INSTANCES[name]):
            t = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask)
            masks.append(time.perf_counter() - t)
            assert matcher.accept_token(token), name
        res["schemas"][name] = {"compile_cold_ms": cold * 1e3, "compile_cached_ms": cached * 1e3,
                                "mask_mean_us": statistics.mean(masks) * 1e6, "mask_p99_us": percentile(masks, .99) * 1e6}
    out["xgrammar"] = res
    return out


def in_engine(checkpoint: Path, steps: int = 40) -> dict:
    """16 constrained sequences: mask-filling time (on its thread) against the whole step."""
    from gptserve.config import EngineConfig
    from gptserve.engine.grammar import GrammarCompiler
    from gptserve.engine.llm_engine import LLMEngine
    from gptserve.engine.sampling_params import SamplingParams

    engine = LLMEngine(str(checkpoint), EngineConfig(device="cpu", dtype="float32", enforce_eager=True))
    fill_times: list[float] = []
    fill = GrammarCompiler._fill

    def timed(self, matchers, rows):
        t = time.perf_counter()
        try:
            return fill(self, matchers, rows)
        finally:
            fill_times.append(time.perf_counter() - t)

    GrammarCompiler._fill = timed
    grammar = __import__("llguidance").LLMatcher.grammar_from_json_schema(LONG_SCHEMA)
    for i in range(16):
        engine.add_request(f"r{i}", [1, 2, 3, i], SamplingParams(max_tokens=steps + 2, temperature=1.0, seed=i,
                                                                 grammar=grammar))
    step_times = []
    while engine.has_unfinished():
        t = time.perf_counter()
        engine.step()
        step_times.append(time.perf_counter() - t)
    GrammarCompiler._fill = fill
    decode = step_times[2:]  # after the prefills
    return {"step_ms_mean": statistics.mean(decode) * 1e3, "mask_fill_ms_mean": statistics.mean(fill_times[2:]) * 1e3,
            "mask_share_of_step": statistics.mean(fill_times[2:]) / statistics.mean(decode)}


def serving(args: argparse.Namespace, checkpoint: Path) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "gptserve.cli", "serve", "--model", str(checkpoint), "--dtype", "float32",
           "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)]
    threads = str(os.cpu_count())
    peer = Peer("gptserve", "gptserve", cmd, port, {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
    runs: dict[str, list[float]] = {"unconstrained": [], "json_schema": []}
    extra = {"unconstrained": {},
             "json_schema": {"response_format": {"type": "json_schema",
                                                 "json_schema": {"name": "values", "schema": LONG_SCHEMA}}}}
    work = CACHE / "bench" / "structured"
    work.mkdir(parents=True, exist_ok=True)
    with Server(peer, work / "server.log") as server:
        server.wait_ready(300)
        base = f"http://127.0.0.1:{port}"
        httpx.post(base + "/v1/completions", json={"prompt": "warm up", "max_tokens": 8,
                                                   **extra["json_schema"]}, timeout=120).raise_for_status()
        for r in range(args.rounds):
            for side in (["unconstrained", "json_schema"] if r % 2 == 0 else ["json_schema", "unconstrained"]):
                result = work / f"{side}_r{r}.json"
                subprocess.run([sys.executable, str(BENCH / "serve.py"), "--base-url", base, "--concurrency", "16",
                                "--num-requests", "32", "--input-len", "64", "--output-len", "128", "--seed", str(r),
                                "--warmup", "0", "--extra-body", json.dumps(extra[side]), "--result-file", str(result),
                                "--disable-tqdm"], check=True, stdout=subprocess.DEVNULL)
                summary = json.loads(result.read_text())
                runs[side].append(summary["output_throughput"])
                print(f"round {r} {side}: {summary['output_throughput']:.1f} tok/s", flush=True)
    med = {side: statistics.median(v) for side, v in runs.items()}
    return {"runs": runs, "median_tok_s": med, "constrained_over_unconstrained": med["json_schema"] / med["unconstrained"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--json", type=Path)
    p.add_argument("--skip-serving", action="store_true")
    args = p.parse_args()
    from gptserve.model.tokenizer import Tokenizer
    from gptserve.weights.loader import DEFAULT_MODEL_DIR

    report = {"engines": engines(Tokenizer.from_folder(DEFAULT_MODEL_DIR))}
    print(json.dumps(report["engines"], indent=1), flush=True)
    checkpoint = make_checkpoint(CACHE / "bench")
    report["in_engine"] = in_engine(checkpoint)
    print(json.dumps(report["in_engine"], indent=1), flush=True)
    if not args.skip_serving:
        report["serving"] = serving(args, checkpoint)
        print(json.dumps(report["serving"], indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
