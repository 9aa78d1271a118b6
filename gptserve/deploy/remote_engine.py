"""`RemoteEngine`: the EngineClient (engine/client.py) the ingress's server talks to, over
a Ray Serve handle to the engine deployment (engine_replica.py). The server can't tell
it from a local engine: same calls, same outputs, same errors.

A request's calls go wherever the deployment's router (router.py) sends them. When the
replica is lost (its actor died, its node went away) before the request produced any
output, the request is sent again, up to `max_attempts` times, and Serve's router, told
the actor died, sends it elsewhere; once output has gone out, the request fails with
EngineDeadError, which the server turns into an error event and `[DONE]` on a stream.
Closing a request's stream, `abort` and `shutdown` cancel its call, which cancels the
generator on the replica, and the engine there frees its blocks; the stream then ends
as a local engine's does, with finish_reason "abort".
"""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Awaitable, Callable, TypeVar

from ray.exceptions import NodeDiedError, RayActorError, RayTaskError, WorkerCrashedError
from ray.serve.exceptions import ReplicaUnavailableError, RequestCancelledError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from gptserve.deploy import fleet
from gptserve.deploy.engine_replica import EngineDescription
from gptserve.deploy.remote_errors import ReplicaError
from gptserve.deploy.replica_header import record_replica
from gptserve.engine.outputs import (AdapterError, ChoiceDelta, Explanation, EngineDeadError, EngineStats, FinishReason, Inspection,
                                     RequestOutput)
from gptserve.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")

REPLICA_LOST = (RayActorError, WorkerCrashedError, NodeDiedError, ReplicaUnavailableError)
RETRY_BACKOFF_S = 0.1  # doubled after each attempt


def _engine_error(error: RayTaskError) -> Exception:
    """The engine's own error, when the replica raised one (else Ray's, a 500)."""
    cause = getattr(error, "cause", None)
    return cause.rebuild() if isinstance(cause, ReplicaError) else error


class RemoteEngine:
    """The engine replicas of one Serve application, as one EngineClient."""

    def __init__(self, handle: DeploymentHandle, description: EngineDescription, max_attempts: int = 3):
        self.handle = handle
        self.model_name = description.model_name
        self.tokenizer = description.tokenizer
        self.model_config = description.model_config
        self.dtype = description.dtype
        self.limits = description.limits
        self.lora_adapters = description.lora_adapters
        self.memory_bytes = 0  # the replicas hold the model, in processes of their own
        self.max_attempts = max_attempts
        self.requests_retried = 0  # sent again after their replica was lost
        self._calls: dict[str, DeploymentResponseGenerator] = {}  # request id -> its call now
        self._aborted: set[str] = set()
        self._started = self._stopping = False

    @classmethod
    async def connect(cls, handle: DeploymentHandle, max_attempts: int = 3) -> "RemoteEngine":
        """Waits for an engine replica and asks it what it serves."""
        description = await _retried(lambda: handle.describe.remote(), max_attempts)
        return cls(handle, description, max_attempts)

    # ---- lifecycle ---------------------------------------------------------------------
    @property
    def is_ready(self) -> bool:
        return self._started and not self._stopping

    def start(self) -> None:
        self._started = True

    async def shutdown(self) -> None:
        """Ends this ingress's requests (each stream gets finish_reason "abort"); the
        engine replicas are the deployment's own and go on serving."""
        self._stopping = True
        for request_id in list(self._calls):
            self.abort(request_id)

    # ---- requests ---------------------------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        if self._stopping:
            raise EngineDeadError("the engine is shutting down")
        unfinished = set(range(params.n))
        produced = False
        for attempt in range(1, self.max_attempts + 1):
            call = self.handle.options(stream=True).generate.remote(prompt_token_ids, params, request_id)
            self._calls[request_id] = call
            replica = "an engine replica"
            try:
                async for item in call:
                    if isinstance(item, str):
                        replica = item
                        continue
                    if not produced:
                        record_replica(replica)
                        produced = True
                    unfinished.difference_update(c.index for c in item.choices if c.finish_reason is not None)
                    yield item
                return
            except RayTaskError as e:
                raise _engine_error(e) from None
            except RequestCancelledError:
                if request_id not in self._aborted:
                    raise
                yield _aborted(request_id, prompt_token_ids, unfinished)
                return
            except REPLICA_LOST as e:
                if produced or attempt == self.max_attempts or self._stopping:
                    raise EngineDeadError(f"{replica} was lost while serving request {request_id} "
                                          f"({type(e).__name__})") from None
                self.requests_retried += 1
                log.warning("request %s: %s was lost before any output (%s); sending it again (attempt %d of %d)",
                            request_id, replica, type(e).__name__, attempt + 1, self.max_attempts)
                await asyncio.sleep(RETRY_BACKOFF_S * 2 ** (attempt - 1))
            finally:
                if self._calls.get(request_id) is call:
                    del self._calls[request_id]
                    self._aborted.discard(request_id)
                    call.cancel()  # a no-op once it ended; else the replica aborts the request

    def abort(self, request_id: str) -> None:
        call = self._calls.get(request_id)
        if call is not None:
            self._aborted.add(request_id)
            call.cancel()

    async def embed(self, prompts: list[list[int]]) -> list[list[float]]:
        return await _retried(lambda: self.handle.embed.remote(prompts), self.max_attempts)

    async def inspect(self, prompt_token_ids: list[int], top_k: int, decimals: int) -> Inspection:
        return await _retried(lambda: self.handle.inspect.remote(prompt_token_ids, top_k, decimals),
                              self.max_attempts)

    async def explain(self, prompt_token_ids: list[int], position: int, top_k: int, decimals: int) -> Explanation:
        return await _retried(lambda: self.handle.explain.remote(prompt_token_ids, position, top_k, decimals),
                              self.max_attempts)

    async def load_lora(self, name: str, path: str) -> None:
        raise AdapterError("under Ray Serve, adapters are loaded at start on every replica: name them with "
                           "--lora-modules")

    async def unload_lora(self, name: str) -> None:
        raise AdapterError("under Ray Serve, adapters are loaded at start on every replica")

    def stats(self) -> EngineStats:
        reported = [s for s in fleet.replica_stats(self.handle.app_name).values() if s is not None]
        return fleet.sum_stats(reported)

    @property
    def num_replicas(self) -> int:
        """Engine replicas the router can reach now."""
        return len(fleet.replica_stats(self.handle.app_name))

    @property
    def num_in_flight(self) -> int:
        """Requests of this ingress with a call open on an engine replica."""
        return len(self._calls)


def _aborted(request_id: str, prompt_token_ids: list[int], unfinished: set[int]) -> RequestOutput:
    """The last output of an aborted request, as a local engine sends it."""
    choices = [ChoiceDelta(i, "", [], finish_reason=FinishReason.ABORT) for i in sorted(unfinished)]
    return RequestOutput(request_id, prompt_token_ids, choices, finished=True)


async def _retried(call: Callable[[], Awaitable[T]], max_attempts: int) -> T:
    """A unary call, sent again when its replica is lost; engine errors raised as the engine's."""
    for attempt in range(1, max_attempts + 1):
        try:
            return await call()
        except RayTaskError as e:
            raise _engine_error(e) from None
        except REPLICA_LOST as e:
            if attempt == max_attempts:
                raise EngineDeadError(f"the engine replica was lost ({type(e).__name__})") from None
            await asyncio.sleep(RETRY_BACKOFF_S * 2 ** (attempt - 1))
    raise AssertionError("unreachable")
