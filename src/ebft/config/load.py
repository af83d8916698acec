"""Loading: YAML (duplicate keys rejected) -> ``--key.path=value`` overrides -> axolotl-compatibility
pass -> pydantic, with every problem rendered as one ``key.path: reason (got value)`` line of a single
:class:`~ebft.errors.ConfigError`; and :func:`dump_config`, the inverse."""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from ebft.config.base import Problems, show, unknown_key_reason
from ebft.config.compat import (
    FSDP_IGNORED_KEYS,
    FSDP_LIMITED_KEYS,
    IGNORED_AXOLOTL_KEYS,
    IGNORED_TRL_KEYS,
    IGNORED_VLLM_KEYS,
    LEGACY_ATTENTION_FLAGS,
    LIMITED_TRL_KEYS,
    SAMPLING_KWARG_TRL_KEYS,
    UNSUPPORTED_AXOLOTL_KEYS,
    UNSUPPORTED_TRL_KEYS,
    axolotl_compat,
)
from ebft.config.sections import DatasetSpec, FsdpSection, GenerationKwargs, TrlSection, VllmSection
from ebft.config.train import TrainConfig
from ebft.errors import ConfigError


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that rejects a key written twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable key: let the base class report it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_error(where: str, exc: yaml.YAMLError) -> ConfigError:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return ConfigError(f"{where}: malformed YAML{at}: {problem}")


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read, override and validate the YAML config at ``path``; raises ConfigError on any problem."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{source}: is a directory, not a config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read the config file ({exc})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise _yaml_error(source, exc) from None
    return parse_config(data, source=source, overrides=overrides)


def parse_config(data: Any, source: str = "<config>", overrides: Sequence[str] = ()) -> TrainConfig:
    """Validate an already-parsed config mapping; ``source`` names it in error messages."""
    if not isinstance(data, Mapping):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise ConfigError(f"{source}: the top level must be a mapping of keys to values (got {got})")
    raw = copy.deepcopy(dict(data))
    for text in overrides:
        _apply_override(raw, text, source)
    notes, problems = axolotl_compat(raw)
    cfg = None
    try:
        cfg = TrainConfig.model_validate(raw)
    except ValidationError as exc:
        problems += _problem_lines(exc)
    if problems:
        where = source + (f" (with overrides {' '.join(overrides)})" if overrides else "")
        count = f"{len(problems)} problems" if len(problems) > 1 else "1 problem"
        raise ConfigError(f"{where}: invalid config, {count}:\n" + "\n".join(f"  {p}" for p in problems))
    assert cfg is not None
    cfg._load_warnings = notes
    return cfg


def dump_config(cfg: TrainConfig) -> str:
    """The resolved config (every key, defaults filled in) as YAML that :func:`load_config` reads back."""
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False, allow_unicode=True, default_flow_style=None)


# ---------------------------------------------------------------------------------------------
# Overrides


def _apply_override(raw: dict[str, Any], text: str, source: str) -> None:
    """Apply one ``--key.path=value`` to ``raw`` in place; the value is parsed as YAML."""
    syntax = f"{source}: override {text!r}: expected --key.path=value, e.g. --ebft.stride=4 or --datasets.0.path=x"
    if not text.startswith("--") or "=" not in text:
        raise ConfigError(syntax)
    key, _, value_text = text[2:].partition("=")
    # axolotl's CLI spells keys with dashes (--ebft.context-length); keys here never contain one.
    parts = [part.replace("-", "_") for part in key.split(".")]
    if not all(parts):
        raise ConfigError(syntax)
    try:
        value = yaml.load(value_text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise _yaml_error(f"{source}: override {text!r}", exc) from None

    node: Any = raw
    for depth, part in enumerate(parts):
        here = ".".join(parts[: depth + 1])
        last = depth == len(parts) - 1
        if isinstance(node, dict):
            if last:
                node[part] = value
            elif not isinstance(node.get(part), (dict, list)):
                if node.get(part) is not None:
                    raise ConfigError(f"{source}: override {text!r}: {here} is a single value, not a section")
                node[part] = {}
            if not last:
                node = node[part]
        elif isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"{source}: override {text!r}: {here}: no such list item "
                    f"(the list has {len(node)} item{'s' if len(node) != 1 else ''}, indices from 0)"
                )
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        else:
            raise ConfigError(f"{source}: override {text!r}: {'.'.join(parts[:depth])} is a single value")


# ---------------------------------------------------------------------------------------------
# Error messages


def _path(loc: Sequence[Any]) -> str:
    return ".".join(str(part) for part in loc)


def _model_at(loc: Sequence[Any]) -> type[BaseModel] | None:
    """The model class whose keys live at ``loc`` (list indices step into the item type)."""
    model: type[BaseModel] = TrainConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        found = _find_model(field.annotation) if field is not None else None
        if found is None:
            return None
        model = found
    return model


def _find_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _find_model(arg)
        if found is not None:
            return found
    return None


def _valid_keys(container: Sequence[Any]) -> list[str]:
    model = _model_at(container)
    if model is None:
        return []
    keys = list(model.model_fields)
    if model is TrainConfig:
        keys += [*IGNORED_AXOLOTL_KEYS, *UNSUPPORTED_AXOLOTL_KEYS, *LEGACY_ATTENTION_FLAGS, "report_to"]
    if model is TrlSection:
        keys += [*UNSUPPORTED_TRL_KEYS, *IGNORED_TRL_KEYS, *LIMITED_TRL_KEYS]
    if model is VllmSection:
        keys += list(IGNORED_VLLM_KEYS)
    if model is DatasetSpec:
        keys.append("train_on_split")
    if model is FsdpSection:
        keys += [*FSDP_IGNORED_KEYS, *FSDP_LIMITED_KEYS]
    return keys


def _unknown_generation_kwarg(key: str) -> str:
    if key in SAMPLING_KWARG_TRL_KEYS:
        return f"not a generation_kwargs key; set trl.{SAMPLING_KWARG_TRL_KEYS[key]} instead"
    close = difflib.get_close_matches(key, list(GenerationKwargs.model_fields), n=1, cutoff=0.6)
    if close:
        return f"unknown key, did you mean {close[0]!r}?"
    return (
        "unknown key; generation_kwargs takes only stop_token_ids, the other sampling settings have trl keys "
        "of their own (temperature, top_p, top_k, min_p, repetition_penalty, max_completion_length)"
    )


_MISSING_HINTS = {
    "rl": "required: add `rl: ebft`",
    "ebft": "the `ebft:` section is required when rl: ebft (for example `ebft: {mode: strided}`)",
    "base_model": "required: the Hub id, local directory or .gguf file of the model to fine-tune",
    "datasets": "required: a list of datasets, e.g. `datasets: [{path: my.jsonl, type: ebft_pretrain.transform}]`",
}


def _reason(err: Any) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        return f"must be {bounds[kind]} {next(iter(ctx.values()))}"
    if kind == "literal_error":
        # Spelled as in YAML: true/false, not Python's True/False.
        return "must be " + re.sub(r"\b(True|False)\b", lambda m: m.group(1).lower(), ctx["expected"])
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return "must be a whole number"
    if kind in ("float_type", "float_parsing"):
        return "must be a number"
    if kind == "finite_number":
        return "must be a finite number"
    if kind in ("bool_type", "bool_parsing"):
        return "must be true or false"
    if kind == "string_type":
        return "must be a string"
    if kind == "list_type":
        return "must be a list"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return "must be a mapping of keys to values"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length', 1)} item(s)"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return err["msg"]


def _problem_lines(exc: ValidationError) -> list[str]:
    lines: list[str] = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = _path(loc)
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, Problems):
            lines += [f"{_path((*loc, sub))}: {reason}" for sub, reason in cause.items]
        elif err["type"] == "extra_forbidden" and _model_at(loc[:-1]) is GenerationKwargs:
            lines.append(f"{path}: {_unknown_generation_kwarg(str(loc[-1]))}")
        elif err["type"] == "extra_forbidden":
            lines.append(f"{path}: {unknown_key_reason(str(loc[-1]), _valid_keys(loc[:-1]))}")
        elif err["type"] == "missing" or (path == "ebft" and err["input"] is None):
            lines.append(f"{path}: {_MISSING_HINTS.get(path, 'required key is missing')}")
        elif path == "rl" and err["type"] == "literal_error":
            lines.append(f"rl: must be 'ebft', the only method this trainer implements (got {show(err['input'])})")
        else:
            lines.append(f"{path}: {_reason(err)} (got {show(err['input'])})")
    return lines
