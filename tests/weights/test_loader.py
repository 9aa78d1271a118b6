"""Finding and loading checkpoints: every layout we accept, and a clear CheckpointError for the rest."""
from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from gptserve.model.attention import DenseAttention
from gptserve.model.gpt2 import GPT2
from gptserve.weights import loader
from gptserve.weights.loader import CheckpointError, load_model, resolve_model_path, save_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # a snapshot's 40-hex commit hash


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint) -> GPT2:
    return load_model(tiny_checkpoint)


def assert_same_weights(a: GPT2, b: GPT2) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


def rewritten(folder: Path, source: Path, edit) -> Path:
    """A copy of the `source` checkpoint whose model.safetensors tensors pass through `edit`."""
    folder.mkdir()
    shutil.copy(source / "config.json", folder / "config.json")
    tensors = edit(load_file(source / "model.safetensors"))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def watch_checkpoint_tensors(monkeypatch, see) -> None:
    """Make the loader call `see(tensor)` on each checkpoint tensor as it reads it."""
    real = loader._iter_tensors

    def watched(files, kind):
        for name, tensor in real(files, kind):
            see(tensor)
            yield name, tensor

    monkeypatch.setattr(loader, "_iter_tensors", watched)


def load_error(path: Path) -> str:
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    return str(e.value)


# ---- layouts ---------------------------------------------------------------------------

def test_sharded_safetensors_load_the_same_weights(make_checkpoint, tiny_model):
    path = make_checkpoint(max_shard_size="2MB")
    shards = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values()
    assert len(set(shards)) > 1
    assert not (path / "model.safetensors").exists()
    assert_same_weights(load_model(path), tiny_model)


def test_pytorch_model_bin_loads_the_same_weights(make_checkpoint, tiny_model):
    path = make_checkpoint(weights="bin")
    assert not (path / "model.safetensors").exists()
    assert_same_weights(load_model(path), tiny_model)


def test_a_bin_without_the_transformer_prefix_and_with_mask_buffers_loads(tmp_path, tiny_checkpoint, tiny_model):
    # the layout of OpenAI's original gpt2 pytorch_model.bin: GPT2Model keys, causal-mask buffers
    state = {k.removeprefix("transformer."): v for k, v in load_file(tiny_checkpoint / "model.safetensors").items()}
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.ones(1, 1, 256, 256).tril()
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    assert not any(k.startswith("transformer.") for k in state)
    tmp_path.joinpath("config.json").write_text((tiny_checkpoint / "config.json").read_text())
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert_same_weights(load_model(tmp_path), tiny_model)


def test_save_checkpoint_round_trips_and_transformers_reads_it(tmp_path, tiny_model):
    from transformers import GPT2LMHeadModel

    save_checkpoint(tiny_model, tmp_path)
    assert_same_weights(load_model(tmp_path), tiny_model)
    ref = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = torch.arange(10) * 97
    with torch.inference_mode():
        ours = tiny_model.logits(tiny_model(ids, torch.arange(10), DenseAttention(1)))
        theirs = ref(ids[None]).logits[0]
    assert (ours - theirs).abs().max().item() < 1e-4


def test_loading_into_float16_gives_float16_params(tiny_checkpoint, tiny_model):
    model = load_model(tiny_checkpoint, "cpu", torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    full = dict(tiny_model.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, full[name].half()), name


# ---- errors ----------------------------------------------------------------------------

def test_a_missing_tensor_is_named(tmp_path, tiny_checkpoint):
    def drop(t):
        del t["transformer.h.1.mlp.c_fc.bias"]
        return t
    message = load_error(rewritten(tmp_path / "m", tiny_checkpoint, drop))
    assert "missing tensors" in message and "h.1.mlp.c_fc.bias" in message


def test_a_wrong_shape_is_named_with_both_shapes(tmp_path, tiny_checkpoint):
    def shrink(t):
        t["transformer.h.0.attn.c_proj.weight"] = torch.zeros(64, 32)  # Conv1D (in, out): out should be 64
        return t
    message = load_error(rewritten(tmp_path / "m", tiny_checkpoint, shrink))
    assert "'transformer.h.0.attn.c_proj.weight' has shape (64, 32), but config.json implies (64, 64)" in message


def test_an_unexpected_tensor_is_named(tmp_path, tiny_checkpoint):
    def add(t):
        t["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(4, 4)
        return t
    message = load_error(rewritten(tmp_path / "m", tiny_checkpoint, add))
    assert "unexpected tensor 'model.layers.0.self_attn.q_proj.weight'" in message


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_corrupt_safetensors_file_is_reported(tmp_path, tiny_checkpoint, damage):
    shutil.copytree(tiny_checkpoint, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[:len(data) // 2], "garbage": bytes(range(256)) * 64,
                         "empty": b""}[damage])
    assert "model.safetensors is corrupt or not a safetensors file" in load_error(tmp_path / "m")


def test_a_corrupt_pytorch_model_bin_is_reported(tmp_path, make_checkpoint):
    shutil.copytree(make_checkpoint(weights="bin"), tmp_path / "m")
    weights = tmp_path / "m" / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:4096])
    assert "pytorch_model.bin is corrupt or not a PyTorch checkpoint" in load_error(tmp_path / "m")


def test_a_missing_shard_is_named(tmp_path, make_checkpoint):
    shutil.copytree(make_checkpoint(max_shard_size="2MB"), tmp_path / "m")
    shard = sorted((tmp_path / "m").glob("model-*.safetensors"))[-1]
    shard.unlink()
    message = load_error(tmp_path / "m")
    assert "lists shards that are missing" in message and shard.name in message


def test_a_llama_config_is_refused(tmp_path, tiny_checkpoint):
    shutil.copytree(tiny_checkpoint, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    message = load_error(tmp_path / "m")
    assert "not a GPT-2 checkpoint" in message and "model_type='llama'" in message


def test_a_folder_without_config_json_is_reported(tmp_path, tiny_checkpoint):
    shutil.copytree(tiny_checkpoint, tmp_path / "m")
    (tmp_path / "m" / "config.json").unlink()
    assert "has no config.json" in load_error(tmp_path / "m")


def test_a_folder_without_weights_is_reported(tmp_path, tiny_checkpoint):
    (tmp_path / "m").mkdir()
    shutil.copy(tiny_checkpoint / "config.json", tmp_path / "m")
    assert "has no weights: expected model.safetensors" in load_error(tmp_path / "m")


def test_a_missing_folder_is_reported(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_model_path(str(missing))
    assert "does not exist" in load_error(missing)


# ---- the Hugging Face cache -------------------------------------------------------------

@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty, offline HF cache; every snapshot_download call must be local_files_only."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    real = huggingface_hub.snapshot_download

    def local_only(*args, **kwargs):
        assert kwargs.get("local_files_only"), "offline, the loader asked the network"
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", local_only)
    return cache


def cache_snapshot(cache: Path, repo_id: str, source: Path) -> Path:
    """Lay out `source`'s files as the HF cache stores a downloaded repo."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for f in source.iterdir():
        (snapshot / f.name).symlink_to(f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.mark.parametrize("repo_id", ["someone/tiny-gpt2", "gpt2"])
def test_a_hub_id_in_the_local_cache_resolves_offline(hub_cache, tiny_checkpoint, tiny_model, repo_id):
    snapshot = cache_snapshot(hub_cache, repo_id, tiny_checkpoint)
    path = resolve_model_path(repo_id)
    assert path == snapshot
    assert_same_weights(load_model(path), tiny_model)


def test_a_hub_id_not_cached_offline_says_how_to_get_it(hub_cache):
    with pytest.raises(CheckpointError) as e:
        resolve_model_path("someone/absent")
    message = str(e.value)
    assert "'someone/absent' is not in the local Hugging Face cache" in message
    assert "hf download someone/absent" in message and "--model" in message


# ---- memory: the weights are not held twice -----------------------------------------------

def test_checkpoint_tensors_are_consumed_one_at_a_time_and_not_kept(monkeypatch, tiny_checkpoint):
    seen: list[weakref.ref] = []
    spans: list[tuple[int, int]] = []
    most_alive = 0

    def see(tensor):
        nonlocal most_alive
        # the loader may still hold the previous tensor while it reads the next one
        most_alive = max(most_alive, sum(r() is not None for r in seen))
        seen.append(weakref.ref(tensor))
        start = tensor.untyped_storage().data_ptr()
        spans.append((start, start + tensor.untyped_storage().nbytes()))

    watch_checkpoint_tensors(monkeypatch, see)
    model = load_model(tiny_checkpoint)
    assert len(seen) == len(list(model.parameters()))
    assert most_alive <= 1
    assert all(r() is None for r in seen)
    # parameters were allocated before any checkpoint tensor: none lives in a checkpoint buffer
    for p in model.parameters():
        assert not any(a <= p.data_ptr() < b for a, b in spans)


class LiveBytes(TorchDispatchMode):
    """Bytes of live real-device storages that ops run under it create, and their peak.

    Storages made outside the dispatcher (a safetensors read) are added with `track`.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._tracked: set[int] = set()

    def track(self, storage: torch.UntypedStorage) -> None:
        key, size = id(storage), storage.nbytes()  # torch keeps one Python object per storage
        if key in self._tracked or storage.device.type == "meta" or size == 0:
            return
        self._tracked.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self._tracked.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t.untyped_storage())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_peak_memory_while_loading_is_the_model_plus_one_checkpoint_tensor(
        monkeypatch, make_checkpoint, dtype):
    # a shape whose largest tensor (c_fc, 8% of the model) is small beside the whole model,
    # so that holding the model twice, or once in float32 on the way to float16, shows
    path = make_checkpoint(vocab_size=512, n_embd=256, n_layer=4, n_head=4, n_positions=128,
                           bos_token_id=511, eos_token_id=511)
    largest = max(t.numel() * t.element_size() for t in load_file(path / "model.safetensors").values())
    memory = LiveBytes()
    watch_checkpoint_tensors(monkeypatch, lambda tensor: memory.track(tensor.untyped_storage()))
    with memory:
        model = load_model(path, "cpu", dtype)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert memory.live >= model_bytes  # the accounting sees the model's own storage
    assert memory.peak <= model_bytes + largest + 2**16
