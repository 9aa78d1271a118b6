"""The command line's flags, and the engine's and server's settings read from them."""
from __future__ import annotations

import argparse
import sys

from gptserve.config import EngineConfig, ServerConfig, SpeculativeConfig, parse_bytes


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def engine_args(p: argparse.ArgumentParser, several_models: bool = False) -> None:
    if several_models:
        p.add_argument("--model", action="append", default=None, metavar="[NAME=]MODEL",
                       help="model folder (Hugging Face layout) or Hub id such as gpt2, gpt2-medium, distilgpt2, "
                            "served as NAME when given; repeat it to serve several models (default: the bundled "
                            "model)")
    else:
        p.add_argument("--model", default=None,
                       help="model folder (Hugging Face layout) or Hub id such as gpt2, gpt2-medium, "
                            "distilgpt2; default: the bundled model")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: auto)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | float16 | bfloat16 (default: auto: "
                                                 "bfloat16 weights with float32 math on the CPU, bfloat16/float16 "
                                                 "on a GPU); on the CPU a 16-bit dtype holds only the weights in "
                                                 "16 bits")
    p.add_argument("--quantization", default=None, choices=["int8"],
                   help="int8: weights quantized at load, one scale per output channel (CPU; math in float32)")
    d = SpeculativeConfig("ngram")
    spec = p.add_argument_group("speculative decoding", "guess the next tokens cheaply and verify them in one "
                                "pass of the model; output is exactly what plain decoding gives")
    spec.add_argument("--speculative-method", default=None, choices=["ngram", "draft"],
                      help="ngram: guesses from earlier text of the prompt and output (prompt lookup); "
                           "draft: a small model of the same vocabulary guesses (default: off)")
    spec.add_argument("--num-speculative-tokens", type=int, default=d.num_speculative_tokens,
                      help="most guesses per sequence and step")
    spec.add_argument("--ngram-min", type=int, default=d.ngram_min, help="shortest suffix an ngram guess matches")
    spec.add_argument("--ngram-max", type=int, default=d.ngram_max, help="longest suffix an ngram guess matches")
    spec.add_argument("--draft-model", default=None,
                      help="the draft: a GPT-2 folder or Hub id with the model's vocabulary "
                           "(default: the draft bundled with the default model)")
    spec.add_argument("--speculative-max-batch", type=int, default=d.max_batch,
                      help="speculate only in steps with at most this many decoding sequences")
    spec.add_argument("--speculative-min-acceptance", type=float, default=d.min_acceptance,
                      help="a sequence whose guesses stand less often than this stops guessing for a while")


def serving_engine_args(p: argparse.ArgumentParser) -> None:
    d = EngineConfig()
    p.add_argument("--kv-cache-memory", type=_size, default=None,
                   help="bytes for the paged KV cache, e.g. 2GiB (default: 2GiB on the CPU; on a GPU, what "
                        "--gpu-memory-utilization of its memory leaves after a profiled warm-up step)")
    p.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization,
                   help="share of the GPU's memory the engine may fill: weights, activations, KV cache "
                        f"(default: {d.gpu_memory_utilization})")
    p.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV block")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="most sequences in one step")
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                   help="token budget of one step (decodes + prefill chunks)")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    p.add_argument("--no-prefix-caching", action="store_true", help="turn the prefix cache off")
    p.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs, no compiled CPU decode step: every step op by op from Python")
    p.add_argument("--data-parallel-size", type=int, default=1, help="engine replicas, one per GPU")
    p.add_argument("--data-parallel-backend", default="auto", choices=["auto", "process", "thread"],
                   help="replicas as one process each (auto on GPUs: no shared interpreter lock) or as "
                        "threads of one process (auto on the CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the engine's sampler")
    lora = p.add_argument_group("LoRA adapters", "PEFT LoRA adapters of the model, each served under its own "
                                "model name and applied at run time (one batch mixes adapters)")
    lora.add_argument("--enable-lora", action="store_true",
                      help="serve LoRA adapters (implied by --lora-modules)")
    lora.add_argument("--lora-modules", nargs="+", metavar="NAME=PATH", default=None,
                      help="adapters to load at start: a model name and a PEFT adapter folder each")
    lora.add_argument("--max-loras", type=int, default=d.max_loras,
                      help="adapters resident at once (one batch mixes at most this many); others wait for a slot")
    lora.add_argument("--max-lora-rank", type=int, default=d.max_lora_rank, help="the largest adapter rank taken")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    cfg = EngineConfig(device=args.device, dtype=args.dtype, quantization=args.quantization)
    if args.speculative_method:
        try:
            cfg.speculative = SpeculativeConfig(
                args.speculative_method, args.num_speculative_tokens, args.ngram_min, args.ngram_max,
                args.draft_model, args.speculative_max_batch, args.speculative_min_acceptance)
        except ValueError as e:
            print(f"gptserve: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    if hasattr(args, "max_num_seqs"):
        cfg.kv_cache_memory = args.kv_cache_memory
        cfg.gpu_memory_utilization = args.gpu_memory_utilization
        cfg.block_size = args.block_size
        cfg.max_num_seqs = args.max_num_seqs
        cfg.max_num_batched_tokens = args.max_num_batched_tokens
        cfg.max_model_len = args.max_model_len
        cfg.enable_prefix_caching = not args.no_prefix_caching
        cfg.enforce_eager = args.enforce_eager
        cfg.data_parallel_size = args.data_parallel_size
        cfg.data_parallel_backend = args.data_parallel_backend
        cfg.seed = args.seed
        cfg.enable_lora = args.enable_lora or getattr(args, "enable_lora_runtime_updates", False)
        cfg.lora_modules = lora_modules(args.lora_modules or [])
        cfg.max_loras = args.max_loras
        cfg.max_lora_rank = args.max_lora_rank
    return cfg


def lora_modules(items: list[str]) -> dict[str, str]:
    """--lora-modules NAME=PATH ... as {name: path}."""
    modules: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            print(f"gptserve: error: --lora-modules takes NAME=PATH, got {item!r}", file=sys.stderr)
            raise SystemExit(2)
        if name in modules:
            print(f"gptserve: error: --lora-modules names {name!r} twice", file=sys.stderr)
            raise SystemExit(2)
        modules[name] = path
    return modules


def server_args(p: argparse.ArgumentParser) -> None:
    d = ServerConfig()
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (or 'x-api-key: KEY', as Anthropic's clients send it)")
    p.add_argument("--served-model-name", default=None, help="the model name clients send")
    p.add_argument("--chat-template", default=None, help="a Jinja chat template file")
    p.add_argument("--max-queued-requests", type=int, default=d.max_queued_requests,
                   help="requests in flight before new ones get 429")
    p.add_argument("--cors-allow-origin", action="append", default=None,
                   help="allow this origin (repeatable); CORS is off by default")
    p.add_argument("--stream-send-timeout", type=float, default=d.stream_send_timeout,
                   help="seconds a stream waits on a client that stopped reading before it is cut "
                        "and its request aborted")
    p.add_argument("--state-dir", default=None,
                   help="where the Responses API keeps stored responses (default: the user's state directory, "
                        "e.g. ~/.local/state/gptserve)")
    p.add_argument("--no-store", action="store_true",
                   help="store no responses: previous_response_id and GET /v1/responses/{id} are then unavailable")
    p.add_argument("--max-stored-responses", type=int, default=d.max_stored_responses,
                   help="how many stored responses are kept; the oldest go first")
    p.add_argument("--enable-lora-runtime-updates", action="store_true",
                   help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (behind --api-key)")
    models = p.add_argument_group("several models", "serve several models (--model NAME=MODEL repeated, or a "
                                  "models file), each loaded on first use and unloaded when memory or idleness says")
    models.add_argument("--models-file", default=None,
                        help="a TOML file with one [[models]] table per model: name, model, and engine settings")
    models.add_argument("--models-memory", type=_size, default=None,
                        help="bytes the loaded models may hold together (weights, KV pools), e.g. 6GiB; the least "
                             "recently used idle model is unloaded to make room (default: no limit)")
    models.add_argument("--idle-unload", type=float, default=None,
                        help="unload a model unused for this many seconds (default: never)")
    models.add_argument("--preload", action="store_true", help="load every model at start, not on first use")
    models.add_argument("--model-load-timeout", type=float, default=d.model_load_timeout,
                        help="seconds a request waits for its model to load before a 503 with Retry-After")
    limits = p.add_argument_group("request limits", "a request over one is refused with 400 (413 for the body), "
                                                    "the message naming the limit")
    limits.add_argument("--max-body-bytes", type=_size, default=d.max_body_bytes,
                        help=f"largest request body, e.g. 2MiB (default: {d.max_body_bytes})")
    limits.add_argument("--max-messages", type=int, default=d.max_messages, help="most messages in a chat request")
    limits.add_argument("--max-tokens-limit", type=int, default=d.max_tokens_limit,
                        help="largest max_tokens; also caps a request that gives none")
    limits.add_argument("--max-n", type=int, default=d.max_n, help="most choices (n) per request")
    limits.add_argument("--max-top-logprobs", type=int, default=d.max_top_logprobs,
                        help="most alternatives per token (top_logprobs, or completions' logprobs)")
    limits.add_argument("--max-stop-strings", type=int, default=d.max_stop_strings, help="most stop strings")
    limits.add_argument("--max-stop-length", type=int, default=d.max_stop_length,
                        help="longest stop string, in characters")
    structured = p.add_argument_group("structured outputs and tools", "limits on what response_format, "
                                      "structured_outputs and tools give the grammar engine (a request over one is "
                                      "refused with 400, the message naming the limit), and how JSON is written")
    structured.add_argument("--max-schema-depth", type=int, default=d.max_schema_depth,
                            help="deepest nesting of a JSON Schema document (its objects and arrays)")
    structured.add_argument("--max-schema-size", type=int, default=d.max_schema_size,
                            help="most values in a JSON Schema document; a request's tools count together")
    structured.add_argument("--max-choices", type=int, default=d.max_choices,
                            help="most strings in structured_outputs.choice")
    structured.add_argument("--max-tools", type=int, default=d.max_tools, help="most tools in one request")
    structured.add_argument("--max-grammar-length", type=int, default=d.max_grammar_length,
                            help="longest regex or Lark grammar, in characters")
    structured.add_argument("--max-regex-repetition", type=int, default=d.max_regex_repetition,
                            help="how far a counted repetition of a regex or Lark grammar (a{n}, item~n) may "
                                 "expand: what it repeats times its count, times the counts around it")
    structured.add_argument("--no-json-number-bounds", action="store_true",
                            help="leave JSON numbers a schema does not bound unbounded (by default an integer is "
                                 "held to |n| <= 2^53-1, a number to 17 significant digits, 10 decimals, no "
                                 "exponent)")


def server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(host=args.host, port=args.port, api_key=args.api_key,
                        served_model_name=args.served_model_name, chat_template=args.chat_template,
                        max_queued_requests=args.max_queued_requests,
                        cors_allow_origins=args.cors_allow_origin or [],
                        max_body_bytes=args.max_body_bytes, max_messages=args.max_messages,
                        max_tokens_limit=args.max_tokens_limit, max_n=args.max_n,
                        max_top_logprobs=args.max_top_logprobs, max_stop_strings=args.max_stop_strings,
                        max_stop_length=args.max_stop_length, stream_send_timeout=args.stream_send_timeout,
                        state_dir=args.state_dir, store_responses=not args.no_store,
                        max_stored_responses=args.max_stored_responses, max_schema_depth=args.max_schema_depth,
                        max_schema_size=args.max_schema_size, max_choices=args.max_choices, max_tools=args.max_tools,
                        max_grammar_length=args.max_grammar_length, max_regex_repetition=args.max_regex_repetition,
                        json_number_bounds=not args.no_json_number_bounds,
                        enable_lora_runtime_updates=args.enable_lora_runtime_updates,
                        models_memory=args.models_memory, idle_unload=args.idle_unload, preload=args.preload,
                        model_load_timeout=args.model_load_timeout)


def ray_args(p: argparse.ArgumentParser) -> None:
    ray = p.add_argument_group("Ray Serve", "run as a Ray Serve application on this machine's Ray cluster "
                               "(joined if one runs, else started): one engine per replica, requests routed "
                               "by prompt prefix; needs pip install 'gptserve[ray]'")
    ray.add_argument("--ray", action="store_true", help="serve through Ray Serve")
    replicas = ray.add_mutually_exclusive_group()
    replicas.add_argument("--num-replicas", type=int, default=1, help="engine replicas (default: 1)")
    replicas.add_argument("--autoscale", metavar="MIN:MAX", default=None,
                          help="scale engine replicas between MIN and MAX on their ongoing requests")
    ray.add_argument("--replica-num-gpus", type=float, default=0.0,
                     help="GPUs each engine replica takes from Ray (1: a GPU of its own; default: 0, CPU)")
    ray.add_argument("--no-prefix-affinity", action="store_true",
                     help="route by load alone (power of two choices), not by prompt prefix")
