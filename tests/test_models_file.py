"""The models `gptserve serve` serves: `--model [NAME=]MODEL` flags and a TOML --models-file,
and what is refused with a one-line error."""
from __future__ import annotations

import re

import pytest

from gptserve.cli import build_parser, main
from gptserve.cli.flags import engine_config
from gptserve.cli.models_file import ModelsFileError, specs_from_file, specs_from_flags
from gptserve.config import EngineConfig, SpeculativeConfig


def serve_args(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_model_flags_name_each_model_and_share_the_engine_flags():
    args = serve_args("--model", "small=distilgpt2", "--model", "/models/gpt2-medium", "--dtype", "float32")
    specs = specs_from_flags(args.model, engine_config(args))
    assert [(s.name, s.model) for s in specs] == [("small", "distilgpt2"), ("/models/gpt2-medium",
                                                                             "/models/gpt2-medium")]
    assert all(s.engine.dtype == "float32" for s in specs)
    assert specs[0].engine is not specs[1].engine


def test_no_model_flag_is_the_bundled_model_and_a_path_with_an_equals_sign_is_a_path():
    [bundled] = specs_from_flags(None, EngineConfig())
    assert (bundled.name, bundled.model) == ("gptserve-default", None)
    [path] = specs_from_flags(["/data/run=3/model"], EngineConfig())
    assert (path.name, path.model) == ("/data/run=3/model", "/data/run=3/model")


def test_a_models_file_sets_each_models_engine(tmp_path):
    file = tmp_path / "models.toml"
    file.write_text('''
[[models]]
name = "small"
model = "distilgpt2"
quantization = "int8"
kv_cache_memory = "256MiB"

[[models]]
name = "medium"
model = "/models/gpt2-medium"
max_model_len = 512
speculative = { method = "ngram", num_speculative_tokens = 2 }
lora_modules = { sql = "/adapters/sql" }
chat_template = "/templates/chat.jinja"
''')
    small, medium = specs_from_file(str(file), EngineConfig(max_num_seqs=8))
    assert (small.name, small.model, small.engine.quantization, small.engine.kv_cache_memory) == (
        "small", "distilgpt2", "int8", 256 * 2**20)
    assert medium.engine.max_model_len == 512 and medium.engine.lora_modules == {"sql": "/adapters/sql"}
    assert medium.engine.speculative == SpeculativeConfig("ngram", num_speculative_tokens=2)
    assert medium.chat_template == "/templates/chat.jinja"
    assert small.engine.max_num_seqs == medium.engine.max_num_seqs == 8  # the command line's, where unset
    assert small.engine.lora_modules == {} and small.engine.speculative is None


@pytest.mark.parametrize("text, words", [
    ("[[models]]\nname = 'a'\nmodel = 'x'\nbogus = 1\n", "unknown setting 'bogus'"),
    ("[[models]]\nmodel = 'x'\n", "needs a name"),
    ("[[models]]\nname = 'a'\n[[models]]\nname = 'a'\n", "given twice"),
    ("[[models]]\nname = 'a'\nlora_modules = { a = '/x' }\n", "given twice"),
    ("[[models]]\nname = 'a'\nkv_cache_memory = 'lots'\n", "kv_cache_memory"),
    ("[[models]]\nname = 'a'\nspeculative = { method = 'magic' }\n", "unknown speculative method"),
    ("name = 'a'\n", "one [[models]] table per model"),
    ("[[models]\n", "not valid TOML"),
], ids=["unknown-key", "no-name", "same-name", "adapter-named-as-a-model", "bad-size", "bad-speculative",
        "no-tables", "bad-toml"])
def test_a_bad_models_file_is_refused_naming_what(tmp_path, text, words):
    file = tmp_path / "models.toml"
    file.write_text(text)
    with pytest.raises(ModelsFileError, match=re.escape(words)):
        specs_from_file(str(file), EngineConfig())


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["--model", "a=x", "--models-file", "m.toml"], "not both"),
    (["--model", "a=x", "--model", "b=y", "--served-model-name", "z"], "--served-model-name names one model"),
    (["--model", "a=x", "--model", "b=y", "--lora-modules", "s=/x"], "--lora-modules adapts one model"),
    (["--models-file", "/no/such/file.toml"], "cannot read the models file"),
], ids=["model-and-file", "served-model-name", "lora-modules", "missing-file"])
def test_serve_refuses_a_bad_set_of_models_in_one_line(capsys, argv, words):
    code, err = run(capsys, "serve", *argv)
    assert code == 2 and err.startswith("gptserve: error: ") and words in err and err.count("\n") == 1


def test_a_models_missing_chat_template_is_refused_at_start(capsys, tmp_path, tiny_checkpoint):
    file = tmp_path / "models.toml"
    file.write_text(f'[[models]]\nname = "a"\nmodel = "{tiny_checkpoint}"\nchat_template = "/no/such.jinja"\n')
    code, err = run(capsys, "serve", "--models-file", str(file), "--device", "cpu", "--port", "0")
    assert code == 2 and "chat template file '/no/such.jinja' does not exist" in err and err.count("\n") == 1


def test_a_model_larger_than_the_budget_is_refused_at_start(capsys, tiny_checkpoint):
    code, err = run(capsys, "serve", "--model", f"a={tiny_checkpoint}", "--model", f"b={tiny_checkpoint}",
                    "--device", "cpu", "--models-memory", "1MiB", "--port", "0")
    assert code == 2 and "needs about" in err and "--models-memory" in err
