"""The prefix-affinity router's decisions, without a cluster: prompts hashed as the
engine's prefix cache hashes them, a repeated prefix kept on its replica, the least
loaded replica when that one is too busy or the prefix is new, two random choices when
affinity is off."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

pytest.importorskip("ray")
from ray.serve._private.common import DeploymentHandleSource, DeploymentID  # noqa: E402

from gptserve.config import EngineConfig  # noqa: E402
from gptserve.deploy.router import PrefixAffinityRouter, PrefixTable, pick_affine, prefix_hashes  # noqa: E402
from gptserve.engine.llm_engine import LLMEngine  # noqa: E402
from gptserve.engine.sampling_params import SamplingParams  # noqa: E402

BLOCK = 4


@dataclass(frozen=True)
class FakeReplica:
    replica_id: str
    max_ongoing_requests: int = 100


def make_router(**kwargs) -> PrefixAffinityRouter:
    router = PrefixAffinityRouter(deployment_id=DeploymentID(name="GptServeEngine", app_name="test-router"),
                                  handle_source=DeploymentHandleSource.UNKNOWN)
    router.initialize_state(block_size=BLOCK, **kwargs)
    return router


def request(prompt: list[int], method: str = "generate") -> SimpleNamespace:
    return SimpleNamespace(args=[prompt], metadata=SimpleNamespace(call_method=method),
                           routing_context=SimpleNamespace(should_backoff=False))


def route(router: PrefixAffinityRouter, replicas: list[FakeReplica], prompt: list[int]) -> str:
    """The first choice, recorded as routed there (as Serve does once it sends it)."""
    pending = request(prompt)
    ranks = asyncio.run(router.choose_replicas(replicas, pending))
    chosen = ranks[0][0].replica_id
    router.on_request_routed(pending, chosen, None)
    return chosen


def test_prompts_are_hashed_as_the_prefix_cache_hashes_them(tiny_checkpoint):
    engine = LLMEngine(str(tiny_checkpoint), EngineConfig(device="cpu", dtype="float32", block_size=BLOCK,
                                                          kv_cache_memory=2**20, enforce_eager=True))
    prompt = list(range(100, 119))  # 4 full blocks and 3 tokens
    engine.generate([prompt], SamplingParams(max_tokens=1))
    cached = set(engine.block_manager.cached)
    assert set(prefix_hashes(prompt, BLOCK, max_blocks=64)) <= cached
    assert len(prefix_hashes(prompt, BLOCK, max_blocks=64)) == 4
    assert len(prefix_hashes(prompt, BLOCK, max_blocks=2)) == 2


def test_a_lora_adapters_prompts_hash_apart_from_the_models():
    prompt = list(range(100, 119))
    base, adapter = prefix_hashes(prompt, BLOCK, 64), prefix_hashes(prompt, BLOCK, 64, adapter="sql")
    assert len(adapter) == len(base) and not set(adapter) & set(base)
    assert adapter == prefix_hashes(prompt, BLOCK, 64, adapter="sql")
    assert not set(adapter) & set(prefix_hashes(prompt, BLOCK, 64, adapter="poet"))


def test_the_last_token_is_never_in_a_hashed_block():
    assert prefix_hashes(list(range(8)), BLOCK, 64) == prefix_hashes(list(range(7)), BLOCK, 64)[:1]


def test_the_table_finds_the_deepest_live_holder_and_forgets_the_oldest():
    table = PrefixTable(capacity=3)
    table.record([1, 2, 3], "a")
    table.record([1], "b")  # a later prompt sharing one block went to b
    assert table.longest_match([1, 2, 3, 4], {"a", "b"}) == ("a", 3)
    assert table.longest_match([1, 2, 3], {"b"}) == ("b", 1)  # a is gone
    table.record([7], "b")
    assert list(table.owner) == [3, 1, 7]  # 2, the least recently recorded, went first


def test_the_affine_replica_loses_its_request_past_the_imbalance_bound():
    loads = {"a": 9, "b": 1}
    assert pick_affine("a", 4, 4, loads, min_prefix_match=0.25, max_imbalance=8) == "a"
    assert pick_affine("a", 4, 4, {"a": 10, "b": 1}, min_prefix_match=0.25, max_imbalance=8) is None
    assert pick_affine("a", 1, 8, loads, min_prefix_match=0.25, max_imbalance=8) is None  # too short a match


def test_a_repeated_prefix_stays_on_the_replica_that_took_it_first():
    router, replicas = make_router(), [FakeReplica("a"), FakeReplica("b"), FakeReplica("c")]
    system = list(range(1000, 1032))  # 8 blocks
    first = route(router, replicas, system + [1, 2, 3])
    assert all(route(router, replicas, system + [i, i + 1]) == first for i in range(10))


def test_a_busy_affine_replica_sends_the_request_to_the_least_loaded():
    router, replicas = make_router(max_imbalance=2), [FakeReplica("a"), FakeReplica("b")]
    system = list(range(1000, 1032))
    first = route(router, replicas, system + [1])
    other = "b" if first == "a" else "a"
    router.replica_queue_len_cache.update(first, 3)
    router.replica_queue_len_cache.update(other, 0)
    assert route(router, replicas, system + [2]) == other


def test_new_prefixes_go_to_the_least_loaded_replica():
    router, replicas = make_router(), [FakeReplica("a"), FakeReplica("b")]
    router.replica_queue_len_cache.update("a", 5)
    router.replica_queue_len_cache.update("b", 1)
    assert {route(router, replicas, list(range(k, k + 20))) for k in range(0, 2000, 100)} == {"b"}


def test_without_affinity_two_replicas_are_drawn_less_loaded_first():
    router, replicas = make_router(prefix_affinity=False), [FakeReplica(x) for x in "abcd"]
    router.replica_queue_len_cache.update("a", 7)
    for _ in range(20):
        ranks = asyncio.run(router.choose_replicas(replicas, request(list(range(40)))))
        assert len(ranks) == 2
        if "a" in (ranks[0][0].replica_id, ranks[1][0].replica_id):
            assert ranks[1][0].replica_id == "a"


def test_calls_other_than_generate_are_routed_by_load():
    router, replicas = make_router(), [FakeReplica("a"), FakeReplica("b"), FakeReplica("c")]
    ranks = asyncio.run(router.choose_replicas(replicas, request([[1, 2, 3]], method="embed")))
    assert len(ranks) == 2
