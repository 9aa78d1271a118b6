"""Which LoRA adapters the engine knows, and which sit in the model's slots.

Known adapters are held in host memory by name (loaded from PEFT folders, checked against
the base model). The model has `max_loras` slots (model/lora.py's LoRAStack); a sequence
for an adapter takes its adapter's slot when it is admitted (loading the adapter into a
free slot, or into the least recently used slot no running sequence needs) and gives it
back when it is preempted or finishes. A sequence whose adapter can't have a slot now (all
busy) waits, as one waits for KV blocks.

Unloading an adapter forgets its name at once (new requests for it are refused) while the
sequences already running on it finish; its slot is reused once they have. Every loaded
adapter gets a `cache_key` of its own, the root of its sequences' prefix-cache hashes, so
two adapters (or an adapter reloaded with other weights) never share KV blocks.
"""
from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from dataclasses import dataclass

from gptserve.config import ModelConfig
from gptserve.engine.outputs import AdapterError, AdapterNotFoundError
from gptserve.model.lora import LoRAStack, LoRAWeights
from gptserve.weights.lora import LoRAError, read_lora

log = logging.getLogger(__name__)
_cache_keys = itertools.count(1)


@dataclass(eq=False)
class Adapter:
    name: str
    path: str
    weights: LoRAWeights
    cache_key: int  # the root of its sequences' prefix-cache hashes
    slot: int | None = None
    num_running: int = 0  # sequences holding its slot


class AdapterTable:
    def __init__(self, stack: LoRAStack, model_config: ModelConfig):
        self.stack = stack
        self.model_config = model_config
        self.adapters: dict[str, Adapter] = {}  # by name: the ones requests may ask for
        self.slots: list[Adapter | None] = [None] * stack.num_slots
        self.idle: OrderedDict[int, None] = OrderedDict((s, None) for s in range(stack.num_slots))  # LRU first
        self.loads = 0  # adapters put in a slot, since start

    # ---- names ---------------------------------------------------------------------------
    def add(self, name: str, path: str) -> Adapter:
        """Read and check the adapter at `path` and serve it as `name`; AdapterError when the
        name is taken or the adapter doesn't fit."""
        if name in self.adapters:
            raise AdapterError(f"an adapter named {name!r} is already loaded")
        try:
            weights = read_lora(path, self.model_config, self.stack.max_rank)
        except LoRAError as e:
            raise AdapterError(f"cannot load adapter {name!r} from {path}: {e}") from None
        adapter = Adapter(name, str(path), weights, next(_cache_keys))
        self.adapters[name] = adapter
        log.info("adapter %s loaded from %s (rank %d, %d layers, %.1f MiB)", name, path, weights.rank,
                 len(weights.layers), weights.nbytes() / 2**20)
        return adapter

    def remove(self, name: str) -> None:
        """Forget `name`: new requests for it are refused; running ones finish."""
        adapter = self.adapters.pop(name, None)
        if adapter is None:
            raise AdapterNotFoundError(name, list(self.adapters))
        if adapter.slot is not None and adapter.num_running == 0:
            self._empty(adapter.slot)
        log.info("adapter %s unloaded%s", name, f" ({adapter.num_running} sequences finishing on it)"
                 if adapter.num_running else "")

    def find(self, name: str) -> Adapter:
        """The loaded adapter `name`; AdapterNotFoundError when there is none."""
        if name not in self.adapters:
            raise AdapterNotFoundError(name, list(self.adapters))
        return self.adapters[name]

    def cache_key(self, name: str) -> int:
        return self.adapters[name].cache_key

    # ---- slots ---------------------------------------------------------------------------
    def acquire(self, adapter: Adapter) -> int | None:
        """A running sequence's hold on its adapter's slot: the slot (the adapter loaded into
        the least recently used idle one if it has none), or None when every slot is busy."""
        if adapter.slot is None:
            if not self.idle:
                return None
            slot, _ = self.idle.popitem(last=False)
            old = self.slots[slot]
            if old is not None:
                old.slot = None
            self.stack.load(slot, adapter.weights)
            self.slots[slot], adapter.slot = adapter, slot
            self.loads += 1
        elif adapter.num_running == 0:
            del self.idle[adapter.slot]
        adapter.num_running += 1
        return adapter.slot

    def release(self, adapter: Adapter) -> None:
        """A sequence stopped running on `adapter`: its slot is idle once no sequence needs it."""
        adapter.num_running -= 1
        if adapter.num_running == 0:
            if self.adapters.get(adapter.name) is adapter:
                self.idle[adapter.slot] = None  # most recently used
            else:  # unloaded while it ran
                self._empty(adapter.slot)

    def _empty(self, slot: int) -> None:
        self.slots[slot].slot = None
        self.slots[slot] = None
        self.stack.load(slot, None)
        self.idle[slot] = None
        self.idle.move_to_end(slot, last=False)  # first to be reused
