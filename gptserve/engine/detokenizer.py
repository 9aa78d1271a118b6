"""Incremental detokenization and stop-string matching across token boundaries.

Text is released as soon as it can no longer be part of a stop string: only a tail that
could still grow into one (a prefix of some stop string, at most its length - 1) is held
back, so a stream's text and logprobs go out with their own token. A matched stop string
is cut, with everything after it; by default it is not returned.
"""
from __future__ import annotations

from gptserve.model.tokenizer import IncrementalDecoder, Tokenizer


class StreamDetokenizer:
    def __init__(self, tokenizer: Tokenizer, stop: list[str], include_stop: bool = False):
        self.decoder: IncrementalDecoder = tokenizer.incremental_decoder()
        self.stop = stop
        self.include_stop = include_stop
        self.hold = max((len(s) for s in stop), default=1) - 1  # the longest tail ever held
        self.starts = {s[0] for s in stop}
        self.pending = ""  # decoded but not yet released

    def push(self, token_id: int) -> tuple[str, str | None]:
        """Add a token; return (text safe to release, the stop string matched or None)."""
        self.pending += self.decoder.push(token_id)
        if self.stop:
            hit = self._find_stop()
            if hit is not None:
                pos, s = hit
                text = self.pending[:pos + (len(s) if self.include_stop else 0)]
                self.pending = ""
                return text, s
        cut = len(self.pending) - self._partial_stop()
        text, self.pending = self.pending[:cut], self.pending[cut:]
        return text, None

    def _partial_stop(self) -> int:
        """The length of the longest tail of pending text that begins some stop string."""
        p = self.pending
        for i in range(max(0, len(p) - self.hold), len(p)):
            if p[i] in self.starts and any(s.startswith(p[i:]) for s in self.stop):
                return len(p) - i
        return 0

    def _find_stop(self) -> tuple[int, str] | None:
        best = None
        for s in self.stop:
            pos = self.pending.find(s)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, s)
        return best

    def flush(self) -> str:
        """The held-back text, when the sequence ends for another reason."""
        text = self.pending + self.decoder.flush()
        self.pending = ""
        return text
