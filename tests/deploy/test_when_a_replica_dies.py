"""An engine replica killed under load: nothing that had not started streaming is lost,
a cut stream ends with an error event and [DONE], Serve replaces the replica, and the
survivor leaks nothing. (On the shared application, after the other tests: it ends with
2 replicas again.)"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx
import ray

from tests.deploy.conftest import API_KEY, NUM_REPLICAS, RayApp
from tests.server.conftest import MODEL_NAME

RECOVERY_S = 90  # Serve's health check and a new replica's start-up, with room on a slow machine


@dataclass
class Outcome:
    status: int | None = None
    replica: str = ""
    chunks: int = 0  # data events before the end
    error_event: bool = False
    done: bool = False
    failure: str = ""


async def stream_completion(http: httpx.AsyncClient, prompt: str, max_tokens: int = 200,
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


async def load_with_a_kill(app: RayApp) -> tuple[list[Outcome], list[Outcome]]:
    """More streams than the replicas run at once (some wait there, without output); one
    replica killed once a stream is under way on it; more requests right after the kill
    (some routed to the dead replica before the router knows). Returns the outcomes of
    those in flight and of those sent after."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=app.base_url, headers=headers, timeout=120) as http:
        victim = (await stream_completion(http, "which replica?", max_tokens=1)).replica
        actor = await asyncio.to_thread(replica_actor, victim)
        under_way = asyncio.Event()
        in_flight = [asyncio.create_task(stream_completion(http, f"story {i}: " * 8, on_replica=(victim, under_way)))
                     for i in range(24)]
        await asyncio.wait_for(under_way.wait(), 60)
        ray.kill(actor, no_restart=True)
        after = await asyncio.gather(*(stream_completion(http, f"after {i}: " * 6, max_tokens=8) for i in range(12)))
        return await asyncio.wait_for(asyncio.gather(*in_flight), 120), after


def test_a_killed_replica_loses_no_request_that_had_not_started_streaming(ray_app: RayApp):
    retried_before = ray_app.metric("gptserve_requests_retried_total")
    in_flight, after = asyncio.run(load_with_a_kill(ray_app))
    for outcome in in_flight + after:
        # never an HTTP error: a request refused before its stream began would be lost
        assert outcome.status == 200 and not outcome.failure, outcome
        assert outcome.done, f"a stream ended without [DONE]: {outcome}"
    cut = [o for o in in_flight if o.error_event]
    assert all(o.chunks > 0 for o in cut)  # only streams already under way are cut
    assert all(not o.error_event for o in after)  # those that had not started were sent again, or elsewhere
    retried = ray_app.metric("gptserve_requests_retried_total") - retried_before
    assert retried >= 1  # those waiting on the killed replica


def test_serve_replaces_the_killed_replica_and_the_survivors_leak_nothing(ray_app: RayApp):
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
