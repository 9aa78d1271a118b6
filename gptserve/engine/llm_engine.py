"""The step loop: admit requests, schedule, run the model once, turn tokens into deltas.

Synchronous and single-threaded by design: it owns the model, the KV pool, the scheduler
and every request's state, and nothing else touches them. `AsyncEngine` drives it from
one thread; offline callers (`generate`, the CLI) drive it directly.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from gptserve.config import EngineConfig, ModelConfig
from gptserve.engine.block_manager import BlockManager
from gptserve.engine.detokenizer import StreamDetokenizer
from gptserve.engine.grammar import GrammarCompiler
from gptserve.grammar_limits import describe
from gptserve.engine.limits import EngineLimits
from gptserve.engine.model_runner import ModelRunner
from gptserve.engine.outputs import ChoiceDelta, EngineStats, FinishReason, GrammarError, Inspection, RequestOutput
from gptserve.engine.placement import (bind_device, kv_cache_bytes, profile_gpu_memory, resolve_device,
                                        resolve_precision)
from gptserve.engine.sampler import Sampler
from gptserve.engine.sampling_params import SamplingParams
from gptserve.engine.scheduler import Scheduler
from gptserve.engine.sequence import Sequence, SequenceStatus, VerifyRow
from gptserve.engine.speculative import SpeculationStats, accepted_count, build_proposer
from gptserve.model.attention import KVPool
from gptserve.model.cpu_kernels import paged_decode
from gptserve.model.gpt2 import GPT2
from gptserve.model.compact_linear import WEIGHT_FORMATS, compact_for_cpu
from gptserve.model.packed_linear import pack_for_cpu
from gptserve.model.tokenizer import Tokenizer
from gptserve.weights.loader import load_model, resolve_model_path

log = logging.getLogger(__name__)


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    parked: list[Sequence] = field(default_factory=list)  # n > 1 siblings, admitted after the prompt is cached
    sent_first: bool = False


class LLMEngine:
    def __init__(self, model: str | None, config: EngineConfig | None = None,
                 loaded: tuple[GPT2, Tokenizer] | None = None):
        self.config = config = config or EngineConfig()
        self.device = resolve_device(config.device)
        bind_device(self.device)  # this thread's CUDA work (load, graphs, Triton) goes to our GPU: bind first
        self.precision = resolve_precision(config.dtype, config.quantization, self.device)
        self.dtype = self.precision.compute
        if loaded is None:
            path = resolve_model_path(model)
            self.tokenizer = Tokenizer.from_folder(path)
            self.model = load_model(path, self.device, self.dtype)
        else:
            self.model, self.tokenizer = loaded
        self.model_config: ModelConfig = self.model.config
        mc = self.model_config
        max_model_len = min(config.max_model_len or mc.n_positions, mc.n_positions)
        weights_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        per_block = KVPool.bytes_per_block(mc.n_layer, config.block_size, mc.n_head, mc.head_dim, self.dtype)
        budget = kv_cache_bytes(self.device, config.kv_cache_memory, config.gpu_memory_utilization,
                                weights_bytes, profile_gpu_memory(self.model, config, max_model_len))
        num_blocks = max(1, budget // per_block - 1)  # one more block is the pool's scratch block
        self.pool = KVPool(mc.n_layer, num_blocks, config.block_size, mc.n_head, mc.head_dim,
                           self.dtype, self.device)
        # a model's vocabulary may be padded past the tokenizer's: no token names those rows
        vocab_size = min(mc.vocab_size, self.tokenizer.vocab_size)
        self.limits = EngineLimits(max_model_len, vocab_size, num_blocks * config.block_size)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        sampler = Sampler(vocab_size, self.device, config.seed)
        graph_sizes = () if config.enforce_eager else tuple(
            b for b in config.cuda_graph_batch_sizes if b <= config.max_num_seqs)
        self.runner = ModelRunner(self.model, self.pool, sampler, max_model_len, graph_sizes)
        if self.device.type == "cpu" and self.dtype == torch.float32:
            paged_decode()  # build (or load the cached build of) the CPU kernel now, not mid-request
        if self.device.type == "cpu" and self.precision.weights in WEIGHT_FORMATS:
            compact_for_cpu(self.model, self.precision.weights)  # 16- or 8-bit weights, float32 math
            self.packed = False
        else:
            self.packed = pack_for_cpu(self.model)  # oneDNN-packed linear layers (CPU float32)
        self.proposer = None
        if config.speculative is not None:
            self.proposer = build_proposer(config.speculative, mc, vocab_size, self.device, self.dtype,
                                           num_blocks, config.block_size, max_model_len)
        self.spec_stats = SpeculationStats()
        self._spec_logged = (time.monotonic(), 0)  # when the last log line was written, at how many guesses
        self.requests: dict[str, Request] = {}
        self.grammars = GrammarCompiler(self.tokenizer, vocab_size)  # cheap until a grammar comes
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.sequences_finished: dict[str, int] = {}  # by finish reason
        log.info("engine ready: %s on %s (%s%s), %d KV blocks of %d tokens (%.0f MiB), max_model_len %d",
                 model or "default model", self.device, self.precision,
                 ", oneDNN-packed linear layers" if self.packed else "",
                 num_blocks, config.block_size, num_blocks * per_block / 2**20, max_model_len)

    # ---- requests --------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; raises (EngineLimits.check_request) for one that can never be served."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.limits.check_request(prompt_token_ids, params)
        tok = self.tokenizer
        seqs = [Sequence(request_id, i, prompt_token_ids, params,
                         StreamDetokenizer(tok, params.stop, params.include_stop_str_in_output))
                for i in range(params.n)]
        if params.grammar is not None:
            for seq in seqs:
                seq.matcher = self.grammars.matcher(params.grammar)
        req = Request(request_id, list(prompt_token_ids), params, seqs, parked=seqs[1:])
        self.requests[request_id] = req
        self.scheduler.add(seqs[0])
        self.prompt_tokens += len(prompt_token_ids)

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
        if self.proposer is not None:
            self._propose()
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
        for seq, tokens, logprobs in _by_sequence(sampled, out.token_ids, out.logprobs):
            req = self.requests.get(seq.request_id)
            if req is None or seq.is_finished:
                continue
            try:
                self._append_tokens(seq, tokens, logprobs)
            except GrammarError as e:  # its grammar broke a limit the admission probe did not reach
                log.warning("request %s: %s", seq.request_id, e)
                failed.append(self._fail(seq.request_id, str(e), grammar=True))
                touched.pop(seq.request_id, None)
                continue
            except Exception as e:  # noqa: BLE001 - one request's failure stays its own
                log.exception("request %s failed", seq.request_id)
                failed.append(self._fail(seq.request_id, repr(e)))
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
        if self.proposer is not None:
            self._log_speculation()
        return failed + [self._output(req) for req in touched.values()]

    # ---- speculative decoding (engine/speculative.py) ------------------------------------
    def _propose(self) -> None:
        """Guess the next tokens of the decoding sequences, unless the batch is large enough
        that verifying guesses costs more than the steps they save."""
        spec = self.config.speculative
        decoding = [s for s in self.scheduler.running if s.status is SequenceStatus.RUNNING and not s.is_prefill]
        if len(decoding) > spec.max_batch:
            return
        decoding = [s for s in decoding if s.spec_backoff.ready()]
        if not decoding:
            return
        room = [(seq, self._guess_room(seq, spec.num_speculative_tokens)) for seq in decoding]
        room = [(seq, k) for seq, k in room if k > 0]
        if not room:
            return
        seqs, ks = zip(*room)
        for seq, guesses in zip(seqs, self.proposer.propose(list(seqs), list(ks))):
            if seq.matcher is not None and guesses:
                guesses = self._grammar_guesses(seq, guesses)
            seq.spec_token_ids = guesses

    def _guess_room(self, seq: Sequence, k: int) -> int:
        """Guesses worth making for seq: a verify emits up to k + 1 tokens, none past
        max_tokens or the context."""
        left = self.limits.max_new_tokens(seq.num_prompt_tokens, seq.params) - seq.num_output_tokens
        return min(k, left - 1, self.limits.max_model_len - len(seq))

    @staticmethod
    def _grammar_guesses(seq: Sequence, guesses: list[int]) -> list[int]:
        """The guesses the grammar allows, and the matcher after each (seq.spec_matchers)."""
        guesses = guesses[:seq.matcher.validate_tokens(guesses)]
        matchers = [seq.matcher]
        for j, token in enumerate(guesses):
            m = matchers[-1].deep_copy()
            m.consume_token(token)
            if m.is_stopped():  # the grammar completes here: no row is sampled after it
                guesses = guesses[:j]
                break
            matchers.append(m)
        seq.spec_matchers = matchers[:len(guesses) + 1]
        return guesses

    def _append_tokens(self, seq: Sequence, tokens: list[int], logprobs: list) -> None:
        """A sequence's tokens of this step: one, or after a verify the guesses that stood
        and the token of the first row that did not confirm one."""
        guesses = seq.spec_token_ids
        if guesses:
            accepted = accepted_count(guesses, tokens)
            self.spec_stats.record(self.proposer.method, len(guesses), accepted)
            seq.spec_backoff.record(len(guesses), accepted, self.config.speculative.min_acceptance)
            tokens, logprobs = tokens[:accepted + 1], logprobs[:accepted + 1]
            seq.spec_token_ids, seq.spec_matchers = [], []
        for token, logprob in zip(tokens, logprobs):
            self._append_token(seq, token, logprob)
            if seq.is_finished:
                return
        if guesses:  # the K/V of the guesses that stood is in the cache; the rest is given back
            seq.num_computed_tokens = len(seq) - 1
            self.block_manager.trim(seq)
            self.block_manager.commit_computed(seq)

    def _log_speculation(self, every_s: float = 10.0) -> None:
        last_time, last_drafted = self._spec_logged
        st = self.spec_stats
        drafted = sum(st.draft_tokens.values())
        if drafted == last_drafted or time.monotonic() - last_time < every_s:
            return
        accepted = sum(st.accepted_tokens.values())
        log.info("speculative decoding (%s): %d guesses verified, %d accepted (%.1f%%), "
                 "%.2f tokens per verified step", self.proposer.method, drafted, accepted,
                 100 * accepted / drafted, (accepted + st.verified_sequences) / max(1, st.verified_sequences))
        self._spec_logged = (time.monotonic(), drafted)

    def _append_token(self, seq: Sequence, token: int, logprob) -> None:
        seq.token_ids.append(token)
        seq.new_token_ids.append(token)
        self.generation_tokens += 1
        if logprob is not None:
            seq.new_logprobs.append(logprob)
        p = seq.params
        if seq.matcher is not None and (not seq.matcher.consume_token(token) or seq.matcher.is_error()):
            # a matcher that failed while its mask was computed allowed EOS alone, and takes it
            raise GrammarError(f"the grammar failed at output token {seq.num_output_tokens}: "
                               f"{describe(seq.matcher.get_error())}")
        if token == self.tokenizer.eos_token_id and (not p.ignore_eos or seq.matcher is not None):
            return self._finish(seq, FinishReason.STOP, None)
        if token in p.stop_token_ids:
            return self._finish(seq, FinishReason.STOP, token)
        text, stop = seq.detokenizer.push(token)
        seq.new_text += text
        if stop is not None:
            return self._finish(seq, FinishReason.STOP, stop, flush=False)
        if seq.matcher is not None and seq.matcher.is_stopped():  # the grammar is complete
            return self._finish(seq, FinishReason.STOP, None)
        if (seq.num_output_tokens >= self.limits.max_new_tokens(seq.num_prompt_tokens, p)
                or len(seq) >= self.limits.max_model_len):
            self._finish(seq, FinishReason.LENGTH, None)

    def _finish(self, seq: Sequence, reason: FinishReason, stop_reason, flush: bool = True) -> None:
        if flush:
            seq.new_text += seq.detokenizer.flush()
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.scheduler.finish(seq)
        if self.proposer is not None:
            self.proposer.release(seq)
        self.sequences_finished[reason.value] = self.sequences_finished.get(reason.value, 0) + 1

    def _fail(self, request_id: str, message: str, grammar: bool = False) -> RequestOutput:
        """End the request as failed; `grammar`: by its own grammar, not by the engine."""
        self.abort(request_id, FinishReason.ERROR)
        return RequestOutput(request_id, [], [], finished=True, error=message, grammar_failed=grammar)

    def _output(self, req: Request) -> RequestOutput:
        choices = []
        for seq in req.seqs:
            ids, text, logprobs = seq.take_news()
            newly_finished = seq.is_finished and not seq.finish_sent
            if ids or text or newly_finished:
                choices.append(ChoiceDelta(
                    seq.index, text, ids, logprobs if seq.params.logprobs is not None else None,
                    seq.finish_reason, seq.stop_reason))
                seq.finish_sent = seq.is_finished
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

    def embed(self, prompts: list[list[int]]) -> list[list[float]]:
        """Each prompt's embedding (ModelRunner.embed); raises for a prompt the model can't read."""
        for ids in prompts:
            self.limits.check_prompt(ids)
        return [self.runner.embed(ids) for ids in prompts]

    def stats(self) -> EngineStats:
        bm, sch = self.block_manager, self.scheduler
        running = {s.request_id for s in sch.running}
        return EngineStats(
            num_requests_running=len(running), num_requests_waiting=len(self.requests) - len(running),
            kv_blocks_total=bm.num_blocks, kv_blocks_used=bm.num_used_blocks,
            prefix_cache_queries=bm.prefix_queries, prefix_cache_hits=bm.prefix_hits,
            num_preemptions=sch.num_preemptions, prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens, sequences_finished=dict(self.sequences_finished),
            spec_draft_tokens=dict(self.spec_stats.draft_tokens),
            spec_accepted_tokens=dict(self.spec_stats.accepted_tokens))

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


def _by_sequence(rows: list, tokens: list[int], logprobs: list) -> list[tuple[Sequence, list[int], list]]:
    """The step's sampled rows grouped by sequence, in row order (a verify has several)."""
    grouped: dict[int, tuple[Sequence, list[int], list]] = {}
    for row, token, logprob in zip(rows, tokens, logprobs):
        seq = row.seq if isinstance(row, VerifyRow) else row
        _, seq_tokens, seq_logprobs = grouped.setdefault(seq.seq_id, (seq, [], []))
        seq_tokens.append(token)
        seq_logprobs.append(logprob)
    return list(grouped.values())
