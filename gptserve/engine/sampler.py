"""Turn a batch of logits into next tokens, each row under its own sampling settings.

Everything is one tensor operation over the batch; the only per-row Python is for rows
with their own seed, which draw from a generator keyed by (seed, choice, position), so
that the same seed gives the same tokens whoever shares the batch and whether or not the
token was guessed ahead (speculative decoding verifies several positions of a sequence in
one step). Sampling draws one uniform number per row and takes the token where it falls
in the row's cumulative distribution (summed in float64, so rounding moves no probability
that matters; a token of probability 0 is never taken): one random number a row, where
noise over the whole vocabulary cost milliseconds a row on a CPU. Which filters run is
decided from the rows' settings in Python, so the device is not asked (no host sync) until
the tokens are read.

Whatever the settings, the token chosen is in the vocabulary and, under a grammar, one
the grammar allows:
- only the tokenizer's tokens are candidates (a model's logits may have padding columns);
- the grammar's mask is applied first, so penalties and filters see the distribution over
  the allowed tokens, and has the last word: a chosen token it bans (-inf) is no choice;
- settings at their edges make non-finite logits (a seen token's logit divided by a
  repetition penalty of 5e-324 is +inf): NaN is no candidate, +inf the likeliest (the
  limit of what was asked), and a penalty is at least float32's smallest normal number
  (0 would make a banned token's -inf NaN);
- a row left with no candidate (every allowed token at -inf) takes the allowed token the
  model's own logits rank first;
- temperatures under GREEDY_BELOW are greedy (sampling_params.py).
Logprobs are the model's own (before masks and settings), floored at LOGPROB_FLOOR, so
every one is a finite number. A row that asks for token details (SamplingParams.token_details)
also gets how many tokens its grammar allowed and the model's likeliest tokens it banned;
none of that is computed unless a row asks.

A row is a Sequence or a speculative VerifyRow: anything with params, index, token_ids
and output_token_ids.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gptserve.engine.grammar import apply_grammar_mask, banned_tokens
from gptserve.engine.outputs import Logprob, TokenDetail
from gptserve.engine.sequence import Sequence, VerifyRow
from gptserve.model.cpu_kernels import row_argmax

Row = Sequence | VerifyRow
LOGPROB_FLOOR = -9999.0  # vLLM's floor: -inf (a token the model rules out) is not a JSON number
FLOAT32 = torch.finfo(torch.float32)
NEG_INF = float("-inf")


FORBIDDEN_SHOWN = 5  # the banned tokens a token's detail names


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[Logprob | None]
    details: list[TokenDetail | None] = field(default_factory=list)


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device, seed: int = 0):
        self.vocab_size = vocab_size  # the tokens that may be chosen: the tokenizer's
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: list[Row],
                 grammar_mask: tuple[list[int], torch.Tensor] | None = None) -> SamplerOutput:
        """`grammar_mask`: the constrained rows and their packed bitmasks (engine/grammar.py),
        applied to `logits` in place."""
        logits = logits[:, :self.vocab_size].float()  # (B, V): padding columns are never candidates
        params = [s.params for s in seqs]
        raw_logprobs = None
        details = any(p.token_details for p in params)
        if details or any(p.logprobs is not None for p in params):
            raw_logprobs = torch.log_softmax(logits, dim=-1)  # the model's own, before any mask
        if grammar_mask is not None:
            apply_grammar_mask(logits, grammar_mask)  # first, so penalties and filters see the grammar's tokens
        scores = self._apply_penalties(logits, seqs)
        if all(p.greedy for p in params):
            tokens = argmax(scores)  # an index of the row, whatever its values
        else:
            greedy = torch.tensor([p.greedy for p in params], device=logits.device)
            tokens = torch.where(greedy, argmax(scores), self._sample(scores, seqs))
        if grammar_mask is not None:  # the mask has the last word: a banned token (-inf) is no choice
            tokens = tokens.masked_fill(logits.gather(1, tokens.clamp(min=0)[:, None]).squeeze(1) == NEG_INF, -1)
        token_list = tokens.tolist()  # the one host sync
        if -1 in token_list:  # rare: rows left with no candidate take the model's best allowed token
            token_list = self._fall_back(logits, grammar_mask, token_list)
        if token_list and not 0 <= min(token_list) <= max(token_list) < self.vocab_size:
            raise RuntimeError(f"the sampler chose a token outside the vocabulary [0, {self.vocab_size}): "
                               f"{token_list}")
        return SamplerOutput(token_list, self._logprobs(raw_logprobs, token_list, params),
                             self._details(raw_logprobs, grammar_mask, params) if details else [None] * len(token_list))

    @staticmethod
    def _fall_back(logits: torch.Tensor, grammar_mask: tuple[list[int], torch.Tensor] | None,
                   tokens: list[int]) -> list[int]:
        """`tokens` with each -1 (a row left with no candidate) replaced by the row's allowed
        token the model ranks first, non-finite logits below every finite one."""
        rows = [i for i, t in enumerate(tokens) if t == -1]
        index = torch.tensor(rows, device=logits.device)
        finite = logits[index].nan_to_num(nan=FLOAT32.min, posinf=FLOAT32.max, neginf=FLOAT32.min)
        if grammar_mask is not None:  # the banned columns of `logits` are -inf, but so may be allowed ones
            finite = finite.masked_fill(banned_tokens(grammar_mask, logits.shape, logits.device)[index], NEG_INF)
        tokens = list(tokens)
        for i, token in zip(rows, argmax(finite).tolist()):
            tokens[i] = token
        return tokens

    # ---- logits processing -------------------------------------------------------------
    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Row]) -> torch.Tensor:
        params = [s.params for s in seqs]
        if any(p.logit_bias for p in params):
            rows, cols, vals = [], [], []
            for i, p in enumerate(params):
                for tok, bias in p.logit_bias.items():  # ids checked by EngineLimits.check_request
                    rows.append(i), cols.append(tok), vals.append(bias)
            dev = logits.device
            logits = logits.index_put((torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)),
                                      torch.tensor(vals, device=dev), accumulate=True)
        needs_counts = any(p.presence_penalty or p.frequency_penalty for p in params)
        needs_rep = any(p.repetition_penalty != 1.0 for p in params)
        if not (needs_counts or needs_rep):
            return logits
        b, v = logits.shape
        dev = logits.device
        if needs_counts:
            counts = torch.zeros(b, v + 1, device=dev)  # the extra column absorbs padding
            out = _pad([s.output_token_ids for s in seqs], v, dev)
            counts = counts.scatter_add_(1, out, torch.ones_like(out, dtype=counts.dtype))[:, :v]
            pres = torch.tensor([p.presence_penalty for p in params], device=dev)[:, None]
            freq = torch.tensor([p.frequency_penalty for p in params], device=dev)[:, None]
            logits = logits - freq * counts - pres * (counts > 0).float()
        if needs_rep:  # HF/CTRL style over prompt and output tokens
            seen = torch.zeros(b, v + 1, dtype=torch.bool, device=dev)
            seen = seen.scatter_(1, _pad([s.token_ids for s in seqs], v, dev), True)[:, :v]
            # a penalty under float32's range would be 0, and -inf * 0 NaN
            rep = torch.tensor([p.repetition_penalty for p in params], device=dev)[:, None].clamp(min=FLOAT32.tiny)
            penalised = torch.where(logits > 0, logits / rep, logits * rep)
            logits = torch.where(seen, penalised, logits)
        return logits

    def _sample(self, scores: torch.Tensor, seqs: list[Row]) -> torch.Tensor:
        """Each row's drawn token; -1 for a row with no probability left to draw from."""
        params = [s.params for s in seqs]
        dev = scores.device
        temp = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=dev)[:, None]
        # NaN is no candidate; +inf (a tiny penalty or temperature) the likeliest, beside any other +inf
        logits = (scores / temp).nan_to_num_(nan=NEG_INF, posinf=FLOAT32.max, neginf=NEG_INF)
        top_ks = [min(p.top_k, self.vocab_size) if p.top_k > 0 else 0 for p in params]
        if any(top_ks):
            kmax = max(top_ks)
            k = torch.tensor([t or 1 for t in top_ks], device=dev)
            kth = logits.topk(kmax, dim=-1).values.gather(1, (k - 1)[:, None])
            kth = kth.masked_fill(torch.tensor([t == 0 for t in top_ks], device=dev)[:, None], NEG_INF)
            logits = logits.masked_fill(logits < kth, NEG_INF)
        probs = logits.softmax(dim=-1)  # a row of only -inf is NaN: no candidate
        if any(p.top_p < 1.0 for p in params):
            top_p = torch.tensor([p.top_p for p in params], device=dev)
            sorted_p, idx = probs.sort(dim=-1, descending=True)
            before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of strictly better tokens
            drop_sorted = before >= top_p[:, None]
            drop_sorted[:, 0] = False  # the best token stays, however small top_p (5e-324 is 0 in float32)
            drop = torch.zeros_like(drop_sorted).scatter(1, idx, drop_sorted)
            probs = probs.masked_fill(drop, 0.0)
        if any(p.min_p > 0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=dev)
            floor = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
            probs = probs.masked_fill(probs < floor, 0.0)
        u = torch.rand(len(seqs), 1, dtype=torch.float64, generator=self.generator, device=dev)
        for i, row in enumerate(seqs):
            if row.params.seed is not None:  # its own draw, independent of the batch
                g = torch.Generator().manual_seed(seeded_draw_key(row.params.seed, row.index, len(row.token_ids)))
                u[i] = torch.rand(1, dtype=torch.float64, generator=g).to(dev)
        cdf = probs.double().cumsum(dim=-1)  # (B, V); the filters above left the rows unnormalised
        total = cdf[:, -1:]
        # 1 - u is in (0, 1]: the first token whose cumulative mass reaches it has mass of its own
        tokens = torch.searchsorted(cdf, (1.0 - u) * total).squeeze(1)
        return tokens.masked_fill_(~(total.squeeze(1) > 0), -1)  # no mass, or NaN

    @staticmethod
    def _details(raw: torch.Tensor, grammar_mask: tuple[list[int], torch.Tensor] | None,
                 params) -> list[TokenDetail | None]:
        """For the rows that ask: how many tokens their grammar allowed, and the model's
        likeliest tokens it banned with their logprobs before the mask."""
        out: list[TokenDetail | None] = [TokenDetail() if p.token_details else None for p in params]
        if grammar_mask is None:
            return out
        banned = banned_tokens(grammar_mask, raw.shape, raw.device)
        for row in grammar_mask[0]:
            if out[row] is None:
                continue
            out[row].allowed = int((~banned[row]).sum())
            values, ids = raw[row].masked_fill(~banned[row], NEG_INF).topk(FORBIDDEN_SHOWN)
            keep = values > NEG_INF  # fewer banned tokens than that: the rest are allowed ones
            out[row].forbidden = list(zip(ids[keep].tolist(), floored(values[keep]).tolist()))
        return out

    @staticmethod
    def _logprobs(raw: torch.Tensor | None, tokens: list[int], params) -> list[Logprob | None]:
        if raw is None:
            return [None] * len(tokens)
        k = max(p.logprobs or 0 for p in params)
        chosen = floored(raw.gather(1, torch.tensor(tokens, device=raw.device)[:, None]).squeeze(1)).tolist()
        top_vals, top_ids = (raw.topk(k, dim=-1) if k else (None, None))
        top_vals = floored(top_vals).tolist() if k else None
        top_ids = top_ids.tolist() if k else None
        out: list[Logprob | None] = []
        for i, p in enumerate(params):
            if p.logprobs is None:
                out.append(None)
                continue
            n = p.logprobs
            top = list(zip(top_ids[i][:n], top_vals[i][:n])) if n else []
            out.append(Logprob(tokens[i], chosen[i], top))
        return out


def floored(logprobs: torch.Tensor) -> torch.Tensor:
    """Logprobs as finite numbers, none below LOGPROB_FLOOR."""
    return logprobs.nan_to_num(nan=LOGPROB_FLOOR).clamp(min=LOGPROB_FLOOR)


def seeded_draw_key(seed: int, index: int, position: int) -> int:
    """The generator seed of a seeded request's choice `index` at token `position`."""
    return hash((seed, index, position)) & 0x7FFF_FFFF_FFFF_FFFF  # ints hash the same in every process


def argmax(x: torch.Tensor) -> torch.Tensor:
    """Each row's argmax: the compiled CPU kernel for float32 (same answer, faster), else torch's."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        kernel = row_argmax()
        if kernel is not None:
            return kernel(x)
    return x.argmax(dim=-1)


def _pad(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    """Ragged token lists as a (B, max_len) tensor padded with `pad`."""
    width = max((len(r) for r in rows), default=0) or 1
    out = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, :len(r)] = torch.tensor(r)
    return out.to(device)
