"""What an application is made of, from `serve run`'s key=value arguments or the command
line: engine and server settings, replicas or autoscaling, routing; and the Serve
options the deployments get from them."""
from __future__ import annotations

import pytest

pytest.importorskip("ray")
from gptserve.cli import build_parser, main  # noqa: E402
from gptserve.cli.flags import engine_config as cli_engine_config  # noqa: E402
from gptserve.cli.flags import server_config as cli_server_config  # noqa: E402
from gptserve.deploy.application import engine_options, ingress_options, replica_engine_config  # noqa: E402
from gptserve.deploy.launch import cli_spec  # noqa: E402
from gptserve.deploy.router import PrefixAffinityRouter  # noqa: E402
from gptserve.deploy.spec import spec_from_args  # noqa: E402


def test_string_arguments_fill_every_section():
    spec = spec_from_args({"model": "gpt2", "num_replicas": "3", "kv_cache_memory": "512MiB", "block_size": "32",
                           "api_key": "k", "max_queued_requests": "10", "prefix_affinity": "false"})
    assert spec.model == "gpt2" and spec.scaling.num_replicas == 3
    assert spec.engine.kv_cache_memory == 512 * 2**20 and spec.engine.block_size == 32
    assert spec.server.api_key == "k" and not spec.routing.prefix_affinity
    assert spec.replica_server_config().max_queued_requests == 30  # the ingress holds all replicas' queues


def test_unknown_or_bad_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown argument 'num_replica'"):
        spec_from_args({"num_replica": "2"})
    with pytest.raises(ValueError, match="block_size"):
        spec_from_args({"block_size": "big"})
    with pytest.raises(ValueError, match="min_replicas <= max_replicas"):
        spec_from_args({"min_replicas": "3", "max_replicas": "1"})


def test_the_engine_deployment_scales_on_ongoing_requests_up_to_the_queue_limit():
    spec = spec_from_args({"min_replicas": "1", "max_replicas": "4", "max_queued_requests": "32",
                           "block_size": "8", "max_imbalance": "3"})
    options = engine_options(spec)
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8.0}
    assert options["max_ongoing_requests"] == 32 and "num_replicas" not in options
    router = options["request_router_config"]
    assert router.request_router_class.endswith(PrefixAffinityRouter.__name__)
    assert router.request_router_kwargs["block_size"] == 8 and router.request_router_kwargs["max_imbalance"] == 3
    assert ingress_options(spec)["max_ongoing_requests"] == 32 * 4


def test_each_engine_replica_takes_one_device():
    spec = spec_from_args({"num_gpus": "1", "data_parallel_size": "4"})
    assert replica_engine_config(spec).device == "cuda" and replica_engine_config(spec).data_parallel_size == 1
    assert replica_engine_config(spec_from_args({"device": "cpu"})).device == "cpu"


def test_the_command_line_builds_the_same_application():
    args = build_parser().parse_args(["serve", "--ray", "--autoscale", "2:5", "--no-prefix-affinity",
                                      "--block-size", "8", "--api-key", "k"])
    spec = cli_spec(args.model, cli_engine_config(args), cli_server_config(args), args.num_replicas,
                    args.autoscale, not args.no_prefix_affinity, args.replica_num_gpus)
    assert (spec.scaling.min_replicas, spec.scaling.max_replicas) == (2, 5)
    assert not spec.routing.prefix_affinity and spec.engine.block_size == 8 and spec.server.api_key == "k"


def test_a_bad_autoscale_range_is_a_clear_error(capsys):
    assert main(["serve", "--ray", "--autoscale", "4"]) == 2
    assert "MIN:MAX" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--ray", "--num-replicas", "2", "--autoscale", "1:2"])
