"""Engine errors across the process boundary, from an engine replica to the ingress.

Ray pickles the exception a replica raises, and unpickling calls the exception's class
with its message alone: PromptTooLongError, whose __init__ takes the token counts, then
fails to unpickle, and the ingress would see Ray's UnserializableException instead of a
400 that names the context length. So the replica raises `ReplicaError` (the class's
name, the message, the attributes), and the ingress raises an error of the original
class again, which the server words exactly as it does for an engine in its own process.
"""
from __future__ import annotations

from typing import Any

from gptserve.engine.outputs import (AdapterError, AdapterNotFoundError, EngineDeadError, EngineError, GrammarError,
                                     InvalidPromptError, PromptTooLongError, RequestFailedError)
from gptserve.engine.sampling_params import InvalidSamplingParams

# what an engine raises for one request; anything else is a bug and stays Ray's error (500)
CARRIED = {cls.__name__: cls for cls in (PromptTooLongError, InvalidPromptError, RequestFailedError,
                                         EngineDeadError, GrammarError, InvalidSamplingParams, AdapterError,
                                         AdapterNotFoundError, EngineError)}


class ReplicaError(Exception):
    """An engine error, as it travels from an engine replica to the ingress."""

    def __init__(self, kind: str, message: str, attrs: dict[str, Any]):
        super().__init__(kind, message, attrs)  # the args are all unpickling needs
        self.kind, self.message, self.attrs = kind, message, attrs

    @classmethod
    def of(cls, error: Exception) -> "ReplicaError":
        return cls(type(error).__name__, str(error), dict(vars(error)))

    def rebuild(self) -> Exception:
        """The replica's error again, of its own class (its __init__ is not called: its
        arguments are gone, its message and attributes are what the server reads)."""
        kind = CARRIED.get(self.kind, EngineError)
        error = kind.__new__(kind)
        Exception.__init__(error, self.message)
        error.__dict__.update(self.attrs)
        return error
