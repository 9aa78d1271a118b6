"""Read a LoRA adapter saved by PEFT, and check that it fits the base model.

A PEFT adapter is a folder with `adapter_config.json` and `adapter_model.safetensors`
(or `adapter_model.bin`). Its tensors are named after the base model's modules:
`base_model.model.transformer.h.3.attn.c_attn.lora_A.weight` (r, in) and `...lora_B.weight`
(out, r). GPT-2's Conv1D layers store their weight (in, out), which PEFT notes as
`fan_in_fan_out`; A and B themselves are in nn.Linear's layout either way. The scaling is
`lora_alpha / r` (`lora_alpha / sqrt(r)` with `use_rslora`), per layer where
`rank_pattern` / `alpha_pattern` set them. What this server can't apply (DoRA, trained
biases, `modules_to_save`, adapters on the embeddings or the head) is refused by name.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from gptserve.config import ModelConfig
from gptserve.model.lora import TARGETS, LoRAWeights, target_shape

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_KEY = re.compile(r"(?:.*\.)?h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.lora_([AB])(?:\.[^.]+)?\.weight")


class LoRAError(ValueError):
    """An adapter that can't be read or doesn't fit the base model; the message says why."""


def read_lora(path: str | Path, cfg: ModelConfig, max_rank: int) -> LoRAWeights:
    """The adapter in folder `path`, checked against the base model's shape `cfg` and the
    server's `max_rank`; raises LoRAError."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise LoRAError(f"no adapter folder at {path}")
    config = _read_config(folder)
    tensors = _read_tensors(folder)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise LoRAError(f"the adapter has a tensor {key!r}; only LoRA A/B weights of the layers "
                            f"{', '.join(TARGETS)} can be applied")
        layer, target, side = int(m.group(1)), m.group(2), m.group(3)
        if layer >= cfg.n_layer:
            raise LoRAError(f"the adapter updates layer {layer}, the base model has {cfg.n_layer}")
        pairs.setdefault((layer, target), {})[side] = tensor
    if not pairs:
        raise LoRAError("the adapter holds no LoRA weights")
    layers, top_rank = {}, 0
    for (layer, target), ab in sorted(pairs.items()):
        name = f"transformer.h.{layer}.{target}"  # the module's name in transformers' GPT2LMHeadModel
        if set(ab) != {"A", "B"}:
            raise LoRAError(f"the adapter has lora_{next(iter(ab))} but not its pair for {name}")
        a, b = ab["A"].float(), ab["B"].float()
        fan_in, fan_out = target_shape(cfg, target)
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != fan_in or b.shape != (fan_out, r):
            raise LoRAError(f"{name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} don't fit the base "
                            f"model's layer ({fan_in} in, {fan_out} out): expected ({r}, {fan_in}) and "
                            f"({fan_out}, {r})")
        if r > max_rank:
            raise LoRAError(f"{name} has rank {r}; this server takes ranks up to {max_rank} (--max-lora-rank)")
        layers[(layer, target)] = (a.contiguous(), (b * _scaling(config, name, r)).contiguous())
        top_rank = max(top_rank, r)
    return LoRAWeights(top_rank, layers)


def _read_config(folder: Path) -> dict:
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise LoRAError(f"{folder} has no {CONFIG_FILE}: not a PEFT adapter")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoRAError(f"{CONFIG_FILE} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise LoRAError(f"{CONFIG_FILE} is not a JSON object")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise LoRAError(f"the adapter is {config.get('peft_type')}, not LoRA")
    if config.get("use_dora"):
        raise LoRAError("DoRA adapters (use_dora) are not supported")
    if config.get("bias", "none") != "none":
        raise LoRAError(f"adapters with trained biases (bias={config.get('bias')!r}) are not supported")
    if config.get("modules_to_save"):
        raise LoRAError(f"adapters with modules_to_save ({config.get('modules_to_save')}) are not supported")
    alpha, r = config.get("lora_alpha", 8), config.get("r", 8)
    if not isinstance(alpha, (int, float)) or not isinstance(r, int) or r <= 0:
        raise LoRAError(f"{CONFIG_FILE}: r must be a positive integer and lora_alpha a number")
    return config


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHT_FILES:
        file = folder / name
        if file.is_file():
            break
    else:
        raise LoRAError(f"{folder} has no {' or '.join(WEIGHT_FILES)}")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        tensors = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say which
        raise LoRAError(f"cannot read {file.name}: {e}") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise LoRAError(f"{file.name} is not a dict of tensors")
    return tensors


def _scaling(config: dict, module: str, r: int) -> float:
    """PEFT's scaling of one module: alpha / r, or alpha / sqrt(r) with rsLoRA, with the
    module's own alpha where alpha_pattern names it (rank_pattern's r is the tensors' r)."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):  # as PEFT matches a pattern
            alpha = value
            break
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
