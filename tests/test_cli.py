"""`gptserve info` and `gptserve generate` on the command line, and their errors."""
from __future__ import annotations

import pytest

from gptserve.cli import main
from gptserve.model.tokenizer import Tokenizer
from gptserve.weights.loader import load_model, read_config

PROMPT = "The meaning of life is"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_info_prints_the_parameter_count_and_the_12_d2_l_estimate(capsys, tiny_checkpoint):
    code, out, _ = run(capsys, "info", "--model", str(tiny_checkpoint), "--device", "cpu")
    assert code == 0
    cfg = read_config(tiny_checkpoint)
    n = cfg.num_parameters()
    assert f"parameters:       {n:,} ({n / 1e6:.1f}M)" in out
    assert f"12*d^2*L:         {12 * 64**2 * 2:,}" in out
    assert "CPU kernels:      " in out
    code, out, _ = run(capsys, "info", "--model", str(tiny_checkpoint), "--device", "cpu", "--dtype", "float32")
    assert f"weights memory:   {n * 4 / 2**20:.1f} MiB as held\n" in out  # every weight once, in float32
    code, out, _ = run(capsys, "info", "--model", str(tiny_checkpoint), "--device", "cpu", "--quantization", "int8")
    assert "as held (the linear layers and the tied embedding and LM head in int8, once)" in out


def test_generate_greedy_prints_the_prompt_and_its_continuation(capsys, tiny_checkpoint, greedy_decode):
    argv = ["generate", PROMPT, "--model", str(tiny_checkpoint), "--device", "cpu",
            "--temperature", "0", "--max-tokens", "5", "--ignore-eos"]
    code, out, _ = run(capsys, *argv)
    assert code == 0
    tokenizer = Tokenizer.from_folder(tiny_checkpoint)
    tokens = greedy_decode(load_model(tiny_checkpoint), tokenizer.encode(PROMPT), 5)
    assert out == PROMPT + tokenizer.decode(tokens) + "\n"
    assert run(capsys, *argv)[1] == out  # deterministic


@pytest.mark.parametrize("command", ["info", "generate"])
def test_a_missing_model_folder_exits_2_with_a_one_line_error(capsys, tmp_path, command):
    missing = str(tmp_path / "no-such-model")
    argv = [command, "--model", missing] + (["hello"] if command == "generate" else [])
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("gptserve: error: ")
    assert "does not exist" in err and missing in err
    assert "Traceback" not in err


def test_speculative_flags_make_the_engines_speculative_config():
    from gptserve.cli import build_parser
    from gptserve.cli.flags import engine_config

    args = build_parser().parse_args(["serve", "--speculative-method", "ngram", "--num-speculative-tokens", "5",
                                      "--ngram-min", "2", "--ngram-max", "3", "--speculative-max-batch", "8"])
    spec = engine_config(args).speculative
    assert (spec.method, spec.num_speculative_tokens, spec.ngram_min, spec.ngram_max, spec.max_batch) == (
        "ngram", 5, 2, 3, 8)
    assert engine_config(build_parser().parse_args(["serve"])).speculative is None


def test_structured_output_flags_make_the_servers_limits():
    from gptserve.cli import build_parser
    from gptserve.cli.flags import server_config
    from gptserve.config import ServerConfig

    args = build_parser().parse_args(["serve", "--max-schema-depth", "100", "--max-schema-size", "20000",
                                      "--max-choices", "50000", "--max-tools", "256", "--max-grammar-length", "9",
                                      "--max-regex-repetition", "7", "--no-json-number-bounds"])
    cfg = server_config(args)
    assert (cfg.max_schema_depth, cfg.max_schema_size, cfg.max_choices, cfg.max_tools, cfg.max_grammar_length,
            cfg.max_regex_repetition, cfg.json_number_bounds) == (100, 20000, 50000, 256, 9, 7, False)
    defaults, default = server_config(build_parser().parse_args(["serve"])), ServerConfig()
    assert (defaults.max_schema_depth, defaults.max_schema_size, defaults.json_number_bounds) == (
        default.max_schema_depth, default.max_schema_size, True)


def test_a_bad_speculative_setting_exits_2_with_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["generate", "x", "--speculative-method", "ngram", "--num-speculative-tokens", "0"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == "gptserve: error: num_speculative_tokens must be at least 1\n"


def test_a_draft_with_another_vocabulary_is_refused(capsys, tiny_checkpoint, make_checkpoint):
    other = make_checkpoint(vocab_size=1000)
    code = main(["generate", "hello", "--model", str(tiny_checkpoint), "--max-tokens", "2",
                 "--speculative-method", "draft", "--draft-model", str(other)])
    assert code == 2
    assert "vocabulary" in capsys.readouterr().err
