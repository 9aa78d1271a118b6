"""The step loop: admit requests, schedule, run the model once, turn tokens into deltas.

Synchronous and single-threaded by design: it owns the model, the KV pool, the scheduler
and every request's state, and nothing else touches them. `AsyncEngine` drives it from
one thread; offline callers (`generate`, the CLI) drive it directly.
"""
from __future__ import annotations

import gc
import itertools
import logging
from concurrent.futures import Future

from gptserve.config import EngineConfig, ModelConfig
from gptserve.engine.build import build_parts
from gptserve.engine.decoding import Decoding
from gptserve.engine.detokenizer import StreamDetokenizer
from gptserve.engine.outputs import (AdapterError, AdapterNotFoundError, ChoiceDelta, EngineStats, Explanation,
                                     FinishReason, GrammarError, Inspection, InvalidPromptError,
                                     RequestOutput)
from gptserve.engine.sampling_params import SamplingParams
from gptserve.engine.speculative import SpeculationStats
from gptserve.engine.sequence import Request, Sequence, rows_by_sequence
from gptserve.model.gpt2 import GPT2
from gptserve.model.tokenizer import Tokenizer
from gptserve.weights.loader import release_freed_memory

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, model: str | None, config: EngineConfig | None = None,
                 loaded: tuple[GPT2, Tokenizer] | None = None):
        self.config = config = config or EngineConfig()
        parts = build_parts(model, config, loaded)  # build.py: device, weights, KV pool, speculator
        self.device, self.precision, self.dtype = parts.device, parts.precision, parts.precision.compute
        self.model, self.tokenizer = parts.model, parts.tokenizer
        self.model_config: ModelConfig = parts.model.config
        self.pool, self.limits, self.panels = parts.pool, parts.limits, parts.panels
        self.block_manager, self.scheduler, self.runner = parts.block_manager, parts.scheduler, parts.runner
        self.grammars, self.speculator = parts.grammars, parts.speculator
        self.adapters = parts.adapters  # LoRA adapters (engine/lora.py); None when off
        self.requests: dict[str, Request] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.sequences_finished: dict[str, int] = {}  # by finish reason

    # ---- requests --------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; raises (EngineLimits.check_request) for one that can never be served."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.limits.check_request(prompt_token_ids, params)
        adapter = self._adapter(params.adapter)
        seqs = [Sequence(request_id, i, prompt_token_ids, params, self._decoding(prompt_token_ids, params), adapter)
                for i in range(params.n)]
        req = Request(request_id, list(prompt_token_ids), params, seqs, parked=seqs[1:])
        self.requests[request_id] = req
        self.scheduler.add(seqs[0])
        self.prompt_tokens += len(prompt_token_ids)

    def _adapter(self, name: str | None):
        if name is None:
            return None
        if self.adapters is None:
            raise AdapterNotFoundError(name, [])
        return self.adapters.find(name)

    # ---- LoRA adapters (engine/lora.py) --------------------------------------------------
    def load_lora(self, name: str, path: str) -> None:
        """Serve the PEFT adapter at `path` as `name`; AdapterError when it can't be."""
        if self.adapters is None:
            raise AdapterError("LoRA adapters are off on this server (start it with --enable-lora)")
        self.adapters.add(name, path)

    def unload_lora(self, name: str) -> None:
        """Forget adapter `name`; its running requests finish. AdapterNotFoundError if unknown."""
        if self.adapters is None:
            raise AdapterNotFoundError(name, [])
        self.adapters.remove(name)

    def lora_adapters(self) -> dict[str, str]:
        """The loaded adapters' folders, by name."""
        return {} if self.adapters is None else {a.name: a.path for a in self.adapters.adapters.values()}

    def _decoding(self, prompt_token_ids: list[int], params: SamplingParams) -> Decoding:
        n, tok = len(prompt_token_ids), self.tokenizer
        max_output = min(self.limits.max_new_tokens(n, params), self.limits.max_model_len - n)
        matcher = None if params.grammar is None else self.grammars.matcher(params.grammar)
        return Decoding(StreamDetokenizer(tok, params.stop, params.include_stop_str_in_output), params,
                        tok.eos_token_id, max_output, matcher)

    def prepare_grammar(self, grammar: str) -> Future:
        """Compile (and probe) a grammar on the grammar threads, before its request is added,
        so that add_request only copies it; callable from any thread. The future's exception
        is the GrammarError that add_request would raise."""
        return self.grammars.prepare(grammar)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> RequestOutput | None:
        """End a request now, its blocks freed; the output says so (None: no such request)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        choices = []
        for seq in req.seqs:
            if not seq.is_finished:
                self._finish(seq, reason, None, flush=False)
                choices.append(ChoiceDelta(seq.index, "", [], finish_reason=reason))
        return RequestOutput(request_id, req.prompt_token_ids, choices, finished=True)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- the step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running)
        batch = self.scheduler.schedule()
        if not batch:
            return []
        scored = batch.scored  # before the step counts its tokens as computed
        try:
            due = batch.due
            masks = self.grammars.start_masks([s.matcher for s in due])
            sampled, out = self.runner.run(batch, masks)
        except Exception as e:  # noqa: BLE001 - a failed forward fails its batch, not the engine
            log.exception("model step failed; failing the %d requests in it", batch.num_tokens)
            reqs = {s.request_id for s in batch.decodes + batch.verifies} | {s.request_id for s, _ in batch.prefills}
            return [self._fail(rid, f"model step failed: {e!r}") for rid in reqs]
        for seq, n in batch.computed:
            seq.num_computed_tokens += n
            self.block_manager.commit_computed(seq)  # blocks that became full join the prefix cache
        touched: dict[str, Request] = {}
        failed: list[RequestOutput] = []
        for seq, tokens, logprobs, details in rows_by_sequence(sampled, out.token_ids, out.logprobs, out.details):
            req = self.requests.get(seq.request_id)
            if req is None or seq.is_finished:
                continue
            try:
                if seq.guesses:
                    self.speculator.accept(seq, tokens, logprobs, details, self._append_token)
                else:
                    self._append_token(seq, tokens[0], logprobs[0], details[0])
            except Exception as e:  # noqa: BLE001 - one request's failure stays its own
                grammar = isinstance(e, GrammarError)  # its grammar broke a limit the admission probe did not reach
                log.log(logging.WARNING if grammar else logging.ERROR, "request %s failed: %s", seq.request_id, e,
                        exc_info=not grammar)
                failed.append(self._fail(seq.request_id, str(e) if grammar else repr(e), grammar=grammar))
                touched.pop(seq.request_id, None)
                continue
            touched[seq.request_id] = req
            if seq.index == 0 and req.parked:  # the prompt is cached now: siblings share it
                self.scheduler.add_next(req.parked)
                req.parked = []
        for seq in scored:  # prompt-only (max_tokens 0): done once the prompt is read and scored
            req = self.requests.get(seq.request_id)
            if req is not None and not seq.is_finished:
                for choice in req.seqs:  # n choices of the same nothing: the parked siblings end unrun
                    self._finish(choice, FinishReason.LENGTH, None)
                req.parked = []
                touched[seq.request_id] = req
        if self.speculator is not None:
            self.speculator.log_progress()
        return failed + [self._output(req) for req in touched.values()]

    def _append_token(self, seq: Sequence, token: int, logprob, detail=None) -> None:
        seq.append_output(token, logprob, detail)
        self.generation_tokens += 1
        text, finish = seq.decoding.next_token(token, seq.num_output_tokens)
        seq.new_text += text
        if finish is not None:
            self._finish(seq, finish.reason, finish.stop_reason, finish.flush)

    def _finish(self, seq: Sequence, reason: FinishReason, stop_reason, flush: bool = True) -> None:
        if flush:
            seq.new_text += seq.decoding.detokenizer.flush()
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.scheduler.finish(seq)
        if self.speculator is not None:
            self.speculator.release(seq)
        self.sequences_finished[reason.value] = self.sequences_finished.get(reason.value, 0) + 1

    def _fail(self, request_id: str, message: str, grammar: bool = False) -> RequestOutput:
        """End the request as failed; `grammar`: by its own grammar, not by the engine."""
        self.abort(request_id, FinishReason.ERROR)
        return RequestOutput(request_id, [], [], finished=True, error=message, grammar_failed=grammar)

    def _output(self, req: Request) -> RequestOutput:
        choices = [delta for delta in (seq.take_delta() for seq in req.seqs) if delta is not None]
        finished = all(s.is_finished for s in req.seqs)
        out = RequestOutput(req.request_id, req.prompt_token_ids, choices, finished,
                            num_cached_tokens=req.seqs[0].num_cached_tokens)
        if not req.sent_first:
            req.sent_first = True
            out.prompt_logprobs = req.seqs[0].prompt_logprobs
        if finished:
            del self.requests[req.request_id]
        return out

    # ---- introspection -------------------------------------------------------------------
    def inspect(self, prompt_token_ids: list[int], top_k: int, decimals: int) -> Inspection:
        """Attention of every layer and head over one prompt, and its top next tokens."""
        self.limits.check_request(prompt_token_ids, SamplingParams(max_tokens=1))
        return self.runner.inspect(prompt_token_ids, top_k, decimals)

    def explain(self, prompt_token_ids: list[int], position: int, top_k: int, decimals: int) -> Explanation:
        """One prompt through the model step by step, read at token `position` (ModelRunner.explain)."""
        self.limits.check_request(prompt_token_ids, SamplingParams(max_tokens=1))
        if not 0 <= position < len(prompt_token_ids):
            raise InvalidPromptError(f"position {position} is outside the prompt's {len(prompt_token_ids)} tokens")
        return self.runner.explain(prompt_token_ids, position, top_k, decimals)

    def embed(self, prompts: list[list[int]]) -> list[list[float]]:
        """Each prompt's embedding (ModelRunner.embed); raises for a prompt the model can't read."""
        for ids in prompts:
            self.limits.check_prompt(ids)
        return [self.runner.embed(ids) for ids in prompts]

    def release(self) -> None:
        """Drop the weights, the KV pool and the adapters' slots, once the step loop has
        stopped for good (a model registry unloads this engine); the counters stay readable."""
        self.model = self.pool = self.runner = self.speculator = None
        self.adapters = self.scheduler.adapters = None
        gc.collect()
        release_freed_memory()

    def memory_bytes(self) -> int:
        """What this engine holds: weights as held, the KV pool, the LoRA slots."""
        tensors = itertools.chain(self.model.parameters(), self.model.buffers(), [self.pool.kv])
        held = sum(t.numel() * t.element_size() for t in tensors)
        return held + (self.adapters.stack.nbytes() if self.adapters is not None else 0)

    def stats(self) -> EngineStats:
        bm, sch = self.block_manager, self.scheduler
        spec = self.speculator.stats if self.speculator is not None else SpeculationStats()
        running = {s.request_id for s in sch.running}
        return EngineStats(
            num_requests_running=len(running), num_requests_waiting=len(self.requests) - len(running),
            kv_blocks_total=bm.num_blocks, kv_blocks_used=bm.num_used_blocks,
            prefix_cache_queries=bm.prefix_queries, prefix_cache_hits=bm.prefix_hits,
            num_preemptions=sch.num_preemptions, prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens, sequences_finished=dict(self.sequences_finished),
            spec_draft_tokens=dict(spec.draft_tokens), spec_accepted_tokens=dict(spec.accepted_tokens))

    # ---- offline use -----------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
                 ) -> list[list[list[int]]]:
        """Run prompts to completion; return each request's choices' output token ids."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"offline-{i}-{id(prompts)}" for i in range(len(prompts))]
        results: dict[str, list[list[int]]] = {}
        for rid, prompt, p in zip(ids, prompts, plist):
            self.add_request(rid, prompt, p)
            results[rid] = [[] for _ in range(p.n)]
        while self.has_unfinished():
            for out in self.step():
                if out.error:
                    raise RuntimeError(out.error)
                for c in out.choices:
                    results[out.request_id][c.index].extend(c.token_ids)
        return [results[r] for r in ids]

