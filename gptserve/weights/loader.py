"""Find a GPT-2 checkpoint and load it onto a device without a second full copy.

A model is a Hugging Face layout folder: config.json, then model.safetensors, or
pytorch_model.bin, or shards listed in model.safetensors.index.json /
pytorch_model.bin.index.json. `--model` may also be a Hub id, looked up in the local
HF cache first and downloaded only when the machine is online.

The model is built on the meta device, materialised empty on the target device and
dtype, then filled one tensor at a time, so peak memory is the model plus one tensor.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from gptserve.config import ModelConfig
from gptserve.model.gpt2 import GPT2
from gptserve.model.panel_linear import PanelLinear, panels_for_cpu

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"
DEFAULT_DRAFT_DIR = Path(__file__).parent / "default_draft"  # its speculative-decoding draft
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # HF's causal-mask buffers
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")
HUB_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json",
                "vocab.json", "merges.txt", "generation_config.json"]


class CheckpointError(ValueError):
    """The checkpoint can't be found or isn't a loadable GPT-2."""


def resolve_model_path(model: str | None) -> Path:
    """A folder for `model`: the bundled default, a local folder, or a Hub id."""
    if model is None or model == "default":
        return DEFAULT_MODEL_DIR
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise CheckpointError(f"model folder {model!r} does not exist")
    return _from_hub(model)


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except HFValidationError:
        raise CheckpointError(f"{repo_id!r} is neither a local folder nor a valid Hub id") from None
    except Exception:
        pass  # not cached: try the network below
    if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0"):
        raise CheckpointError(_offline_message(repo_id))
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # noqa: BLE001 - any failure means: not reachable, not found
        log.debug("download of %s failed: %r", repo_id, e)
        raise CheckpointError(_offline_message(repo_id)) from None
    if not any((path / f).exists() for f in WEIGHT_FILES):
        # older repos carry only pytorch_model.bin
        path = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS + ["pytorch_model*.bin*"]))
    return path


def _offline_message(repo_id: str) -> str:
    return (f"model {repo_id!r} is not in the local Hugging Face cache and could not be downloaded: "
            f"run `hf download {repo_id}` (`huggingface-cli download {repo_id}` with huggingface_hub "
            f"older than 0.34) on a machine with internet access "
            f"(or copy its folder here) and pass --model PATH_OR_ID again")


def _tensor_files(path: Path) -> tuple[list[Path], str]:
    for index_name, kind in (("model.safetensors.index.json", "safetensors"),
                             ("pytorch_model.bin.index.json", "bin")):
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid shard index: {e!r}") from None
            files = [path / name for name in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} lists shards that are missing: {', '.join(missing)}")
            return files, kind
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"], "safetensors"
    if (path / "pytorch_model.bin").is_file():
        return [path / "pytorch_model.bin"], "bin"
    raise CheckpointError(
        f"{path} has no weights: expected model.safetensors, pytorch_model.bin or a sharded index"
    )


def _iter_tensors(files: list[Path], kind: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time; safetensors and mmap'd .bin stay on disk until read."""
    for f in files:
        if kind == "safetensors":
            from safetensors import safe_open
            from safetensors import SafetensorError
            try:
                with safe_open(str(f), framework="pt") as st:
                    for name in st.keys():
                        yield name, st.get_tensor(name)
            except SafetensorError as e:
                raise CheckpointError(f"{f.name} is corrupt or not a safetensors file: {e}") from None
        else:
            try:
                sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
                raise CheckpointError(f"{f.name} is corrupt or not a PyTorch checkpoint: {e}") from None
            if not isinstance(sd, dict):
                raise CheckpointError(f"{f.name} does not hold a state dict")
            yield from sd.items()
            del sd


def _our_name(name: str) -> str | None:
    """Map a checkpoint tensor name to ours; None for tensors we don't keep."""
    if name.startswith("transformer."):
        name = name[len("transformer."):]
    if name == "lm_head.weight" or name.endswith(IGNORED_SUFFIXES):
        return None  # the LM head is tied to wte
    return name


def read_config(path: Path) -> ModelConfig:
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"model folder {str(path)!r} does not exist")
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has no config.json; is it a Hugging Face model folder?")
    try:
        return ModelConfig.from_json_file(cfg_file)
    except ValueError as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None


@contextlib.contextmanager
def _no_init():
    """Layers built without their random initialisation (the weights are loaded next). On
    the meta device that initialisation runs through torch's Python reference ops, whose
    first use imports torch.compile's machinery (torch._dynamo, and triton where installed):
    ~250 MB of resident memory and seconds of start-up a serving process never uses."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "ones_", "zeros_")
    saved = {name: getattr(nn.init, name) for name in names}
    for name in names:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def _materialize(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Give a model built on the meta device uninitialised parameters on `device`, in
    `dtype`, each allocated once with torch.empty. (Module.to_empty, on the CPU, left a
    second, untouchable copy of the token embedding's size resident, 147 MiB for GPT-2.)"""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(torch.empty(param.shape, dtype=dtype, device=device),
                                               requires_grad=param.requires_grad))


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, weights: str | None = None) -> GPT2:
    """Build GPT2 from a model folder directly on `device` in `dtype`. `weights`: a CPU
    weight format (model/panel_linear.py): each linear layer goes into panels in it as soon
    as its tensors are loaded, and the tied embedding and LM head at the end, so loading
    holds one float32 layer (and the float32 embedding) beside the converted ones, never
    the whole float32 model."""
    path = Path(path)
    cfg = read_config(path)
    files, kind = _tensor_files(path)
    with torch.device("meta"), _no_init():
        model = GPT2(cfg)
    _materialize(model, dtype, torch.device(device))
    params = dict(model.named_parameters())
    expected = set(params)
    loaded: set[str] = set()
    for ckpt_name, tensor in _iter_tensors(files, kind):
        name = _our_name(ckpt_name)
        if name is None:
            continue
        if name not in expected:
            raise CheckpointError(f"unexpected tensor {ckpt_name!r}: this is not a GPT-2 checkpoint")
        if name in loaded:
            raise CheckpointError(f"tensor {ckpt_name!r} appears twice in the checkpoint")
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()  # Conv1D stores (in, out); nn.Linear wants (out, in)
        target = params[name]
        if tuple(tensor.shape) != tuple(target.shape):
            expected = tuple(target.shape[::-1]) if name.endswith(CONV1D_WEIGHTS) else tuple(target.shape)
            got = tuple(tensor.shape[::-1]) if name.endswith(CONV1D_WEIGHTS) else tuple(tensor.shape)
            raise CheckpointError(f"tensor {ckpt_name!r} has shape {got}, but config.json implies {expected}")
        with torch.no_grad():
            target.copy_(tensor)
        loaded.add(name)
        if weights is not None:
            del target, tensor
            _to_panels_when_loaded(model, name, params, loaded, weights)
    missing = sorted(expected - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint {path} is missing tensors: {shown}")
    if weights is not None:
        panels_for_cpu(model, weights)  # the tied embedding and LM head
        release_freed_memory()
    model.eval()
    return model


def release_freed_memory() -> None:
    """Hand the memory the C library keeps after frees back to the system (glibc's
    malloc_trim). Converting weights frees a float32 layer at a time, in pieces the heap
    keeps: without this, loading GPT-2 small to int8 held ~300 MB more at its peak than
    the layers alive. A no-op where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _to_panels_when_loaded(model: GPT2, name: str, params: dict, loaded: set[str], weights: str) -> None:
    """Once every tensor of the linear layer that `name` belongs to is loaded, swap it for a
    PanelLinear in `weights` and drop its float32 tensors."""
    module_name, _, _ = name.rpartition(".")
    module = model.get_submodule(module_name)
    if not isinstance(module, nn.Linear):
        return
    own = [f"{module_name}.{p}" for p, _ in module.named_parameters(recurse=False)]
    if not all(n in loaded for n in own):
        return
    parent_name, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, PanelLinear(module.weight, module.bias, weights))
    for n in own:
        del params[n]
    del module
    release_freed_memory()


def save_checkpoint(model: GPT2, folder: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write `model` as a Hugging Face GPT2LMHeadModel folder (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    tensors = {}
    for name, p in model.named_parameters():
        t = p.detach().to("cpu", dtype or p.dtype)
        if name.endswith(CONV1D_WEIGHTS):
            t = t.t()
        tensors[f"transformer.{name}"] = t.contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "activation_function": "gelu_new", "vocab_size": cfg.vocab_size,
        "n_positions": cfg.n_positions, "n_ctx": cfg.n_positions, "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.n_inner,
        "layer_norm_epsilon": cfg.layer_norm_epsilon, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id, "scale_attn_weights": cfg.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx": cfg.scale_attn_by_inverse_layer_idx,
        "tie_word_embeddings": True, "torch_dtype": str(dtype or model.dtype).removeprefix("torch."),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
