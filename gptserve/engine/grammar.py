"""Constrained decoding: a grammar per sequence, one token mask per step for the batch.

The engine knows grammars, not JSON Schema or tool calls: a request's SamplingParams may
carry a grammar in llguidance's format (the server makes it from a JSON Schema, a regex,
a list of choices, a Lark grammar or a set of tools, server/structured.py). llguidance
(Microsoft's grammar engine, used by llama.cpp and vLLM) compiles it against our
tokenizer's byte-level vocabulary and keeps a matcher per sequence; each step the masks
of all constrained rows are filled at once by its thread pool (`fill_next_token_bitmask_par`,
which drops the GIL), started before the forward pass and applied to the logits after it.
A compiled grammar is cached by its text; each sequence gets a copy of the compiled
matcher.
"""
from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import llguidance.tiktoken
import llguidance.torch
import numpy as np
import torch

from gptserve.engine.outputs import EngineError
from gptserve.model.tokenizer import Tokenizer

CACHE_SIZE = 256  # compiled grammars kept


class GrammarError(EngineError, ValueError):
    """The grammar does not compile (a bad schema, regex or Lark text)."""


class GrammarCompiler:
    """Grammars compiled for one tokenizer, and the batch's masks."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.vocab_size = vocab_size
        self.lltokenizer = llguidance.tiktoken.lltokenizer_from_encoding(
            tokenizer.encoding, n_vocab=vocab_size, eos_token=tokenizer.eos_token_id)
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._executor = llguidance.LLExecutor()
        self._mask_thread = ThreadPoolExecutor(1, thread_name_prefix="gptserve-masks")

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A fresh matcher for one sequence (the grammar compiled once, then copied)."""
        compiled = self._compiled.get(grammar)
        if compiled is None:
            compiled = llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0)
            if compiled.is_error():
                raise GrammarError(f"the grammar does not compile: {compiled.get_error()}")
            self._compiled[grammar] = compiled
            if len(self._compiled) > CACHE_SIZE:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(grammar)
        return compiled.deep_copy()

    def start_masks(self, matchers: list[llguidance.LLMatcher | None]) -> Future | None:
        """Begin filling the allowed-token masks of the constrained rows (None: unconstrained)
        on the mask thread, to overlap the forward pass. The future's result: (row indices,
        packed bitmask of those rows). None when no row is constrained."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        return self._mask_thread.submit(self._fill, [matchers[i] for i in rows], rows)

    def _fill(self, matchers: list[llguidance.LLMatcher], rows: list[int]) -> tuple[list[int], torch.Tensor]:
        bitmask = torch.empty(len(rows), (self.vocab_size + 31) // 32, dtype=torch.int32)
        llguidance.torch.fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(matchers)],
                                                     bitmask)
        return rows, bitmask


def apply_grammar_mask(logits: torch.Tensor, mask: tuple[list[int], torch.Tensor]) -> None:
    """Set every disallowed token's logit to -inf, in place, in the constrained rows."""
    rows, bitmask = mask
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :logits.shape[1]]
    banned = torch.from_numpy(bits).to(logits.device) == 0  # (R, V): bit t of a row says "t allowed"
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(banned, float("-inf"))
