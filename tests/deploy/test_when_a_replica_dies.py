"""An engine replica killed under load: nothing that had not started streaming is lost,
a cut stream ends with an error event and [DONE], Serve replaces the replica, and the
survivor leaks nothing. (On the shared application, after the other tests: it ends with
2 replicas again. The kill is a module fixture, so either test runs alone.)"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx
import pytest
import ray

from tests.deploy.conftest import API_KEY, MAX_NUM_SEQS, NUM_REPLICAS, RayApp
from tests.server.conftest import MODEL_NAME

RECOVERY_S = 180  # Serve's health check and a new replica's start-up, with room on a slow, busy machine


@dataclass
class Outcome:
    status: int | None = None
    replica: str = ""
    chunks: int = 0  # data events before the end
    error_event: bool = False
    done: bool = False
    failure: str = ""


async def stream_completion(http: httpx.AsyncClient, prompt: str, max_tokens: int = 900,
                            on_replica: tuple[str, asyncio.Event] | None = None) -> Outcome:
    """One streamed completion, read to its end; `on_replica`: (a replica name, an event set
    once this stream is under way on that replica)."""
    outcome = Outcome()
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            outcome.status, outcome.replica = response.status_code, response.headers.get("x-gptserve-replica", "")
            if response.status_code != 200:
                outcome.failure = (await response.aread()).decode()
                return outcome
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    outcome.done = True
                elif "error" in json.loads(data):
                    outcome.error_event = True
                else:
                    outcome.chunks += 1
                    if on_replica is not None and outcome.replica == on_replica[0] and outcome.chunks == 3:
                        on_replica[1].set()
    except httpx.HTTPError as e:
        outcome.failure = repr(e)
    return outcome


def replica_actor(name: str) -> ray.actor.ActorHandle:
    """The actor of the engine replica named `name` in x-gptserve-replica (GptServeEngine#<id>)."""
    actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith(name)]
    assert len(actors) == 1, actors
    return ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"])


async def wait_for_metric(app: RayApp, name: str, at_least: float, timeout: float = 30) -> None:
    """Until the ingress's `name` reaches `at_least` (engine stats reach it every second)."""
    deadline = time.monotonic() + timeout
    while (await asyncio.to_thread(app.metric, name)) < at_least:
        assert time.monotonic() < deadline, f"{name} did not reach {at_least}"
        await asyncio.sleep(0.2)


async def load_with_a_kill(app: RayApp) -> tuple[list[Outcome], list[Outcome]]:
    """The victim replica's MAX_NUM_SEQS slots held by streams under way, and requests queued
    behind them there without output (the router sends a prompt to the replica holding its
    prefix, and the other replica has nothing to do, so every waiting request is the victim's);
    then the victim is killed, and more requests are sent right after the kill (some routed
    to the dead replica before the router knows). Returns the outcomes of those in flight
    and of those sent after."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    prefix = "a prefix the victim replica holds, " * 6  # several full KV blocks: the router's affinity key
    async with httpx.AsyncClient(base_url=app.base_url, headers=headers, timeout=120) as http:
        victim = (await stream_completion(http, prefix + "which replica?", max_tokens=1)).replica
        actor = await asyncio.to_thread(replica_actor, victim)
        running = []
        for i in range(MAX_NUM_SEQS):  # one at a time: each is under way on the victim before the next
            under_way = asyncio.Event()
            running.append(asyncio.create_task(stream_completion(http, prefix + f"running {i}",
                                                                 on_replica=(victim, under_way))))
            await asyncio.wait_for(under_way.wait(), 60)
        queued = [asyncio.create_task(stream_completion(http, prefix + f"queued {i}", max_tokens=8))
                  for i in range(3)]
        await wait_for_metric(app, "gptserve_num_requests_waiting", len(queued))
        ray.kill(actor, no_restart=True)
        after = await asyncio.gather(*(stream_completion(http, f"after {i}: " * 6, max_tokens=8) for i in range(12)))
        in_flight = await asyncio.wait_for(asyncio.gather(*running, *queued), 120)
        return in_flight, after


@dataclass
class Kill:
    in_flight: list[Outcome]  # the victim's running and queued streams
    after: list[Outcome]  # requests sent right after the kill
    retried: float  # requests the ingress sent again meanwhile


@pytest.fixture(scope="module")
def kill(ray_app: RayApp) -> Kill:
    """The victim killed under load, once for this module's tests (each may run alone)."""
    retried_before = ray_app.metric("gptserve_requests_retried_total")
    in_flight, after = asyncio.run(load_with_a_kill(ray_app))
    return Kill(in_flight, after, ray_app.metric("gptserve_requests_retried_total") - retried_before)


def test_a_killed_replica_loses_no_request_that_had_not_started_streaming(kill: Kill):
    for outcome in kill.in_flight + kill.after:
        # never an HTTP error: a request refused before its stream began would be lost
        assert outcome.status == 200 and not outcome.failure, outcome
        assert outcome.done, f"a stream ended without [DONE]: {outcome}"
    running, queued = kill.in_flight[:MAX_NUM_SEQS], kill.in_flight[MAX_NUM_SEQS:]
    # the victim's slots were still held when it died (900 tokens take far longer than the
    # kill), so the queued requests had no output yet
    assert all(o.error_event and o.chunks > 0 for o in running), running
    assert all(not o.error_event for o in queued), queued  # sent again to the survivor
    assert all(not o.error_event for o in kill.after)  # those that had not started were sent again, or elsewhere
    assert kill.retried >= 3  # the requests queued on the killed replica


def test_serve_replaces_the_killed_replica_and_the_survivors_leak_nothing(ray_app: RayApp, kill: Kill):
    deadline = time.monotonic() + RECOVERY_S
    while ray_app.running_engine_replicas() < NUM_REPLICAS or ray_app.metric("gptserve_engine_replicas") < NUM_REPLICAS:
        assert time.monotonic() < deadline, "the killed replica was not replaced"
        time.sleep(0.5)
    with ray_app.http() as http:
        seen = {http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": f"fresh {i}", "max_tokens": 2}
                          ).headers["x-gptserve-replica"] for i in range(12)}
    assert len(seen) == NUM_REPLICAS  # the new replica serves too
    deadline = time.monotonic() + 30  # engine stats reach the ingress every second
    while any(ray_app.metric(m) for m in ("gptserve_kv_blocks_used", "gptserve_num_requests_running",
                                          "gptserve_num_requests_waiting", "gptserve_queue_slots_in_use")):
        assert time.monotonic() < deadline, "KV blocks or queue slots still taken with no request in flight"
        time.sleep(0.5)
