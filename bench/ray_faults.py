"""A fault run on a local Ray Serve fleet: an engine replica killed under steady load.

Two engine replicas (one CPU each) of the bundled model serve `--clients` clients, each
sending streamed completions back to back for `--duration` seconds. At `--kill-at`
seconds one engine replica's actor is killed (as a crashed process or a lost node
would be). Reported: requests sent, completed, cut mid-stream (an error event, then
[DONE]), failed before their stream began (an HTTP error: a lost request), sent again
to the other replica (the ingress's gptserve_requests_retried), the longest wait for a
request that began after the kill, how long until the ingress's router could reach a
replacement replica (gptserve_engine_replicas back to 2) and until it served; and, once idle, the fleet's KV blocks, running and waiting requests and
queue slots (all must be 0).

    python bench/ray_faults.py --json bench/results/ray_faults.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx


@dataclass
class Sent:
    start: float
    end: float = 0.0
    status: int = 0
    replica: str = ""
    chunks: int = 0
    error_event: bool = False
    done: bool = False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def stream_one(http: httpx.AsyncClient, i: int, max_tokens: int, t0: float) -> Sent:
    sent = Sent(start=time.monotonic() - t0)
    body = {"prompt": f"Client request {i}: tell a story about", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            sent.status, sent.replica = response.status_code, response.headers.get("x-gptserve-replica", "")
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    sent.done = True
                elif line.startswith("data: "):
                    sent.error_event |= "error" in json.loads(line[6:])
                    sent.chunks += 1
    except httpx.HTTPError:
        sent.status = -1
    sent.end = time.monotonic() - t0
    return sent


def fleet_gauges(base_url: str) -> dict[str, float]:
    names = ("gptserve_kv_blocks_used", "gptserve_num_requests_running", "gptserve_num_requests_waiting",
             "gptserve_queue_slots_in_use", "gptserve_requests_retried_total", "gptserve_engine_replicas")
    lines = httpx.get(f"{base_url}/metrics").text.splitlines()
    return {n: float(next(ln.split()[1] for ln in lines if ln.startswith(n + " "))) for n in names}


def kill_replica(name: str) -> None:
    import ray

    [actor] = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith(name)]
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)


async def load(base_url: str, args: argparse.Namespace) -> dict:
    t0 = time.monotonic()
    results: list[Sent] = []
    killed: dict[str, float] = {}
    replaced_at: list[float] = []

    async def client(c: int, http: httpx.AsyncClient) -> None:
        i = 0
        while time.monotonic() - t0 < args.duration:
            results.append(await stream_one(http, c * 100_000 + i, args.max_tokens, t0))
            i += 1

    async def killer(http: httpx.AsyncClient) -> None:
        await asyncio.sleep(args.kill_at)
        victim = (await stream_one(http, -1, 1, t0)).replica
        await asyncio.to_thread(kill_replica, victim)
        killed.update(name=victim, at=time.monotonic() - t0)
        seen_one = False
        while True:  # the router's view: the dead replica dropped, then a replacement added
            replicas = (await asyncio.to_thread(fleet_gauges, base_url))["gptserve_engine_replicas"]
            seen_one |= replicas < 2
            if seen_one and replicas >= 2:
                replaced_at.append(time.monotonic() - t0)
                return
            await asyncio.sleep(0.2)

    async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
        await asyncio.gather(killer(http), *(client(c, http) for c in range(args.clients)))
    before = {r.replica for r in results if r.end < killed["at"]}
    new = [r.end for r in results if r.replica and r.replica not in before and r.replica != killed["name"]]
    after = [r for r in results if r.start >= killed["at"]]
    return {"results": results, "killed_at_s": killed["at"], "replacement_routable_s": replaced_at[0] - killed["at"],
            "replacement_served_s": (min(new) - killed["at"]) if new else None,
            "longest_wait_after_kill_s": max((r.end - r.start for r in after if r.done), default=0.0)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=40.0, help="seconds of load")
    p.add_argument("--kill-at", type=float, default=10.0, help="seconds into the load")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=2, help="per engine: the rest wait there, without output")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    import ray
    from ray import serve

    from gptserve.config import EngineConfig, ServerConfig
    from gptserve.deploy.application import build_application
    from gptserve.deploy.spec import AppSpec, Scaling

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        spec = AppSpec(None, EngineConfig(device="cpu", kv_cache_memory=64 * 2**20, max_num_seqs=args.max_num_seqs),
                       ServerConfig(state_dir=tempfile.mkdtemp()), Scaling(num_replicas=2, num_cpus=1))
        serve.run(build_application(spec), name="faults", route_prefix="/")
        retried_before = fleet_gauges(base_url)["gptserve_requests_retried_total"]
        run = asyncio.run(load(base_url, args))
        time.sleep(3)  # the replicas' stats reach the ingress every second
        idle = fleet_gauges(base_url)
    finally:
        serve.shutdown()
        ray.shutdown()
    results: list[Sent] = run.pop("results")
    report = {
        "requests_sent": len(results),
        "completed": sum(r.done and not r.error_event for r in results),
        "cut_mid_stream": sum(r.error_event for r in results),
        "cut_without_done": sum(r.error_event and not r.done for r in results),
        "failed_before_streaming": sum(r.status != 200 for r in results),
        "retried_on_other_replica": idle["gptserve_requests_retried_total"] - retried_before,
        **run, "idle_after": idle, "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    for key, value in report.items():
        print(f"{key:<28}{value}")
    if args.json:
        args.json.write_text(json.dumps({**report, "requests": [asdict(r) for r in results]}, indent=1))
    return report


if __name__ == "__main__":
    main()
