"""Do large grammars stall the server? /health latency and a plain stream's token gaps while
the largest grammars the default limits accept compile, against the same without them.

Starts `gptserve serve` (the bundled model, default settings) on 127.0.0.1, then runs two
phases of --seconds each: first a baseline, then the same load with grammar requests sent
back to back by --senders clients. In both phases one thread polls /health every 20 ms and
another streams plain completions (128 tokens, ignore_eos) one after another. The grammars
are each made new (a salt in every name, so no cache helps) and are the largest the
default limits take (--max-choices, --max-schema-size): a 10,000-way choice, a schema of
1,360 required properties, and one of 2,040 optional properties, which compiles for
seconds and is then refused (its parser rows overflow at its first token). Target: /health p99 at most 100 ms above the baseline's.

    python bench/grammar_stall.py --json bench/results/grammar_stall.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from compare import ROOT, Peer, Server, cpu_name, free_port  # noqa: E402

POLL_S = 0.020
MESSAGES = [{"role": "user", "content": "Answer."}]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def summary(xs: list[float]) -> dict:
    return {"n": len(xs), "p50_ms": percentile(xs, 0.5) * 1e3, "p99_ms": percentile(xs, 0.99) * 1e3,
            "max_ms": max(xs, default=float("nan")) * 1e3}


def grammar_bodies(salt: str) -> dict[str, dict]:
    """The largest grammars the default limits accept, named anew for each salt."""
    wide = {f"{salt}_{i}": {"type": "boolean"} for i in range(2040)}  # 4,083 values of the 4,096
    required = dict(list(wide.items())[:1360])  # with its "required" list, 4,084 values
    return {
        "choice of 10,000": {"structured_outputs": {"choice": [f"{salt} option {i}" for i in range(10_000)]}},
        "1,360 required properties": {"response_format": {"type": "json_schema", "json_schema": {
            "name": "wide", "schema": {"type": "object", "properties": required, "required": list(required)}}}},
        "2,040 optional properties (refused)": {"response_format": {"type": "json_schema", "json_schema": {
            "name": "wide", "schema": {"type": "object", "properties": wide}}}},
    }


class Load:
    """/health every 20 ms and one plain stream after another, until stopped."""

    def __init__(self, base: str):
        self.base, self.stop = base, threading.Event()
        self.health: list[float] = []
        self.gaps: list[float] = []  # between a stream's tokens
        self.threads = [threading.Thread(target=self._poll), threading.Thread(target=self._stream)]

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def _poll(self) -> None:
        with httpx.Client(base_url=self.base, timeout=60, trust_env=False) as http:
            next_at = time.perf_counter()
            while not self.stop.is_set():
                started = time.perf_counter()
                assert http.get("/health").status_code == 200
                self.health.append(time.perf_counter() - started)
                next_at += POLL_S
                time.sleep(max(0.0, next_at - time.perf_counter()))

    def _stream(self) -> None:
        body = {"prompt": "Once upon a time", "max_tokens": 128, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=self.base, timeout=120, trust_env=False) as http:
            while not self.stop.is_set():
                last = None
                with http.stream("POST", "/v1/completions", json=body) as response:
                    for line in response.iter_lines():
                        if not line.startswith("data: {"):
                            continue
                        now = time.perf_counter()
                        if last is not None:
                            self.gaps.append(now - last)
                        last = now


def send_grammars(base: str, until: float, results: list[dict]) -> None:
    with httpx.Client(base_url=base, timeout=300, trust_env=False) as http:
        while True:
            for name, fields in grammar_bodies(uuid.uuid4().hex[:8]).items():
                if time.monotonic() >= until:
                    return
                started = time.perf_counter()
                response = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2, **fields})
                results.append({"grammar": name, "status": response.status_code,
                                "seconds": time.perf_counter() - started})


def run_phase(base: str, seconds: float, senders: int) -> dict:
    grammars: list[dict] = []
    with Load(base) as load:
        until = time.monotonic() + seconds
        workers = [threading.Thread(target=send_grammars, args=(base, until, grammars)) for _ in range(senders)]
        for w in workers:
            w.start()
        while time.monotonic() < until:
            time.sleep(0.1)
        for w in workers:
            w.join()
    out = {"health": summary(load.health), "stream_token_gap": summary(load.gaps)}
    if grammars:
        out["grammar_requests"] = {
            name: {"count": len(rs), "statuses": sorted({r["status"] for r in rs}),
                   "mean_s": statistics.mean(r["seconds"] for r in rs)}
            for name in dict.fromkeys(r["grammar"] for r in grammars)
            for rs in [[r for r in grammars if r["grammar"] == name]]}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="length of each phase")
    p.add_argument("--senders", type=int, default=2, help="clients sending grammar requests back to back")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    port = free_port()
    command = [sys.executable, "-m", "gptserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    log = ROOT / ".cache" / "grammar_stall" / "server.log"
    with Server(Peer("gptserve", "gptserve", command, port), log) as server:
        server.wait_ready(300)
        base = f"http://127.0.0.1:{port}"
        results = {"command": " ".join(["python", "bench/grammar_stall.py", *(argv or sys.argv[1:])]),
                   "server": " ".join(["gptserve", *command[3:]]), "cpu": cpu_name(),
                   "seconds_per_phase": args.seconds, "senders": args.senders,
                   "baseline": run_phase(base, args.seconds, 0),
                   "compiling": run_phase(base, args.seconds, args.senders)}
    base_p99, busy_p99 = results["baseline"]["health"]["p99_ms"], results["compiling"]["health"]["p99_ms"]
    results["health_p99_extra_ms"] = busy_p99 - base_p99
    results["target_met"] = busy_p99 - base_p99 <= 100
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
