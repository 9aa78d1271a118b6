"""`gptserve serve | generate | info`: the command line. Server modules load only for `serve`."""
from __future__ import annotations

import argparse
import logging
import sys
import uuid

from gptserve.cli import flags

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# the server's log lines name their request; "-" outside a request (start-up, the engine thread)
SERVE_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def cmd_generate(args: argparse.Namespace) -> int:
    from gptserve.engine.llm_engine import LLMEngine
    from gptserve.engine.sampling_params import SamplingParams

    cfg = flags.engine_config(args)
    cfg.enforce_eager = True
    cfg.kv_cache_memory = 256 * 2**20
    engine = LLMEngine(args.model, cfg)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)
    ids = engine.tokenizer.encode(args.prompt)
    engine.add_request(uuid.uuid4().hex, ids, params)
    sys.stdout.write(args.prompt)
    while engine.has_unfinished():
        for out in engine.step():
            for choice in out.choices:
                sys.stdout.write(choice.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from gptserve.engine.placement import held_bytes, resolve_device, resolve_precision
    from gptserve.weights.loader import read_config, resolve_model_path

    path = resolve_model_path(args.model)
    cfg = read_config(path)
    precision = resolve_precision(args.dtype, args.quantization, resolve_device(args.device))
    dtype = precision.compute
    n = cfg.num_parameters()
    estimate = 12 * cfg.n_embd**2 * cfg.n_layer
    size = torch.empty((), dtype=dtype).element_size()
    kv_per_token = 2 * cfg.n_layer * cfg.n_embd * size
    print(f"model:            {args.model or 'bundled default'} ({path})")
    for field in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "mlp_dim", "head_dim"):
        print(f"{field + ':':<18}{getattr(cfg, field)}")
    print(f"parameters:       {n:,} ({n / 1e6:.1f}M)")
    print(f"12*d^2*L:         {estimate:,} ({estimate / 1e6:.1f}M; blocks only, without embeddings)")
    print(f"embeddings:       {(cfg.vocab_size + cfg.n_positions) * cfg.n_embd:,}")
    print(f"precision:        {precision}" + (" (auto)" if args.dtype == "auto" and not args.quantization else ""))
    print(f"weights memory:   {held_bytes(cfg, precision) / 2**20:.1f} MiB as held"
          + ("" if precision.weights == str(dtype).removeprefix("torch.") else
             f" (the linear layers and the tied embedding and LM head in {precision.weights}, once)"))
    if resolve_device(args.device).type == "cpu":
        from gptserve.model.cpu_kernels import cpu_kernel_variant

        print(f"CPU kernels:      {cpu_kernel_variant()}")
    print(f"KV cache/token:   {kv_per_token / 1024:.1f} KiB; a full context: "
          f"{kv_per_token * cfg.n_positions / 2**20:.1f} MiB")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from gptserve.cli.models_file import ModelsFileError, specs_from_file, specs_from_flags

    engine_config, server_config = flags.engine_config(args), flags.server_config(args)
    try:
        if args.models_file and args.model:
            raise ModelsFileError("give the models with --model or in --models-file, not both")
        several = bool(args.models_file) or len(args.model or []) > 1
        if several and server_config.served_model_name:
            raise ModelsFileError("--served-model-name names one model; with several, name each (--model "
                                  "NAME=MODEL, or name in --models-file)")
        specs = (specs_from_file(args.models_file, engine_config) if args.models_file
                 else specs_from_flags(args.model, engine_config))
        if several and args.ray:
            raise ModelsFileError("--ray serves one model")
    except ModelsFileError as e:
        print(f"gptserve: error: {e}", file=sys.stderr)
        return 2
    if not several:
        server_config.served_model_name = server_config.served_model_name or specs[0].name
    if args.ray:
        try:
            from gptserve.deploy.launch import cli_spec, run_on_ray
        except ImportError as e:
            print(f"gptserve: error: --ray needs Ray Serve: pip install 'gptserve[ray]' ({e})", file=sys.stderr)
            return 2
        try:
            spec = cli_spec(specs[0].model, engine_config, server_config, args.num_replicas,
                            args.autoscale, not args.no_prefix_affinity, args.replica_num_gpus)
        except ValueError as e:
            print(f"gptserve: error: {e}", file=sys.stderr)
            return 2
        run_on_ray(spec)
        return 0
    from gptserve.engine.data_parallel import EngineLoader, build_engine
    from gptserve.server.models import ModelCatalog
    from gptserve.server.serve import run_server

    if several:  # each loaded on first use (or at start with --preload)
        run_server(ModelCatalog(specs, EngineLoader()), server_config)
    else:  # loaded now, one replica or one per GPU
        run_server(build_engine(specs[0].model, specs[0].engine), server_config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptserve",
        description="An OpenAI-compatible inference server for GPT-2-family models.")
    parser.add_argument("--log-level", default=None,
                        help="DEBUG, INFO, WARNING (default: INFO for serve, WARNING otherwise)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                           description="Serve /v1/chat/completions, /v1/completions and friends.")
    flags.engine_args(serve, several_models=True)
    flags.serving_engine_args(serve)
    flags.server_args(serve)
    flags.ray_args(serve)
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="complete a prompt on the command line",
                         description="Print the prompt's continuation as it is generated.")
    gen.add_argument("prompt")
    flags.engine_args(gen)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None,
                     help="this request's sampling seed (serve's --seed seeds the engine)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.set_defaults(func=cmd_generate)

    info = sub.add_parser("info", help="show a model's shape, size and memory needs")
    flags.engine_args(info)
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = args.log_level or ("INFO" if args.command == "serve" else "WARNING")
    if args.command == "serve":
        from gptserve.server.request_id import RequestIdFilter

        logging.basicConfig(level=level.upper(), format=SERVE_LOG_FORMAT)
        for handler in logging.getLogger().handlers:
            handler.addFilter(RequestIdFilter())
    else:
        logging.basicConfig(level=level.upper(), format=LOG_FORMAT)
    from gptserve.engine.outputs import EngineError
    from gptserve.engine.placement import PlacementError
    from gptserve.engine.sampling_params import InvalidSamplingParams
    from gptserve.model.tokenizer import TokenizerError
    from gptserve.weights.loader import CheckpointError

    user_errors: tuple[type[Exception], ...] = (CheckpointError, TokenizerError, PlacementError,
                                                InvalidSamplingParams, EngineError)
    if args.command == "serve":
        from gptserve.server.chat_template import ChatTemplateError
        from gptserve.server.models import ServedModelsError

        user_errors += (ChatTemplateError, ServedModelsError)
    try:
        return args.func(args)
    except user_errors as e:
        print(f"gptserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

