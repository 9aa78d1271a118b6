"""Prefix affinity on the running application: requests that share a long prefix stay on
the replica that holds it, and find it in that replica's prefix cache."""
from __future__ import annotations

import asyncio

from tests.deploy.conftest import RayApp
from tests.server.conftest import MODEL_NAME

SYSTEM = "You are a helpful assistant for the city library. " * 6  # ~60 tokens: several KV blocks


def test_a_repeated_prefix_stays_on_one_replica_and_hits_its_cache(ray_app: RayApp):
    with ray_app.http() as http:
        answers = [http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": f"{SYSTEM}Question {i}?",
                                                      "max_tokens": 2}) for i in range(6)]
    assert len({a.headers["x-gptserve-replica"] for a in answers}) == 1
    cached = [a.json()["usage"]["prompt_tokens_details"]["cached_tokens"] for a in answers]
    assert cached[0] == 0 and all(c >= 48 for c in cached[1:])  # 3 or more full blocks of 16


def test_concurrent_requests_with_one_prefix_stay_together(ray_app: RayApp):
    async def send_all() -> set[str]:
        client = ray_app.async_client()
        other = "A different preamble about astronomy and the night sky. " * 6
        first = await client.completions.with_raw_response.create(model=MODEL_NAME, prompt=other + "Q0?",
                                                                  max_tokens=2)
        rest = await asyncio.gather(*(client.completions.with_raw_response.create(
            model=MODEL_NAME, prompt=f"{other}Q{i}?", max_tokens=2) for i in range(1, 6)))
        return {r.headers["x-gptserve-replica"] for r in [first, *rest]}

    assert len(asyncio.run(send_all())) == 1  # fewer in flight than the imbalance bound (8)
