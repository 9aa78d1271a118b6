"""Proposers: what makes the guesses of speculative decoding (speculative.py).

- `NgramProposer` (prompt lookup): find the latest earlier place where the sequence's last
  n tokens occur (n from ngram_max down to ngram_min) and propose what followed. Free.
- `DraftProposer`: a small GPT-2 of the same vocabulary, with its own paged KV pool and
  block manager, decodes k tokens greedily on the engine thread.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from gptserve.config import ModelConfig, SpeculativeConfig
from gptserve.engine.block_manager import BlockManager
from gptserve.engine.model_runner import ModelRunner
from gptserve.engine.outputs import EngineError
from gptserve.engine.sampler import Sampler
from gptserve.engine.sampling_params import SamplingParams
from gptserve.engine.scheduler import ScheduledBatch
from gptserve.engine.sequence import Sequence
from gptserve.model.attention import KVPool

log = logging.getLogger(__name__)

# beside a draft checkpoint, optional: {"token_ids": [...]}, the only tokens it may guess
# (those of its training corpus; scripts/train_default_model.py writes it)
DRAFT_VOCAB_FILE = "draft_vocab.json"


class SpeculativeError(EngineError, ValueError):
    """A draft model that can't draft for this model."""


class NgramProposer:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the
    sequence's last n tokens."""

    method = "ngram"

    def __init__(self, config: SpeculativeConfig):
        self.min_n, self.max_n = config.ngram_min, config.ngram_max

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        return [self._lookup(seq.token_ids, k) for seq, k in zip(seqs, ks)]

    def _lookup(self, tokens: list[int], k: int) -> list[int]:
        length = len(tokens)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            suffix = tokens[length - n:]
            first = suffix[0]
            for i in range(length - n - 1, -1, -1):  # latest match first
                if tokens[i] == first and tokens[i:i + n] == suffix:
                    return tokens[i + n:i + n + k]
        return []

    def release(self, seq: Sequence) -> None:
        """Nothing is kept per sequence."""


class DraftProposer:
    """A small model of the same vocabulary decodes each sequence's next k tokens greedily.

    It keeps its own view of each sequence (a shadow `Sequence` in its own KV pool), in
    step with the target's tokens: after a verify, the shadow keeps the K/V of its tokens
    that the target kept and recomputes from the first one it did not.
    """

    method = "draft"

    def __init__(self, model, target: ModelConfig, vocab_size: int, num_blocks: int, block_size: int,
                 max_model_len: int, draft_vocab: list[int] | None = None):
        mc = model.config
        if mc.vocab_size != target.vocab_size:
            raise SpeculativeError(f"the draft model's vocabulary ({mc.vocab_size} tokens) is not the target's "
                             f"({target.vocab_size})")
        self.model = model
        self.max_len = min(mc.n_positions, max_model_len)
        dtype = next(model.parameters()).dtype
        self.pool = KVPool(mc.n_layer, num_blocks, block_size, mc.n_head, mc.head_dim, dtype, model.device)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.runner = ModelRunner(model, self.pool, Sampler(mc.vocab_size, model.device), self.max_len)
        # the LM head, restricted to the tokens the draft was trained on where it says which
        # (a guess is a single token, so leaving the others out changes no output, only speed)
        self.vocab = torch.tensor(draft_vocab, device=model.device) if draft_vocab else None
        # (and to the tokenizer's vocabulary: a padded embedding's extra rows are no tokens)
        self.head = model.wte.weight[:vocab_size] if draft_vocab is None else model.wte.weight[self.vocab].contiguous()
        self.shadows: dict[int, Sequence] = {}  # target seq_id -> the draft's view of it
        self.synced: dict[int, int] = {}  # target seq_id -> tokens known equal to the target's
        self.params = SamplingParams(temperature=0.0)
        log.info("draft model: n_embd %d, n_layer %d, %d KV blocks (%.0f MiB)", mc.n_embd, mc.n_layer,
                 num_blocks, num_blocks * KVPool.bytes_per_block(mc.n_layer, block_size, mc.n_head,
                                                                 mc.head_dim, dtype) / 2**20)

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        want: dict[int, int] = {}  # shadow seq_id -> guesses wanted
        by_target: dict[int, Sequence] = {}
        prefills: list[tuple[Sequence, int]] = []
        for seq, k in zip(seqs, ks):
            k = min(k, self.max_len - len(seq) + 1)  # the last guess is read at position len + k - 2
            shadow = self._sync(seq, k) if k > 0 else None
            if shadow is None:
                continue
            want[shadow.seq_id] = k
            by_target[seq.seq_id] = shadow
            prefills.append((shadow, len(shadow) - shadow.num_computed_tokens))
        guesses: dict[int, list[int]] = {sid: [] for sid in want}
        batch = ScheduledBatch(prefills=prefills)
        while batch:
            sampled, tokens = batch.due, self._greedy(batch)
            for shadow, n in batch.computed:
                shadow.num_computed_tokens += n
            for shadow, token in zip(sampled, tokens):
                shadow.token_ids.append(token)
                guesses[shadow.seq_id].append(token)
            batch = ScheduledBatch(decodes=[s for s in sampled if len(guesses[s.seq_id]) < want[s.seq_id]])
        return [guesses[by_target[seq.seq_id].seq_id] if seq.seq_id in by_target else [] for seq in seqs]

    @torch.inference_mode()
    def _greedy(self, batch: ScheduledBatch) -> list[int]:
        """The draft's most likely next token of each due row."""
        best = (self.runner.due_hidden(batch) @ self.head.T).argmax(-1)
        return (best if self.vocab is None else self.vocab[best]).tolist()

    def _sync(self, seq: Sequence, k: int) -> Sequence | None:
        """The shadow of seq, holding seq's tokens, with blocks for k - 1 more (None: no room)."""
        bm = self.block_manager
        shadow = self.shadows.get(seq.seq_id)
        if shadow is None:
            shadow = Sequence(seq.request_id, seq.index, [], self.params)
            self.shadows[seq.seq_id] = shadow
            self.synced[seq.seq_id] = 0
        same = self.synced[seq.seq_id]  # the tokens before this are the target's already
        limit = min(shadow.num_computed_tokens, len(seq))
        while same < limit and shadow.token_ids[same] == seq.token_ids[same]:
            same += 1
        shadow.token_ids = list(seq.token_ids)
        shadow.num_computed_tokens = min(shadow.num_computed_tokens, same, len(seq) - 1)  # the last token's row guesses
        self.synced[seq.seq_id] = len(seq)
        if not bm.can_append(shadow, extra=k - 1):
            return None
        bm.append_slots(shadow, extra=k - 1)
        return shadow

    def release(self, seq: Sequence) -> None:
        """seq has finished: its shadow's blocks go back to the draft's pool."""
        shadow = self.shadows.pop(seq.seq_id, None)
        self.synced.pop(seq.seq_id, None)
        if shadow is not None:
            self.block_manager.free_seq(shadow)


def build_proposer(config: SpeculativeConfig, target: ModelConfig, vocab_size: int, device: torch.device,
                   dtype: torch.dtype, num_blocks: int, block_size: int, max_model_len: int
                   ) -> NgramProposer | DraftProposer:
    """`vocab_size`: the tokens a guess may be (the engine's vocabulary)."""
    if config.method == "ngram":
        return NgramProposer(config)
    from gptserve.weights.loader import DEFAULT_DRAFT_DIR, load_model, resolve_model_path
    path = resolve_model_path(config.draft_model) if config.draft_model else DEFAULT_DRAFT_DIR
    # a small draft runs in float32 on a CPU (its matmuls are too small for 16-bit to pay)
    model = load_model(path, device, torch.float32 if device.type == "cpu" else dtype)
    vocab_file = Path(path) / DRAFT_VOCAB_FILE
    draft_vocab = json.loads(vocab_file.read_text())["token_ids"] if vocab_file.exists() else None
    return DraftProposer(model, target, vocab_size, num_blocks, block_size, max_model_len, draft_vocab)
