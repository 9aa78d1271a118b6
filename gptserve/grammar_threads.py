"""The threads that check and compile grammars: off the event loop and the step loop, with
deep stacks.

Compiling a large grammar takes seconds (a 10,000-way choice, a schema of thousands of
properties), so neither the server's event loop nor the engine's step loop may do it.
llguidance also recurses once per rule when it builds a grammar: a chain of 3,000 Lark
rules overflows a thread's usual 8 MiB stack, and a stack overflow kills the process, not
the request. These threads get a stack deep enough for any grammar the server's limits
let through, many times over. There are half as many as cores (one on two cores), so
compiles leave the engine's step a core. They run at the usual priority: a lower one
(nice +10) made the streams slower, not faster, as a compile thread preempted while
holding the GIL keeps the event loop and the engine thread waiting for it.
"""
from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import Future
from typing import Callable, TypeVar

T = TypeVar("T")
STACK_BYTES = 256 * 2**20  # address space, not memory: pages are touched only as deep as a compile goes
NUM_WORKERS = min(4, max(1, (os.cpu_count() or 2) // 2))  # compiles are CPU-bound: half the cores at most


class DeepStackPool:
    """A fixed set of daemon threads with STACK_BYTES stacks, started on first use."""

    def __init__(self, num_threads: int = NUM_WORKERS, name: str = "gptserve-grammar"):
        self.num_threads, self.name = num_threads, name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._started = False
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., T], *args) -> Future:
        """fn(*args) on one of the threads; its result or exception in the future."""
        future: Future = Future()
        self._start()
        self._jobs.put((future, fn, args))
        return future

    def _start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
            with _STACK_SIZE_LOCK:  # the stack size is process-wide: set it only while these start
                previous = threading.stack_size(STACK_BYTES)
                try:
                    for i in range(self.num_threads):
                        threading.Thread(target=self._work, name=f"{self.name}-{i}", daemon=True).start()
                finally:
                    threading.stack_size(previous)

    def _work(self) -> None:
        while True:
            future, fn, args = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - the submitter's to handle
                future.set_exception(e)


_STACK_SIZE_LOCK = threading.Lock()
_POOL = DeepStackPool()


def run_deep(fn: Callable[..., T], *args) -> Future:
    """fn(*args) on the process's grammar threads (see the module's docstring)."""
    return _POOL.submit(fn, *args)
