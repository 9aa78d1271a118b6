"""The ingress's view of its engine replicas: the ones its request router can reach, and
the stats each one last reported (Serve calls `EngineReplica.record_routing_stats` every
`stats_period_s` and hands the results to the routers of the deployment).

The router (router.py) registers itself here under its application's name; RemoteEngine
reads, for `stats()` (summed over the live replicas: /metrics) and for its own series
(retries, replicas reachable). The router's class reaches the ingress pickled by value,
with copies of its module's globals, so the registry lives here, in a module imported
by reference.
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import TYPE_CHECKING

from gptserve.engine.outputs import EngineStats

if TYPE_CHECKING:
    from ray.serve.request_router import RequestRouter

_routers: "weakref.WeakValueDictionary[str, RequestRouter]" = weakref.WeakValueDictionary()
STATS_FIELDS = tuple(f.name for f in dataclasses.fields(EngineStats))


def register(app_name: str, router: "RequestRouter") -> None:
    _routers[app_name] = router


def replica_stats(app_name: str) -> dict[str, EngineStats | None]:
    """Each reachable engine replica's latest stats (None until its first report), by name."""
    router = _routers.get(app_name)
    if router is None:
        return {}
    found: dict[str, EngineStats | None] = {}
    for replica_id, replica in list(router.curr_replicas.items()):
        reported = replica.routing_stats or {}
        name = reported.get("replica") or str(replica_id)
        found[name] = EngineStats(**{k: v for k, v in reported.items() if k in STATS_FIELDS}) if len(reported) > 1 else None
    return found


def sum_stats(parts: list[EngineStats]) -> EngineStats:
    """The fleet's stats (EngineStats.merge). A replica that is gone takes its counters with
    it (Prometheus reads the drop as a reset)."""
    return EngineStats.merge(parts)
