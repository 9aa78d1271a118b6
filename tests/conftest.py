"""Shared fixtures: GPT-2 checkpoints built here with transformers, random weights, no downloads.

- `tiny_checkpoint`: a pathlib.Path to a complete model folder (config.json, model.safetensors,
  vocab.json, merges.txt) of GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256),
  random weights from torch.manual_seed(0). Built once per session; treat it as read-only.
- `make_checkpoint(shape="tiny", seed=0, weights="safetensors", max_shard_size=None, **config)`:
  the factory behind it, for variants. `shape` is "tiny" or "gpt2-small" (see SHAPES);
  `config` overrides GPT2Config fields of that shape; `weights` is "safetensors"
  (save_pretrained) or "bin" (pytorch_model.bin, the same weights as the safetensors
  built from equal arguments); `max_shard_size` (e.g. "2MB") shards the safetensors under
  model.safetensors.index.json. Equal arguments give the same folder, built once.
- `gpt2_small_checkpoint`: the real GPT-2 small shape (124M parameters), random, safetensors.
- `prometheus_value(text, name, **labels)`: a series' value in a /metrics page.
- `greedy_decode(model, prompt, n)`: the reference greedy continuation, our GPT2 with a
  DenseAttention KV cache, one sequence alone.
- `make_adapter(base, seed=0, **lora_config)`: a LoRA adapter folder saved by peft itself
  (`get_peft_model(...).save_pretrained`) for the checkpoint folder `base`, its A and B
  both random (`init_lora_weights=False`, so it changes the output); `lora_config` overrides
  LoraConfig fields (default: r=8, lora_alpha=16, target_modules c_attn, c_proj, c_fc).

Every test runs offline: HF_HUB_OFFLINE is set before anything imports huggingface_hub.
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never download; set before huggingface_hub reads it
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from gptserve.model.attention import DenseAttention  # noqa: E402
from gptserve.model.gpt2 import GPT2  # noqa: E402
from gptserve.weights.loader import DEFAULT_MODEL_DIR  # noqa: E402

SHAPES = {
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "gpt2-small": dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024),  # 124M
}
TOKENIZER_FILES = ("vocab.json", "merges.txt")


def build_checkpoint(folder: Path, shape: str = "tiny", seed: int = 0,
                     max_shard_size: str | None = None, **config) -> Path:
    """Save a random GPT2LMHeadModel with save_pretrained, tokenizer files included."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**{**SHAPES[shape], **config})).eval()
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    for name in TOKENIZER_FILES:
        shutil.copy(DEFAULT_MODEL_DIR / name, folder / name)
    return folder


def convert_to_bin(safetensors_folder: Path, folder: Path) -> Path:
    """The same weights as pytorch_model.bin, laid out as save_pretrained(safe_serialization=False)
    wrote it before transformers 5 (which saves safetensors only): the full state dict, the
    tied lm_head.weight included, through torch.save."""
    from safetensors.torch import load_file

    state = load_file(safetensors_folder / "model.safetensors")
    state["lm_head.weight"] = state["transformer.wte.weight"]  # tied: one storage in the file
    torch.save(state, folder / "pytorch_model.bin")
    for name in ("config.json", *TOKENIZER_FILES):
        shutil.copy(safetensors_folder / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory) -> Callable[..., Path]:
    """Factory of checkpoint folders, cached per session by its arguments."""
    built: dict[tuple, Path] = {}

    def make(shape: str = "tiny", seed: int = 0, weights: str = "safetensors",
             max_shard_size: str | None = None, **config) -> Path:
        key = (shape, seed, weights, max_shard_size, tuple(sorted(config.items())))
        if key in built:
            return built[key]
        folder = tmp_path_factory.mktemp(f"{shape}-{weights}-s{seed}")
        if weights == "safetensors":
            built[key] = build_checkpoint(folder, shape, seed, max_shard_size, **config)
        elif weights == "bin" and max_shard_size is None:
            built[key] = convert_to_bin(make(shape, seed, **config), folder)
        else:
            raise ValueError(f"unsupported checkpoint variant weights={weights!r}, "
                             f"max_shard_size={max_shard_size!r}")
        return built[key]

    return make


ADAPTER_DEFAULTS = dict(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"])


def build_adapter(folder: Path, base: Path, seed: int = 0, **lora_config) -> Path:
    """Save a random peft LoRA adapter of the model at `base`."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(base)
    torch.manual_seed(seed)
    config = LoraConfig(**{**ADAPTER_DEFAULTS, **lora_config}, init_lora_weights=False, fan_in_fan_out=True)
    get_peft_model(model, config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def make_adapter(tmp_path_factory) -> Callable[..., Path]:
    """Factory of peft adapter folders, cached per session by their arguments."""
    built: dict[tuple, Path] = {}

    def make(base: Path, seed: int = 0, **lora_config) -> Path:
        key = (str(base), seed, repr(sorted(lora_config.items())))
        if key not in built:
            built[key] = build_adapter(tmp_path_factory.mktemp(f"lora-s{seed}"), base, seed, **lora_config)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(make_checkpoint) -> Path:
    """GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256), seed 0, safetensors."""
    return make_checkpoint()


@pytest.fixture(scope="session")
def gpt2_small_checkpoint(make_checkpoint) -> Path:
    """The real GPT-2 small shape (124M parameters), random weights, seed 0, safetensors."""
    return make_checkpoint(shape="gpt2-small")


def prometheus_value(text: str, name: str, **labels: str) -> float:
    """The value of the samples `name` (counters end in _total) whose labels include
    `labels`, in Prometheus' text format, summed over the rest (one per model); 0.0 if none."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def _greedy_decode(model: GPT2, prompt: list[int], n: int) -> list[int]:
    attn = DenseAttention(batch_size=1)
    tokens: list[int] = []
    with torch.inference_mode():
        hidden = model(torch.tensor(prompt), torch.arange(len(prompt)), attn)
        for i in range(n):
            tokens.append(int(model.logits(hidden[-1:])[0].argmax()))
            hidden = model(torch.tensor(tokens[-1:]), torch.tensor([len(prompt) + i]), attn)
    return tokens


@pytest.fixture(scope="session")
def greedy_decode() -> Callable[[GPT2, list[int], int], list[int]]:
    """The `n` greedy tokens after `prompt`, decoded alone with a DenseAttention KV cache."""
    return _greedy_decode
