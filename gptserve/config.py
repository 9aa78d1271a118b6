"""Settings as dataclasses: the model's shape, the engine's limits, the server's knobs."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a GPT-2 model, named as in Hugging Face's config.json."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    eos_token_id: int = 50256
    bos_token_id: int = 50256
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_dim(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        """Build from a config.json dict; raises ValueError when it is not GPT-2."""
        model_type = d.get("model_type")
        archs = d.get("architectures") or []
        if model_type not in (None, "gpt2") or (archs and not any("GPT2" in a for a in archs)):
            raise ValueError(
                f"not a GPT-2 checkpoint: model_type={model_type!r}, architectures={archs!r}"
            )
        act = d.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported activation_function {act!r}; GPT-2 uses gelu_new")
        if d.get("reorder_and_upcast_attn"):
            raise ValueError("reorder_and_upcast_attn=True is not supported")
        try:
            cfg = cls(
                vocab_size=int(d["vocab_size"]),
                n_positions=int(d.get("n_positions", d.get("n_ctx", 1024))),
                n_embd=int(d["n_embd"]),
                n_layer=int(d["n_layer"]),
                n_head=int(d["n_head"]),
                n_inner=d.get("n_inner"),
                layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-5)),
                eos_token_id=int(d.get("eos_token_id") if d.get("eos_token_id") is not None else 50256),
                bos_token_id=int(d.get("bos_token_id") if d.get("bos_token_id") is not None else 50256),
                scale_attn_weights=bool(d.get("scale_attn_weights", True)),
                scale_attn_by_inverse_layer_idx=bool(d.get("scale_attn_by_inverse_layer_idx", False)),
            )
        except KeyError as e:
            raise ValueError(f"config.json lacks the GPT-2 field {e.args[0]!r}") from None
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}")
        return cfg

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_dict(d)

    def num_parameters(self) -> int:
        """Exact parameter count with the LM head tied to wte."""
        c, m = self.n_embd, self.mlp_dim
        per_layer = 2 * 2 * c + (c * 3 * c + 3 * c) + (c * c + c) + (c * m + m) + (m * c + c)
        return self.vocab_size * c + self.n_positions * c + self.n_layer * per_layer + 2 * c


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: propose up to `num_speculative_tokens` tokens per sequence and
    verify them in one pass of the model (engine/speculative.py)."""

    method: str  # "ngram" (prompt lookup) or "draft" (a small model of the same vocabulary)
    num_speculative_tokens: int = 3  # a verify of 4 rows stays on the CPU's few-rows kernel (FEW_ROWS)
    ngram_min: int = 1  # shortest suffix that may match
    ngram_max: int = 4  # longest suffix tried first
    draft_model: str | None = None  # "draft": a path or hub id; None: the bundled draft
    max_batch: int = 64  # more decoding sequences than this in a step: no speculation
    min_acceptance: float = 0.5  # a sequence whose guesses stand less often backs off (see speculative.py)

    def __post_init__(self):
        if self.method not in ("ngram", "draft"):
            raise ValueError(f"unknown speculative method {self.method!r}: ngram or draft")
        if self.num_speculative_tokens < 1:
            raise ValueError("num_speculative_tokens must be at least 1")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError("need 1 <= ngram_min <= ngram_max")
        if not 0.0 <= self.min_acceptance <= 1.0:
            raise ValueError("min_acceptance must be between 0 and 1")


@dataclass
class EngineConfig:
    """Limits and placement of one engine replica."""

    block_size: int = 16  # tokens per KV block
    kv_cache_memory: int | None = None  # bytes for the KV pool; None: derived (see engine)
    gpu_memory_utilization: float = 0.85
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # defaults to the model's n_positions
    enable_prefix_caching: bool = True
    device: str = "auto"
    dtype: str = "auto"
    quantization: str | None = None  # "int8": weight-only, per output channel (CPU)
    seed: int = 0
    cuda_graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    enforce_eager: bool = False  # no CUDA graphs, no compiled CPU decode step
    data_parallel_size: int = 1
    data_parallel_backend: str = "auto"  # replicas as "process"es or "thread"s; auto: processes on GPUs
    speculative: SpeculativeConfig | None = None  # None: no speculative decoding
    # LoRA adapters (engine/lora.py): off unless enabled or adapters are named at start
    enable_lora: bool = False
    lora_modules: dict[str, str] = field(default_factory=dict)  # name -> PEFT folder, loaded at start
    max_loras: int = 4  # adapter slots in the model: adapters in one batch
    max_lora_rank: int = 16  # the largest rank an adapter may have (sizes the slots)

    @property
    def lora_enabled(self) -> bool:
        return self.enable_lora or bool(self.lora_modules)


@dataclass
class ModelSpec:
    """One model a server serves: its name, what to load, and the engine's settings for it."""

    name: str  # the model name requests use
    model: str | None  # a folder or Hub id; None: the bundled model
    engine: EngineConfig = field(default_factory=EngineConfig)
    chat_template: str | None = None  # a Jinja file; None: the server's


@dataclass
class ServerConfig:
    """HTTP-facing settings."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    chat_template: str | None = None
    max_queued_requests: int = 256
    cors_allow_origins: list[str] = field(default_factory=list)
    max_body_bytes: int = 2 * 1024 * 1024
    max_messages: int = 256
    max_tokens_limit: int = 4096
    max_n: int = 16
    max_top_logprobs: int = 20
    max_stop_strings: int = 8
    max_stop_length: int = 256
    stream_send_timeout: float = 60.0  # seconds a stream waits on a client that stopped reading
    state_dir: str | None = None  # where stored responses live; None: the user's state directory
    store_responses: bool = True  # False: the Responses API stores nothing (--no-store)
    max_stored_responses: int = 10_000  # past this, the oldest stored responses are forgotten
    # structured outputs and tools (server/structured_limits.py): what the grammar engine may be given
    max_schema_depth: int = 64  # nesting of a JSON Schema document, its objects and arrays
    max_schema_size: int = 4096  # values in a JSON Schema document (all of a request's tools together)
    max_choices: int = 10_000  # strings in structured_outputs.choice
    max_tools: int = 128  # tools in one request (OpenAI's own limit)
    max_grammar_length: int = 65_536  # characters of a regex or a Lark grammar
    max_regex_repetition: int = 4096  # how far a counted repetition may expand (server/repetition.py)
    json_number_bounds: bool = True  # bound JSON numbers a schema leaves unbounded (server/schema_rewrite.py)
    enable_lora_runtime_updates: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter
    # several models (server/models.py): how much their engines may hold together, and when they go
    models_memory: int | None = None  # bytes; None: no budget
    idle_unload: float | None = None  # seconds unused before a model is unloaded; None: never
    model_load_timeout: float = 120.0  # seconds a request waits for its model to load, then 503
    preload: bool = False  # load every model at start, not on first use


def parse_bytes(text: str) -> int:
    """'2GiB', '512MB', '1.5G', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B?)\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 2GiB or 512MB")
    value, unit = float(m.group(1)), m.group(2).upper()
    return int(value * 1024 ** "_KMGT".index(unit)) if unit else int(value)
