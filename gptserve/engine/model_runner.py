"""Turn a scheduled batch into tensors, run the model once, and sample.

The flat batch holds the decode tokens first (one per sequence), then each verify (a
sequence's last token and its speculative guesses, engine/speculative.py), then each
prefill chunk. Only rows whose next token is due are projected to the vocabulary: every
decode row, every verify row, and the last row of a chunk that completes its sequence's
prompt.
On CUDA, decode-only steps replay a CUDA graph captured for the padded batch size; on the
CPU they run in one compiled call (model/cpu_decode.py). When a row's sequence has a LoRA
adapter, the step passes every row's adapter slot to the model (model/lora.py); CUDA graphs
are captured without adapters, so such a step runs eagerly there.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future

import torch

from gptserve.engine.cuda_graphs import DecodeGraphs
from gptserve.engine.outputs import Explanation, Inspection, Logprob
from gptserve.engine.sampler import Sampler, SamplerOutput, floored
from gptserve.engine.scheduler import ScheduledBatch
from gptserve.engine.sequence import Sequence
from gptserve.model.attention import DenseAttention, KVPool, PagedAttention, PagedMetadata, PrefillSpan
from gptserve.model.cpu_decode import CpuDecode
from gptserve.model.gpt2 import GPT2
from gptserve.model.lora import LoRABatch, LoRAStack

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: GPT2, pool: KVPool, sampler: Sampler, max_model_len: int,
                 graph_batch_sizes: tuple[int, ...] = (), lora: LoRAStack | None = None):
        self.model = model
        self.lora = lora
        self.pool = pool
        self.sampler = sampler
        self.device = model.device
        self.pin = self.device.type == "cuda"  # step inputs: pinned host memory, copied without a sync
        self.block_size = pool.block_size
        self.max_blocks = -(-max_model_len // pool.block_size)
        # decode-only steps' fast path (none with enforce_eager, which passes no sizes)
        self.graphs: DecodeGraphs | CpuDecode | None = None
        if self.device.type == "cuda" and graph_batch_sizes:
            self.graphs = DecodeGraphs(model, pool, self.max_blocks, graph_batch_sizes)
        elif self.device.type == "cpu" and graph_batch_sizes:
            self.graphs = CpuDecode.build(model, pool, lora)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, masks: Future | None = None) -> tuple[list, SamplerOutput]:
        """Run one step; return the rows that get a token (batch.due), and their tokens.
        `masks`: the grammar masks of those rows, being filled while the model runs."""
        hidden = self.due_hidden(batch)
        sampled = batch.due
        if not sampled:  # prompt chunks only (scored, or not yet complete): nothing to project or sample
            return sampled, SamplerOutput([], [])
        logits = self.model.logits(hidden)  # (S, V)
        return sampled, self.sampler(logits, sampled, None if masks is None else masks.result())

    @torch.inference_mode()
    def due_hidden(self, batch: ScheduledBatch) -> torch.Tensor:
        """Run the model over the batch; the final hidden states of batch.due's rows (S, C)."""
        decode_only = not batch.prefills and not batch.verifies
        lora = self._lora_batch(batch)
        if self.graphs is not None and decode_only and self.graphs.fits(len(batch.decodes), lora is not None):
            hidden = self.graphs.run(self._decode_inputs(batch.decodes), lora)
            return hidden[:len(batch.decodes)]
        hidden, rows = self._run_eager(batch, lora)
        return hidden[rows]

    def _lora_batch(self, batch: ScheduledBatch) -> LoRABatch | None:
        """Each row's adapter slot, in the flat batch's order; None when no row has an adapter."""
        if self.lora is None:
            return None
        slots = [s.lora_slot for s in batch.decodes]
        for seq in batch.verifies:
            slots += [seq.lora_slot] * (1 + len(seq.guesses))
        for seq, n in batch.prefills:
            slots += [seq.lora_slot] * n
        if max(slots, default=-1) < 0:
            return None
        return LoRABatch(self.lora, self._to_device(torch.tensor(slots)))

    def _decode_inputs(self, seqs: list[Sequence]) -> dict[str, torch.Tensor]:
        bs = self.block_size
        positions = [len(s) - 1 for s in seqs]
        width = max(len(s.block_table) for s in seqs)
        host = self._host
        return {
            "input_ids": host([s.token_ids[-1] for s in seqs]),
            "positions": host(positions),
            "slot_mapping": host([s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, positions)]),
            "block_tables": host([s.block_table + [0] * (width - len(s.block_table)) for s in seqs]),  # zero-padded
            "context_lens": host([len(s) for s in seqs]),
        }

    def _host(self, data: list) -> torch.Tensor:
        return torch.tensor(data, pin_memory=self.pin)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor on the model's device; from pinned memory on CUDA, so the copy is
        asynchronous (non_blocking from pageable memory would wait for it)."""
        if self.pin and not t.is_pinned():
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def _run_eager(self, batch: ScheduledBatch, lora: LoRABatch | None):
        bs = self.block_size
        ids, pos, slots = [], [], []
        meta = PagedMetadata(slot_mapping=None)  # filled below
        rows: list[int] = []
        if batch.decodes:
            d = self._decode_inputs(batch.decodes)
            ids.append(d["input_ids"]), pos.append(d["positions"]), slots.append(d["slot_mapping"])
            meta.num_decode = len(batch.decodes)
            meta.decode_block_tables = self._to_device(d["block_tables"])
            meta.decode_context_lens = self._to_device(d["context_lens"])
            meta.decode_max_blocks = d["block_tables"].shape[1]
            rows.extend(range(len(batch.decodes)))
        start = len(batch.decodes)


        def span(seq: Sequence, first: int, tokens: list[int]) -> None:
            """seq's `tokens` at positions first.. as one chunk attending to its cached past."""
            n = len(tokens)
            p = torch.arange(first, first + n)
            table = torch.tensor(seq.block_table)
            ids.append(torch.tensor(tokens))
            pos.append(p)
            slots.append(table[p // bs] * bs + p % bs)
            meta.prefills.append(PrefillSpan(start, start + n, first + n, self._to_device(table)))

        for seq in batch.verifies:  # the last token and the guesses, every row due
            n = 1 + len(seq.guesses)
            span(seq, len(seq) - 1, [seq.token_ids[-1]] + seq.guesses)
            rows.extend(range(start, start + n))
            start += n
        logprob_spans: list[tuple[Sequence, int, int]] = []
        for seq, n in batch.prefills:
            first = seq.num_computed_tokens
            span(seq, first, seq.token_ids[first:first + n])
            if seq.prompt_logprobs is not None and first < seq.num_prompt_tokens:
                logprob_spans.append((seq, start, n))
            if seq.is_due_after(n):  # the chunk completes a sequence that generates: its next token is due
                rows.append(start + n - 1)
            start += n
        meta.slot_mapping = self._to_device(torch.cat(slots))
        input_ids = self._to_device(torch.cat(ids))
        positions = self._to_device(torch.cat(pos))
        hidden = self.model(input_ids, positions, PagedAttention(self.pool, meta), lora)
        for seq, s, n in logprob_spans:
            self._prompt_logprobs(seq, hidden[s:s + n], input_ids[s:s + n])
        return hidden, rows

    def _prompt_logprobs(self, seq: Sequence, hidden: torch.Tensor, chunk_ids: torch.Tensor) -> None:
        """Logprob of each prompt token given what precedes it (completions' echo + logprobs),
        for the tokens this chunk predicts that have none yet: a prefill recomputed after
        preemption predicts tokens it already scored."""
        first = seq.num_computed_tokens  # row i of the chunk predicts token first + i + 1
        start = max(len(seq.prompt_logprobs), first + 1)
        end = min(first + len(chunk_ids) + 1, seq.num_prompt_tokens)
        targets = seq.token_ids[start:end]
        if not targets:
            return
        lp = torch.log_softmax(self._vocab_logits(hidden[start - first - 1:end - first - 1]), dim=-1)
        k = seq.params.logprobs or 0
        tgt = torch.tensor(targets, device=lp.device)
        chosen = floored(lp.gather(1, tgt[:, None]).squeeze(1)).tolist()
        top_vals, top_ids = lp.topk(k, dim=-1) if k else (None, None)
        for i, t in enumerate(targets):
            top = list(zip(top_ids[i].tolist(), floored(top_vals[i]).tolist())) if k else []
            seq.prompt_logprobs.append(Logprob(t, chosen[i], top))

    def _vocab_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits over the tokens the sampler may choose (no padding columns of the LM head)."""
        return self.model.logits(hidden)[:, :self.sampler.vocab_size].float()

    def _alone(self, prompt_token_ids: list[int], attn: DenseAttention) -> torch.Tensor:
        """One prompt through the model by itself, outside the KV pool: its hidden states (T, C)."""
        ids = torch.tensor(prompt_token_ids, device=self.device)
        return self.model(ids, torch.arange(len(ids), device=self.device), attn)

    @torch.inference_mode()
    def embed(self, prompt_token_ids: list[int]) -> list[float]:
        """One prompt's embedding: its final hidden states (after ln_f) averaged over its
        tokens, scaled to unit length."""
        hidden = self._alone(prompt_token_ids, DenseAttention(batch_size=1))
        return torch.nn.functional.normalize(hidden.float().mean(0), dim=0).tolist()

    @torch.inference_mode()
    def inspect(self, prompt_token_ids: list[int], top_k: int, decimals: int) -> Inspection:
        """One prompt with a recording attention backend: every layer's and head's
        attention, and the top next tokens."""
        attn = DenseAttention(batch_size=1, record=True)
        hidden = self._alone(prompt_token_ids, attn)
        probs, top = self._vocab_logits(hidden[-1:])[0].softmax(-1).topk(top_k)
        # float64 before rounding, so that 0.4965 is written as 0.4965, not 0.49649998
        attention = [attn.weights[layer][0].double().round(decimals=decimals).tolist()
                     for layer in sorted(attn.weights)]
        return Inspection(attention, list(zip(top.tolist(), probs.tolist())))

    @torch.inference_mode()
    def explain(self, prompt_token_ids: list[int], position: int, top_k: int, decimals: int,
                strip_cells: int = 128, top_neurons: int = 12) -> Explanation:
        """One prompt through the model with a recording attention backend and hooks on each
        block, read at the token `position`: embeddings, attention scores and weights, the
        most active MLP neurons, the residual stream's norm, the next-token logits."""
        model = self.model
        ids = torch.tensor(prompt_token_ids, device=self.device)
        positions = torch.arange(len(ids), device=self.device)
        tok, pos = model.wte(ids).float(), model.wpe(positions).float()  # (T, C) each
        seen: dict[tuple[str, int], torch.Tensor] = {}

        def keep(kind: str, layer: int, pre: bool = False):
            if pre:
                return lambda module, args: seen.__setitem__((kind, layer), args[0])
            return lambda module, args, out: seen.__setitem__((kind, layer), out)

        hooks = []
        for i, block in enumerate(model.h):
            hooks += [block.register_forward_pre_hook(keep("in", i, pre=True)),
                      block.attn.register_forward_hook(keep("attn", i)), block.register_forward_hook(keep("out", i)),
                      block.mlp.c_fc.register_forward_hook(keep("fc", i))]
        attn = DenseAttention(batch_size=1, record=True)
        try:
            hidden = model(ids, positions, attn)
        finally:
            for hook in hooks:
                hook.remove()

        def rounded(t: torch.Tensor) -> list:
            return t.double().round(decimals=decimals).tolist()

        keys = slice(0, position + 1)
        layers = range(len(model.h))
        neurons = []
        for i in layers:
            act = torch.nn.functional.gelu(seen[("fc", i)][position].float(), approximate="tanh")
            values, index = act.topk(min(top_neurons, act.numel()))
            neurons.append(list(zip(index.tolist(), rounded(values))))
        residual = []
        for i in layers:
            before = seen[("in", i)][position].float()
            after_attention = before + seen[("attn", i)][position].float()
            residual.append(tuple(rounded(torch.stack([before.norm(), after_attention.norm(),
                                                       seen[("out", i)][position].float().norm()]))))
        logits, top = self._vocab_logits(hidden[position:position + 1])[0].topk(top_k)
        x = tok + pos
        return Explanation(
            position=position, token_vectors=rounded(_strip(tok, strip_cells)),
            position_vectors=rounded(_strip(pos, strip_cells)),
            norms=[tuple(r) for r in rounded(torch.stack([tok.norm(dim=1), pos.norm(dim=1), x.norm(dim=1)], dim=1))],
            projection=[tuple(p) for p in rounded(principal_plane(x))],
            scores=[rounded(attn.scores[i][0, :, position, keys]) for i in layers],
            weights=[rounded(attn.weights[i][0, :, position, keys]) for i in layers],
            neurons=neurons, residual=residual, logits=list(zip(top.tolist(), rounded(logits))))


def _strip(vectors: torch.Tensor, cells: int) -> torch.Tensor:
    """(T, C) -> (T, at most `cells`): each row averaged over runs of ceil(C / cells) values
    (the last run may be shorter)."""
    t, c = vectors.shape
    if c <= cells:
        return vectors
    group = -(-c // cells)
    padded = torch.full((t, group * -(-c // group)), float("nan"), device=vectors.device)
    padded[:, :c] = vectors
    return padded.view(t, -1, group).nanmean(dim=2)


def principal_plane(x: torch.Tensor) -> torch.Tensor:
    """(T, C) -> (T, 2): the rows on their first two principal axes (centred, by SVD), each
    axis signed so that its largest coordinate is positive; zeros where there is no spread."""
    centred = (x - x.mean(dim=0)).double()
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)
    coords = torch.zeros(x.shape[0], 2, dtype=torch.float64, device=x.device)
    k = min(2, s.numel())
    coords[:, :k] = u[:, :k] * s[:k]
    for axis in range(2):
        if coords[:, axis].abs().max() > 0 and coords[coords[:, axis].abs().argmax(), axis] < 0:
            coords[:, axis] = -coords[:, axis]
    return coords
