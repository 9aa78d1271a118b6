"""Who runs this step: decodes first, then prefill chunks, under a token budget.

Every step: each running sequence that is decoding gets one token; sequences still
prefilling get a chunk; then waiting sequences are admitted, oldest first, while they
fit in free KV blocks, the token budget and max_num_seqs. Last, decodes that carry
speculative guesses (engine/speculative.py) get rows for them out of what budget and
blocks are left, and become verifies. A sequence for a LoRA adapter is admitted only with a
slot for its adapter (engine/lora.py); one that can't have one yet keeps its place in the
queue while those behind it go ahead. When a decode has no room to
grow, the newest running sequence is preempted: its blocks are freed and it goes back
to the front of the queue, to be recomputed later.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from functools import cached_property

from gptserve.engine.block_manager import BlockManager
from gptserve.engine.lora import AdapterTable
from gptserve.engine.sequence import Sequence, SequenceStatus, VerifyRow


@dataclass
class ScheduledBatch:
    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (seq, chunk length)
    verifies: list[Sequence] = field(default_factory=list)  # decodes with speculative guesses

    @cached_property
    def due(self) -> list[Sequence | VerifyRow]:
        """The rows whose next token this step samples, in the batch's row order: every
        decode, every row of each verify (its last token and each guess), and each
        prefill whose chunk completes its sequence."""
        rows: list[Sequence | VerifyRow] = list(self.decodes)
        for seq in self.verifies:
            rows.extend(VerifyRow.rows_of(seq))
        return rows + [seq for seq, n in self.prefills if seq.is_due_after(n)]

    @property
    def scored(self) -> list[Sequence]:
        """The prompt-only sequences (max_tokens 0) whose chunk completes their prompt: done
        after this step, with nothing sampled."""
        return [seq for seq, n in self.prefills if seq.scores_only and seq.is_read_after(n)]

    @property
    def computed(self) -> list[tuple[Sequence, int]]:
        """Each decode and prefill with the tokens this step puts in the cache (a verify's
        count is known only after its rows are sampled)."""
        return [(seq, 1) for seq in self.decodes] + self.prefills

    @property
    def num_tokens(self) -> int:
        return (len(self.decodes) + sum(1 + len(s.guesses) for s in self.verifies)
                + sum(n for _, n in self.prefills))

    def __bool__(self) -> bool:
        return bool(self.decodes or self.verifies or self.prefills)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 adapters: AdapterTable | None = None):
        self.block_manager = block_manager
        self.adapters = adapters
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is the newest
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_next(self, seqs: list[Sequence]) -> None:
        """Queue seqs ahead of everything waiting (n > 1 siblings, once their prompt is cached)."""
        self.waiting.extendleft(reversed(seqs))

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        bm = self.block_manager
        # 1. running sequences: decode tokens first, preempting the newest when out of blocks
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or seq.is_prefill:
                continue
            while not bm.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                bm.append_slots(seq)
                batch.decodes.append(seq)
                budget -= 1
        # 2. running sequences part-way through their prefill
        for seq in self.running:
            if budget <= 0:
                break
            if seq.is_prefill:
                n = min(seq.num_uncomputed_tokens, budget)
                batch.prefills.append((seq, n))
                budget -= n
        # 3. admit waiting sequences while they fit
        no_adapter_slot: list[Sequence] = []  # their adapter must wait for a slot: they keep their place
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self._take_adapter_slot(seq):
                no_adapter_slot.append(self.waiting.popleft())
                continue
            if not bm.allocate(seq):
                self._give_adapter_slot(seq)
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            batch.prefills.append((seq, n))
            budget -= n
        self.waiting.extendleft(reversed(no_adapter_slot))
        # 4. speculative guesses of the decodes take what budget and blocks are left: a guess
        #    never holds back a prefill or an admission, nor preempts anyone
        if any(seq.guesses for seq in batch.decodes):
            self._schedule_guesses(batch, budget)
        return batch

    def _schedule_guesses(self, batch: ScheduledBatch, budget: int) -> None:
        decodes, batch.decodes = batch.decodes, []
        for seq in decodes:
            k = min(len(seq.guesses), max(budget, 0))
            if k and self.block_manager.can_append(seq, k):
                seq.decoding.keep_guesses(k)
                self.block_manager.append_slots(seq, k)
                batch.verifies.append(seq)
                budget -= k
            else:
                seq.decoding.keep_guesses(0)
                batch.decodes.append(seq)

    def _take_adapter_slot(self, seq: Sequence) -> bool:
        """seq's hold on its LoRA adapter's slot (seq.lora_slot); False while every slot is busy."""
        if seq.adapter is None:
            return True
        slot = self.adapters.acquire(seq.adapter)
        seq.lora_slot = -1 if slot is None else slot
        return slot is not None

    def _give_adapter_slot(self, seq: Sequence) -> None:
        if seq.lora_slot >= 0:
            self.adapters.release(seq.adapter)
            seq.lora_slot = -1

    def _release(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free_seq(seq)
        self._give_adapter_slot(seq)

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        if seq.decoding is not None:
            seq.decoding.keep_guesses(0)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence, wherever it is."""
        if seq in self.running:
            self._release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
