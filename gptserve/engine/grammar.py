"""Constrained decoding: a grammar per sequence, one token mask per step for the batch.

The engine knows grammars, not JSON Schema or tool calls: a request's SamplingParams may
carry a grammar in llguidance's format (the server makes it from a JSON Schema, a regex,
a list of choices, a Lark grammar or a set of tools, server/structured.py). llguidance
(Microsoft's grammar engine, used by llama.cpp and vLLM) compiles it against our
tokenizer's byte-level vocabulary and keeps a matcher per sequence; each step the masks
of all constrained rows are filled at once by its thread pool (`fill_next_token_bitmask_par`,
which drops the GIL), started before the forward pass and applied to the logits after it.
(Its numpy binding, not its torch one: importing llguidance.torch imports torch.compile's
machinery, 190 MB of memory and two seconds of start-up that nothing here uses.)

A grammar is compiled once, cached by its text, on the grammar threads (gptserve/grammar_threads.py):
`prepare` is called when a request arrives (AsyncEngine.generate awaits it), so the step
loop only copies the compiled matcher for each sequence. Compiling also probes the grammar
(`_probe`): the masks of its first tokens are computed, so that a grammar that breaks one
of llguidance's limits (PARSER_LIMITS) or whose masks are too slow to follow is refused
before its request starts, not after its first token.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import llguidance.tiktoken
import llguidance.numpy
import numpy as np
import torch

from gptserve.engine.outputs import GrammarError
from gptserve.grammar_limits import PARSER_LIMITS, describe
from gptserve.grammar_threads import run_deep
from gptserve.model.tokenizer import Tokenizer

CACHE_SIZE = 256  # compiled grammars kept
PROBE_TOKENS = 8  # tokens of a grammar walked at admission
MASK_BUDGET_S = 0.25  # a mask slower than this would hold every step of the batch back


class GrammarCompiler:
    """Grammars compiled for one tokenizer, and the batch's masks. prepare and matcher may
    be called from any thread."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._lltokenizer: llguidance.LLTokenizer | None = None  # built by the first compile: it takes a second
        self._compiled: OrderedDict[str, Future] = OrderedDict()  # grammar -> Future[LLMatcher]
        self._lock = threading.Lock()  # the cache's
        self._tokenizer_lock = threading.Lock()  # held while the tokenizer is built, not while the cache is read
        self._executor = llguidance.LLExecutor()
        self._mask_thread = ThreadPoolExecutor(1, thread_name_prefix="gptserve-masks")

    def prepare(self, grammar: str) -> Future:
        """The compiled grammar, as a future: cached, or being compiled and probed on the
        grammar threads. Its exception is a GrammarError for a grammar that can't be used."""
        with self._lock:
            future = self._compiled.get(grammar)
            if future is not None and not future.cancelled():
                self._compiled.move_to_end(grammar)
                return future
            future = self._compiled[grammar] = run_deep(self._compile, grammar)
            if len(self._compiled) > CACHE_SIZE:
                self._compiled.popitem(last=False)
            return future

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A fresh matcher for one sequence: a copy of the compiled grammar (compiled here
        and now, waiting for the grammar threads, if nobody prepared it)."""
        return self.prepare(grammar).result().deep_copy()

    def _compile(self, grammar: str) -> llguidance.LLMatcher:
        compiled = llguidance.LLMatcher(self._tokenizer(), grammar, log_level=0, limits=PARSER_LIMITS)
        if compiled.is_error():
            raise GrammarError(f"the grammar does not compile: {describe(compiled.get_error())}")
        self._probe(compiled)
        return compiled

    def _tokenizer(self) -> llguidance.LLTokenizer:
        with self._tokenizer_lock:
            if self._lltokenizer is None:
                self._lltokenizer = llguidance.tiktoken.lltokenizer_from_encoding(
                    self.tokenizer.encoding, n_vocab=self.vocab_size, eos_token=self.tokenizer.eos_token_id)
            return self._lltokenizer

    def _probe(self, compiled: llguidance.LLMatcher) -> None:
        """Walk the grammar's first PROBE_TOKENS tokens (each time the lowest allowed token
        other than EOS), timing each mask: llguidance checks some limits (the parser's row
        items, above all) only once tokens arrive, and a mask too slow for a step is a grammar
        the engine can't follow either."""
        matcher, eos = compiled.deep_copy(), self.tokenizer.eos_token_id
        for position in range(PROBE_TOKENS):
            started = time.perf_counter()
            mask = matcher.compute_bitmask()
            took = time.perf_counter() - started
            if matcher.is_error():
                raise GrammarError(f"the grammar fails at token {position + 1}: {describe(matcher.get_error())}")
            if took > MASK_BUDGET_S:
                raise GrammarError(f"the grammar is too slow to follow: the mask of its token {position + 1} took "
                                   f"{took * 1000:.0f} ms, more than the {MASK_BUDGET_S * 1000:.0f} ms a step can wait")
            bits = np.unpackbits(np.frombuffer(mask, dtype=np.uint8), bitorder="little")[:self.vocab_size]
            allowed = np.flatnonzero(bits)
            allowed = allowed[allowed != eos]
            if not allowed.size:
                return
            matcher.consume_token(int(allowed[0]))
            if matcher.is_error():
                raise GrammarError(f"the grammar fails at token {position + 1}: {describe(matcher.get_error())}")
            if matcher.is_stopped():
                return

    def start_masks(self, matchers: list[llguidance.LLMatcher | None]) -> Future | None:
        """Begin filling the allowed-token masks of the constrained rows (None: unconstrained)
        on the mask thread, to overlap the forward pass. The future's result: (row indices,
        packed bitmask of those rows). None when no row is constrained. A matcher that fails
        while its mask is computed allows EOS alone, and the engine fails its request when
        it consumes the token (LLMEngine._append_token)."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        return self._mask_thread.submit(self._fill, [matchers[i] for i in rows], rows)

    def _fill(self, matchers: list[llguidance.LLMatcher], rows: list[int]) -> tuple[list[int], torch.Tensor]:
        bitmask = np.empty((len(rows), (self.vocab_size + 31) // 32), dtype=np.int32)
        llguidance.numpy.fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(matchers)],
                                                     bitmask)
        return rows, torch.from_numpy(bitmask)


def _banned_in_rows(mask: tuple[list[int], torch.Tensor], vocab_size: int, device: torch.device) -> torch.Tensor:
    """(R, V) bool: the tokens each constrained row's grammar disallows, in the mask's row order."""
    bits = np.unpackbits(mask[1].numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab_size]
    return torch.from_numpy(bits).to(device) == 0  # bit t of a row says "t allowed"


def apply_grammar_mask(logits: torch.Tensor, mask: tuple[list[int], torch.Tensor]) -> None:
    """Set every disallowed token's logit to -inf, in place, in the constrained rows."""
    index = torch.tensor(mask[0], device=logits.device)
    logits[index] = logits[index].masked_fill(_banned_in_rows(mask, logits.shape[1], logits.device), float("-inf"))


def banned_tokens(mask: tuple[list[int], torch.Tensor], shape: torch.Size, device: torch.device) -> torch.Tensor:
    """(B, V) bool for a batch of `shape`: the tokens the grammars disallow (none in an
    unconstrained row)."""
    banned = torch.zeros(shape, dtype=torch.bool, device=device)
    banned[torch.tensor(mask[0], device=device)] = _banned_in_rows(mask, shape[1], device)
    return banned
