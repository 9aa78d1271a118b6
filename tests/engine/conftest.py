"""Engine fixtures: a fresh LLMEngine on the tiny checkpoint, and the plain-model reference.

Engine tests run in four variants (`engine_variant`): float32 without speculative decoding
and with each method, and without it at the precision `--dtype auto` resolves to on this
machine (what `gptserve serve` runs; on a CPU with the compiled kernel, bfloat16 weights
with float32 compute), when that is not float32. References built from `engine.model` are
at the engine's own precision; a test that compares to the plain float32 model pins
dtype="float32"."""
from __future__ import annotations

import pytest
import torch

from gptserve.config import EngineConfig, SpeculativeConfig
from gptserve.engine.llm_engine import LLMEngine
from gptserve.engine.placement import resolve_precision
from gptserve.model.attention import DenseAttention
from gptserve.model.gpt2 import GPT2
from gptserve.model.panel_linear import PanelLinear
from tests.model.panel_reference import uses_dot_products

NEAR_TIE = 1e-4  # batched float rounding may flip only a genuine near-tie
# With the CPU's dot-product kernels (avx512_dot) the activations of 16- and 8-bit layers are
# rounded to bfloat16 or int8 first: a last-bit difference upstream (prefill attention where
# the alone run decoded, after a preemption) can move one activation a whole rounding step
# (2^-8 of it in bfloat16), so logits agree to about 1e-3 there, not 1e-4.
DOT_TOLERANCE = 2e-3


def tolerance(model: GPT2) -> float:
    """How far a logprob (and the top-2 gap of a flipped near-tie) may differ from the alone run."""
    dot = any(uses_dot_products(m) for m in model.modules() if isinstance(m, PanelLinear))
    return DOT_TOLERANCE if dot else NEAR_TIE
AUTO = resolve_precision("auto", None, torch.device("cpu"))  # the default precision here


def _variants() -> list:
    """(speculative method, dtype option) pairs, named for their test ids."""
    variants = [pytest.param((method, "float32"), id=f"{method}-float32") for method in ("plain", "ngram", "draft")]
    if AUTO.weights != "float32":
        variants.append(pytest.param(("plain", "auto"), id=f"plain-{AUTO.weights}-weights"))
    return variants


@pytest.fixture(scope="session")
def tiny_draft_checkpoint(make_checkpoint):
    """A draft for the tiny checkpoint: its first layer alone (same seed, so the same
    embeddings and first block), so its greedy guesses are right some of the time."""
    return make_checkpoint(seed=0, n_layer=1)


@pytest.fixture(params=_variants())
def engine_variant(request) -> tuple[str, str]:
    """Every engine test runs in each variant (the module's docstring) and must pass the same."""
    return request.param


@pytest.fixture
def speculation(engine_variant, tiny_draft_checkpoint) -> SpeculativeConfig | None:
    """The variant's speculative decoding: none, or a method guessing in batches of any size."""
    method = engine_variant[0]
    if method == "plain":
        return None
    return SpeculativeConfig(method, num_speculative_tokens=3, draft_model=str(tiny_draft_checkpoint),
                             max_batch=1024)


@pytest.fixture
def precision(engine_variant) -> str:
    """The variant's --dtype: float32, or auto."""
    return engine_variant[1]


@pytest.fixture
def make_engine(tiny_checkpoint, speculation, precision):
    """Build an engine on the tiny checkpoint; checks that every block is free afterwards
    (the draft's too)."""
    engines: list[LLMEngine] = []

    def make(**overrides) -> LLMEngine:
        cfg = EngineConfig(**{"kv_cache_memory": 4 * 2**20, "dtype": precision, "speculative": speculation,
                              **overrides})
        engine = LLMEngine(str(tiny_checkpoint), cfg)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        assert not engine.has_unfinished()
        assert engine.block_manager.num_used_blocks == 0, "KV blocks leaked"
        proposer = engine.speculator.proposer if engine.speculator is not None else None
        if proposer is not None and hasattr(proposer, "block_manager"):
            assert proposer.block_manager.num_used_blocks == 0, "draft KV blocks leaked"


def greedy_alone(model: GPT2, prompt: list[int], n: int) -> tuple[list[int], list[float], list[float]]:
    """Greedy tokens of `prompt` run alone through the plain model, each one's logprob, and
    each step's gap between the two best logits."""
    attn = DenseAttention(batch_size=1)
    tokens, logprobs, gaps = [], [], []
    with torch.inference_mode():
        hidden = model(torch.tensor(prompt), torch.arange(len(prompt)), attn)
        for i in range(n):
            logits = model.logits(hidden[-1:])[0].float()
            top2 = logits.topk(2).values
            gaps.append(float(top2[0] - top2[1]))
            tok = int(logits.argmax())
            tokens.append(tok)
            logprobs.append(float(torch.log_softmax(logits, -1)[tok]))
            hidden = model(torch.tensor([tok]), torch.tensor([len(prompt) + i]), attn)
    return tokens, logprobs, gaps


def assert_same_greedy(got: list[int], prompt: list[int], model: GPT2,
                       got_logprobs: list[float] | None = None) -> None:
    """`got` equals the alone-run tokens (and logprobs within `tolerance`, when given), except
    after a divergence at a genuine near-tie."""
    want, want_lp, gaps = greedy_alone(model, prompt, len(got))
    tol = tolerance(model)
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            assert gaps[i] < tol, f"token {i} differs ({a} vs {b}) with top-2 gap {gaps[i]:.2e}"
            return
        if got_logprobs is not None:
            assert abs(got_logprobs[i] - want_lp[i]) < tol, f"token {i}: logprob {got_logprobs[i]} vs {want_lp[i]}"
    assert len(got) == len(want)


def run_collect(engine, prompts: list[list[int]], params) -> list[tuple[list[int], list[float]]]:
    """Run prompts together; return each one's first choice tokens and chosen-token logprobs."""
    plist = params if isinstance(params, list) else [params] * len(prompts)
    got = {f"r{i}": ([], []) for i in range(len(prompts))}
    for i, (prompt, p) in enumerate(zip(prompts, plist)):
        engine.add_request(f"r{i}", prompt, p)
    while engine.has_unfinished():
        for out in engine.step():
            for c in out.choices:
                if c.index == 0:
                    got[out.request_id][0].extend(c.token_ids)
                    got[out.request_id][1].extend(lp.logprob for lp in c.logprobs or [])
    return [got[f"r{i}"] for i in range(len(prompts))]


def random_prompts(count: int, low: int, high: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=g).tolist()
    return [torch.randint(0, 50257, (n,), generator=g).tolist() for n in lengths]
