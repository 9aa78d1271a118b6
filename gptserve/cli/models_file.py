"""The models a server serves, from `--model NAME=PATH` flags or a TOML `--models-file`.

A models file lists one table per model; every key but `name`, `model` and `chat_template`
is an engine setting, named as in EngineConfig (the flags' names with underscores), and
overrides the command line's value for that model:

    [[models]]
    name = "small"
    model = "distilgpt2"
    quantization = "int8"
    kv_cache_memory = "256MiB"

    [[models]]
    name = "medium"
    model = "/models/gpt2-medium"
    max_model_len = 512
    speculative = { method = "draft", draft_model = "distilgpt2" }
    lora_modules = { sql = "/adapters/sql" }
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from gptserve.config import EngineConfig, ModelSpec, SpeculativeConfig, parse_bytes

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ENGINE_FIELDS = {f.name: f for f in dataclasses.fields(EngineConfig)}
SIZES = ("kv_cache_memory",)  # may be written "256MiB"


class ModelsFileError(ValueError):
    """A models file or a --model flag that can't be read; the message says where."""


def specs_from_flags(values: list[str], engine: EngineConfig) -> list[ModelSpec]:
    """`--model [NAME=]PATH_OR_HUB_ID`, given once or more; a model without a name is named
    after what it loads (the bundled one, `gptserve-default`)."""
    if len(values or []) > 1 and engine.lora_modules:
        raise ModelsFileError("--lora-modules adapts one model; with several, give each its adapters in a "
                              "--models-file")
    specs = []
    for value in values or [None]:
        name, sep, model = (value or "").partition("=")
        if not sep or "/" in name:  # no name given (a path may hold "=" past a slash)
            name, model = "", value
        specs.append(ModelSpec(name or model or "gptserve-default", model or None, _copy(engine)))
    _check_names(specs)
    return specs


def specs_from_file(path: str, engine: EngineConfig) -> list[ModelSpec]:
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise ModelsFileError(f"cannot read the models file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ModelsFileError(f"{path} is not valid TOML: {e}") from None
    tables = data.get("models")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise ModelsFileError(f"{path}: expected one [[models]] table per model")
    specs = [_spec(table, engine, f"{path}: model {i + 1}") for i, table in enumerate(tables)]
    _check_names(specs)
    return specs


def _spec(table: dict, engine: EngineConfig, where: str) -> ModelSpec:
    table = dict(table)
    name = table.pop("name", None)
    if not isinstance(name, str) or not name:
        raise ModelsFileError(f"{where}: every model needs a name")
    model = table.pop("model", None)
    template = table.pop("chat_template", None)
    settings = {}
    for key, value in table.items():
        if key not in ENGINE_FIELDS:
            raise ModelsFileError(f"{where} ({name}): unknown setting {key!r}; the settings are "
                                  f"{', '.join(sorted(ENGINE_FIELDS))}")
        try:
            settings[key] = _value(key, value)
        except (TypeError, ValueError) as e:
            raise ModelsFileError(f"{where} ({name}): {key}: {e}") from None
    return ModelSpec(name, model, dataclasses.replace(_copy(engine), **settings), template)


def _copy(engine: EngineConfig) -> EngineConfig:
    return dataclasses.replace(engine, lora_modules=dict(engine.lora_modules))


def _value(key: str, value):
    if key in SIZES and isinstance(value, str):
        return parse_bytes(value)
    if key == "speculative":
        return SpeculativeConfig(**value) if isinstance(value, dict) else None
    if key == "lora_modules" and not (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
        raise TypeError("a table of adapter names and folders")
    return value


def _check_names(specs: list[ModelSpec]) -> None:
    seen: set[str] = set()
    for spec in specs:
        for name in [spec.name, *spec.engine.lora_modules]:
            if name in seen:
                raise ModelsFileError(f"the name {name!r} is given twice (models and adapters share one namespace)")
            seen.add(name)
