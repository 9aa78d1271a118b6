"""One LLMEngine in a process of its own, driven from the parent through a pipe.

Why a process: replicas as threads of one process share its interpreter lock, and a GPU
step's Python (scheduling, batch building, sampling, detokenizing) is most of what a
replica does while its GPU runs; with one process per GPU those run side by side. The
child binds its GPU before any CUDA work, loads the model, and answers calls one at a time.

The parent's side, `EngineProcess`, has the methods of LLMEngine that AsyncEngine uses
(add_request, abort, step, has_unfinished, stats, embed, inspect, prepare_grammar), so a replica in a
process is `AsyncEngine(model, config, engine=EngineProcess(model, config))`: request
streams, aborts and errors go through the same code as in-process. Each call is one round
trip, and its reply carries the engine's stats and whether it has work, so those cost none.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
from concurrent.futures import Future
from multiprocessing.connection import Connection

from gptserve.config import EngineConfig
from gptserve.engine.grammar import GrammarCompiler
from gptserve.engine.outputs import EngineDeadError

log = logging.getLogger(__name__)
CALLS = ("add_request", "abort", "step", "embed", "inspect", "explain", "load_lora", "unload_lora")  # what the parent may ask of the child's engine


class EngineProcess:
    def __init__(self, model: str | None, config: EngineConfig):
        """Start the child; it loads while the caller goes on (wait_ready waits for it)."""
        ctx = mp.get_context("spawn")  # a forked child can't use CUDA
        self._conn, child = ctx.Pipe()
        self.device = config.device
        self._process = ctx.Process(target=_serve, args=(child, model, config, logging.getLogger().level),
                                    name=f"gptserve-engine-{config.device}", daemon=True)
        self._process.start()
        child.close()
        self._unfinished = False

    def wait_ready(self) -> None:
        """Wait until the child's engine is loaded; its load error raises here."""
        kind, payload = self._recv()
        if kind == "error":
            self.close()
            raise _rebuild(payload)
        self.tokenizer = payload["tokenizer"]
        self.model_config = payload["model_config"]
        self.precision = payload["precision"]
        self.limits = payload["limits"]
        self._grammars = GrammarCompiler(self.tokenizer, self.limits.vocab_size)  # the engine's own width
        self._stats = payload["stats"]
        self._lora_adapters = payload["lora_adapters"]  # those loaded at start
        self._memory_bytes = payload["memory_bytes"]

    def prepare_grammar(self, grammar: str) -> Future:
        """Compile and probe the grammar here, in the parent, so that a grammar that can't be
        used is refused before its request goes in; the child compiles it again when the
        request is added (the pipe carries no compiled grammars), which holds that replica's
        steps but not the server."""
        return self._grammars.prepare(grammar)

    # ---- LLMEngine's methods, run in the child ----------------------------------------------
    def add_request(self, request_id, prompt_token_ids, params) -> None:
        self._call("add_request", request_id, prompt_token_ids, params)

    def abort(self, request_id: str):
        return self._call("abort", request_id)

    def step(self):
        return self._call("step")

    def embed(self, prompts):
        return self._call("embed", prompts)

    def inspect(self, prompt_token_ids, top_k, decimals):
        return self._call("inspect", prompt_token_ids, top_k, decimals)

    def explain(self, prompt_token_ids, position, top_k, decimals):
        return self._call("explain", prompt_token_ids, position, top_k, decimals)

    def load_lora(self, name: str, path: str) -> None:
        self._call("load_lora", name, path)

    def unload_lora(self, name: str) -> None:
        self._call("unload_lora", name)

    def lora_adapters(self) -> dict[str, str]:
        return self._lora_adapters

    def memory_bytes(self) -> int:
        return self._memory_bytes

    def has_unfinished(self) -> bool:
        return self._unfinished

    def release(self) -> None:
        """Nothing to drop here: the child's memory goes when it is closed."""

    def stats(self):
        return self._stats

    def close(self, timeout: float = 10.0) -> None:
        """Stop the child (after the thread that drives it has stopped calling)."""
        if self._process.is_alive():
            try:
                self._conn.send(("stop", ()))
            except OSError:
                pass
            self._process.join(timeout)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout)
        self._conn.close()

    def _call(self, name: str, *args):
        self._conn.send((name, args))
        kind, result, self._unfinished, self._stats = self._recv()
        if kind == "error":
            raise _rebuild(result)
        return result

    def _recv(self):
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            code = self._process.exitcode
            raise EngineDeadError(f"the engine process on {self.device} is gone (exit code {code})") from None


def _serve(conn: Connection, model: str | None, config: EngineConfig, log_level: int) -> None:
    """The child: build the engine (which binds this process to its GPU first), then answer
    calls until told to stop."""
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s [{config.device}] %(name)s: %(message)s")
    from gptserve.engine.llm_engine import LLMEngine

    try:
        engine = LLMEngine(model, config)
    except BaseException as e:  # noqa: BLE001 - raised again in the parent, by wait_ready
        conn.send(("error", _portable(e)))
        return
    conn.send(("ready", {"tokenizer": engine.tokenizer, "model_config": engine.model_config,
                         "precision": str(engine.precision), "limits": engine.limits, "stats": engine.stats(),
                         "lora_adapters": engine.lora_adapters(), "memory_bytes": engine.memory_bytes()}))
    while True:
        try:
            name, args = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if name not in CALLS:
            return
        try:
            kind, result = "ok", getattr(engine, name)(*args)
        except Exception as e:  # noqa: BLE001 - the caller's failure, raised in the parent
            kind, result = "error", _portable(e)
        conn.send((kind, result, engine.has_unfinished(), engine.stats()))


def _portable(e: BaseException) -> tuple:
    """An exception as (class, args, attributes): pickle would rebuild it by calling the class
    with its message, which errors whose __init__ takes other arguments refuse."""
    args = e.args if all(map(_picklable, e.args)) else (str(e),)
    return type(e), args, {k: v for k, v in vars(e).items() if _picklable(v)}


def _rebuild(portable: tuple) -> BaseException:
    cls, args, attributes = portable
    e = cls.__new__(cls)
    e.args = args
    vars(e).update(attributes)
    return e


def _picklable(value) -> bool:
    return isinstance(value, (str, int, float, bool, type(None)))
