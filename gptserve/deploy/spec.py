"""What one Ray Serve application of gptserve is made of: the model, the engine and server
settings, how many engine replicas run and how they scale, and how requests reach them.

Built by the command line (`gptserve serve --ray`) or from `serve run`'s and a Serve
config file's `key=value` arguments, where every value may be a string: each key names a
field of `EngineConfig`, `ServerConfig`, `Scaling` or `Routing`, or is `model`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter

from gptserve.config import EngineConfig, ServerConfig, parse_bytes

BYTE_SIZES = ("kv_cache_memory", "max_body_bytes")  # may be written as 2GiB, 512MiB


@dataclass
class Scaling:
    """Engine replicas: a fixed number, or autoscaled between min and max on the requests
    each replica has ongoing (Ray Serve's autoscaler)."""

    num_replicas: int = 1
    min_replicas: int | None = None  # with max_replicas: autoscale
    max_replicas: int | None = None
    target_ongoing_requests: float = 8.0  # per replica, what the autoscaler aims for
    num_cpus: float = 1.0  # Ray resources of one engine replica
    num_gpus: float = 0.0
    graceful_shutdown_timeout_s: float = 60.0  # a replica scaled down finishes its requests first
    ingress_replicas: int = 1  # replicas of the HTTP front (each keeps its own stored responses)
    ingress_num_cpus: float = 0.0  # light work (HTTP, tokenizing): fits beside replicas that take every CPU

    @property
    def autoscaled(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    @property
    def most_replicas(self) -> int:
        return (self.max_replicas or self.min_replicas or 1) if self.autoscaled else self.num_replicas

    def check(self) -> None:
        low, high = self.min_replicas, self.max_replicas
        if self.autoscaled and (low is None or high is None or not 0 <= low <= high or high < 1):
            raise ValueError(f"autoscaling needs 0 <= min_replicas <= max_replicas and max_replicas >= 1, "
                             f"got {low}:{high}")
        if not self.autoscaled and self.num_replicas < 1:
            raise ValueError(f"num_replicas must be at least 1, got {self.num_replicas}")
        if self.ingress_replicas < 1:
            raise ValueError(f"ingress_replicas must be at least 1, got {self.ingress_replicas}")


@dataclass
class Routing:
    """How the router picks an engine replica (router.py)."""

    prefix_affinity: bool = True  # off: power of two choices
    max_imbalance: int = 8  # the affine replica may have this many more ongoing requests than the least loaded
    max_prefix_blocks: int = 64  # leading KV blocks of a prompt the router hashes
    min_prefix_match: float = 0.25  # share of those blocks a replica must hold to attract the request


@dataclass
class AppSpec:
    model: str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    scaling: Scaling = field(default_factory=Scaling)
    routing: Routing = field(default_factory=Routing)

    def replica_server_config(self) -> ServerConfig:
        """The ingress's settings: its queue holds what all engine replicas together may hold
        (--max-queued-requests is per engine replica)."""
        return dataclasses.replace(self.server, max_queued_requests=self.server.max_queued_requests
                                   * self.scaling.most_replicas)


SECTIONS = {"engine": EngineConfig, "server": ServerConfig, "scaling": Scaling, "routing": Routing}


def spec_from_args(args: dict[str, Any]) -> AppSpec:
    """An AppSpec from `key=value` arguments; unknown keys and bad values raise ValueError."""
    fields: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    model = None
    for key, value in args.items():
        if key == "model":
            model = str(value) if value not in (None, "") else None
            continue
        section = next((name for name, cls in SECTIONS.items()
                        if key in {f.name for f in dataclasses.fields(cls)}), None)
        if section is None:
            known = sorted({f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)} | {"model"})
            raise ValueError(f"unknown argument {key!r}; known: {', '.join(known)}")
        if key in BYTE_SIZES and isinstance(value, str):
            value = parse_bytes(value)
        fields[section][key] = value
    parts = {}
    for name, cls in SECTIONS.items():
        try:
            parts[name] = TypeAdapter(cls).validate_python(fields[name])
        except Exception as e:  # noqa: BLE001 - pydantic's message names the field
            raise ValueError(f"bad {name} argument: {e}") from None
    spec = AppSpec(model=model, **parts)
    spec.scaling.check()
    return spec
