"""The request router of the engine deployment: a request goes to the replica most
likely to hold its prompt's prefix in its KV cache, unless that one is too busy.

Which replica holds which prefix is learned from the router's own decisions: each routed
prompt's leading full KV blocks are hashed as the engine's prefix cache hashes them
(`chained_block_hashes`, chained from the first block), and each hash remembers the replica it
went to (a bounded LRU table). A new prompt goes to the live replica that took the
deepest of its leading blocks, if that depth is at least `min_prefix_match` of the prompt's
full blocks and that replica has at most `max_imbalance` more ongoing requests than the
least loaded one; otherwise to the least loaded replica (ties broken at random), and
from then on its prefix lives there. Load is Serve's count of each replica's ongoing
requests. Should the chosen replica refuse (its max_ongoing_requests reached), Serve
tries the next. With affinity off, and for calls other than generate: power of two
choices (two replicas at random, the less loaded first).

Serve builds the router in each process that holds a handle to the deployment (the
ingress), with `initialize_state(**request_router_kwargs)`.
"""
from __future__ import annotations

import random
from collections import OrderedDict
from typing import Hashable

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

import gptserve.deploy.fleet as fleet
from gptserve.engine.block_manager import chained_block_hashes


def prefix_hashes(prompt_token_ids: list[int], block_size: int, max_blocks: int,
                  adapter: str | None = None) -> list[int]:
    """The chained hashes of the prompt's leading full blocks, as the prefix cache computes
    them (never the block of the last token: the engine always recomputes it); a LoRA
    adapter's requests hash from a root of their own, as their KV blocks are their own."""
    num_blocks = min((len(prompt_token_ids) - 1) // block_size, max_blocks)
    root = None if adapter is None else hash(("lora", adapter))
    return [h for h, _ in chained_block_hashes(prompt_token_ids, block_size, num_blocks, parent=root)]


class PrefixTable:
    """Which replica each prefix block hash was sent to, the least recently used forgotten first."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.owner: OrderedDict[int, Hashable] = OrderedDict()

    def longest_match(self, hashes: list[int], alive: set) -> tuple[Hashable | None, int]:
        """The live replica that took the deepest of these leading blocks, and that depth: a
        chained hash found at depth d means that replica computed all d blocks before it."""
        best, depth = None, 0
        for i, h in enumerate(hashes):
            replica = self.owner.get(h)
            if replica is None:
                break  # no prompt routed here went further
            if replica in alive:
                best, depth = replica, i + 1
        return best, depth

    def record(self, hashes: list[int], replica: Hashable) -> None:
        for h in hashes:
            self.owner[h] = replica
            self.owner.move_to_end(h)
        while len(self.owner) > self.capacity:
            self.owner.popitem(last=False)


def pick_affine(affine: Hashable | None, matched: int, total: int, loads: dict[Hashable, int],
                min_prefix_match: float, max_imbalance: int) -> Hashable | None:
    """The affine replica, if its match is long enough and it is not too busy; else None."""
    if affine is None or total == 0 or matched < min_prefix_match * total:
        return None
    return affine if loads[affine] - min(loads.values()) <= max_imbalance else None


class PrefixAffinityRouter(RequestRouter):
    def initialize_state(self, block_size: int = 16, prefix_affinity: bool = True, max_imbalance: int = 8,
                         max_prefix_blocks: int = 64, min_prefix_match: float = 0.25,
                         table_size: int = 1 << 18) -> None:
        self.block_size, self.prefix_affinity = block_size, prefix_affinity
        self.max_imbalance, self.max_prefix_blocks = max_imbalance, max_prefix_blocks
        self.min_prefix_match = min_prefix_match
        self.table = PrefixTable(table_size)
        fleet.register(self.app_name, self)

    def _prompt_hashes(self, pending: PendingRequest | None) -> list[int] | None:
        if pending is None or pending.metadata.call_method != "generate" or not pending.args:
            return None
        params = pending.args[1] if len(pending.args) > 1 else None
        return prefix_hashes(pending.args[0], self.block_size, self.max_prefix_blocks, getattr(params, "adapter", None))

    def _load(self, replica_id: ReplicaID) -> int:
        """Ongoing requests as last seen (Serve's queue-length cache; unknown counts as idle)."""
        return self.replica_queue_len_cache.get(replica_id) or 0

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """Replicas in the order to try them, one a rank: Serve sends the request to the
        first that accepts it (below its max_ongoing_requests), else sleeps and asks again."""
        if not candidate_replicas:
            return []
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # all full: sleep between rounds
        hashes = self._prompt_hashes(pending_request) if self.prefix_affinity else None
        if hashes is None:  # power of two choices
            return self._by_load(random.sample(candidate_replicas, min(2, len(candidate_replicas))))
        ranked = self._by_load(candidate_replicas)
        affine, matched = self.table.longest_match(hashes, {r.replica_id for r in candidate_replicas})
        loads = {r.replica_id: self._load(r.replica_id) for r in candidate_replicas}
        chosen = pick_affine(affine, matched, len(hashes), loads, self.min_prefix_match, self.max_imbalance)
        if chosen is not None:
            ranked.sort(key=lambda rank: rank[0].replica_id != chosen)  # stable: the rest stay by load
        return ranked

    def _by_load(self, replicas: list[RunningReplica]) -> list[list[RunningReplica]]:
        """Least loaded first, ties in random order."""
        keyed = [(self._load(r.replica_id), random.random(), r) for r in replicas]
        return [[r] for _, _, r in sorted(keyed, key=lambda k: k[:2])]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        hashes = self._prompt_hashes(pending_request) if self.prefix_affinity else None
        if hashes:
            self.table.record(hashes, replica_id)
