"""A model whose vocabulary is padded past the tokenizer's (50304 rows for 50257 tokens, as
GPT-2 checkpoints trained with padded embeddings have): the rows no token names are never
sampled, guessed, listed among logprobs or inspected, even when they would win every step."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptserve.config import EngineConfig, SpeculativeConfig
from gptserve.engine.llm_engine import LLMEngine
from gptserve.engine.sampling_params import SamplingParams
from gptserve.model.attention import DenseAttention
from tests.engine.conftest import random_prompts

TOKENS = 50257  # the GPT-2 tokenizer's
PADDED = 50304


def dominant_padding(source: Path, folder: Path) -> Path:
    """`source` (a padded checkpoint) with each padding row 50x a real token's embedding:
    whenever that token's logit is positive, its padding twin's is 50x it."""
    shutil.copytree(source, folder)
    state = load_file(folder / "model.safetensors")
    wte = state["transformer.wte.weight"]
    wte[TOKENS:] = 50 * wte[:PADDED - TOKENS]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == PADDED
    return folder


@pytest.fixture(scope="module")
def padded_checkpoints(make_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    """The model and a one-layer draft of it, both padded."""
    root = tmp_path_factory.mktemp("padded")
    return (dominant_padding(make_checkpoint(vocab_size=PADDED), root / "model"),
            dominant_padding(make_checkpoint(vocab_size=PADDED, n_layer=1), root / "draft"))


@pytest.mark.parametrize("dtype, method", [("float32", None), ("bfloat16", None), ("bfloat16", "ngram"),
                                           ("bfloat16", "draft")], ids=["float32", "bfloat16", "ngram", "draft"])
def test_padding_rows_are_never_chosen_listed_or_inspected(padded_checkpoints, dtype, method):
    model, draft = padded_checkpoints
    speculative = SpeculativeConfig(method, num_speculative_tokens=3, draft_model=str(draft)) if method else None
    engine = LLMEngine(str(model), EngineConfig(kv_cache_memory=4 * 2**20, dtype=dtype, speculative=speculative))
    assert engine.model_config.vocab_size == PADDED and engine.limits.vocab_size == TOKENS
    with torch.inference_mode():  # the padding would win: the check is not vacuous
        hidden = engine.model(torch.tensor([464, 2068]), torch.arange(2), DenseAttention(batch_size=1))
        assert int(engine.model.logits(hidden[-1:]).argmax()) >= TOKENS
    prompts = random_prompts(3, 5, 30, seed=31)
    params = [SamplingParams(max_tokens=12, temperature=0, logprobs=5, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=2.0, top_k=10**9, logprobs=5, ignore_eos=True),
              SamplingParams(max_tokens=0, prompt_logprobs=True, logprobs=5)]
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", prompt, p)
    seen: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None, out.error
            for lp in out.prompt_logprobs or []:
                if lp is not None:
                    seen.extend(t for t, _ in lp.top)
            for c in out.choices:
                seen.extend(c.token_ids)
                seen.extend(t for lp in c.logprobs or [] for t, _ in lp.top)
    assert seen and max(seen) < TOKENS
    assert all(t < TOKENS for t, _ in engine.inspect(prompts[0], 20, 4).top_next_tokens)

