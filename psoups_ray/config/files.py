"""Loading: YAML files and built-in configs, dotted ``--set`` overrides, validation with
every problem listed, and ``psoups config --explain``."""

from __future__ import annotations

import difflib
import json
import types
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from psoups_ray.config.common import TINY_MODEL
from psoups_ray.config.experiment import PsoupsConfig
from psoups_ray.errors import ConfigError

BUILTIN_CONFIGS_PACKAGE = "psoups_ray.configs"

SMOKE_TEST_OVERRIDES: tuple[str, ...] = (
    "world.tokenizer_corpus_size=1500",
    "base.sft.num_examples=300",
    "base.sft.steps=20",
    "base.sft.checkpoint_every=10",
    "base.sft.logging_steps=10",
    "base.sft.resources.cpus_per_worker=1",  # fits any cluster with one free CPU
    "base.num_sample_prompts=8",
    "base.sample.max_new_tokens=64",
    "feedback.pairs_per_pole=100",
    "feedback.prompts_per_pole=12",  # generated: 3 of them held out, so ties leave some
    "feedback.generation.max_new_tokens=32",
    "rewards.steps=10",
    "rewards.checkpoint_every=5",
    "rewards.logging_steps=5",
    "policies.steps=3",
    "policies.rollout_batch_size=8",
    "policies.minibatch_size=4",
    "policies.ppo_epochs=2",
    "policies.generation.max_new_tokens=48",
    "policies.num_eval_prompts=8",
    "policies.eval_generation.max_new_tokens=48",
    "policies.checkpoint_every=2",
    "tune.num_samples=3",
    "tune.grid_resolution=2",
    "tune.num_prompts=4",
    "tune.num_report_prompts=4",
    "tune.generation.max_new_tokens=48",
    "tune.pareto_points=3",
    "tune.pareto_prompts=2",
    "evaluate.num_prompts=4",
    "evaluate.generation.max_new_tokens=48",
    "evaluate.bootstrap_samples=100",
)
"""``--smoke-test``: every stage runs a few steps (applied before the user's ``--set``)."""


def builtin_config_names() -> list[str]:
    files = resources.files(BUILTIN_CONFIGS_PACKAGE)
    return sorted(p.name[: -len(".yaml")] for p in files.iterdir() if p.name.endswith(".yaml"))


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the
    last silently, so a section written twice would lose the first one's settings)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: the base class says so
                    break
                if first is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found the key {key!r} a second time (first on line {first.line + 1}); "
                        "give each key once",
                        key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


def safe_load_yaml(text: str) -> Any:
    """``yaml.safe_load`` refusing duplicate keys, every failure a ``yaml.YAMLError``: PyYAML's
    constructors also raise ValueError (``2001-13-01``, an int of over 4300 digits),
    AttributeError (``!!timestamp x``) and RecursionError (``[[[...`` thousands deep)."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError:
        raise
    except (ValueError, AttributeError, TypeError, RecursionError) as exc:
        raise yaml.YAMLError(f"{type(exc).__name__}: {exc}") from None


def _read_yaml(source: str | Path | None) -> tuple[dict[str, Any], str]:
    """The raw mapping of a built-in config name or a YAML path, and a label for messages."""
    name = TINY_MODEL if source is None else str(source)
    if name in builtin_config_names():
        text = resources.files(BUILTIN_CONFIGS_PACKAGE).joinpath(f"{name}.yaml").read_text()
        label = f"built-in config {name!r}"
    else:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(
                [
                    f"config {name!r} is neither a file nor a built-in config; "
                    f"built-in configs: {', '.join(builtin_config_names())}"
                ]
            )
        text = path.read_text()
        label = str(path)
    try:
        data = safe_load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{label} is not valid YAML: {exc}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{label} must hold a mapping of sections, got {type(data).__name__}"])
    return data, label


def apply_override(data: dict[str, Any], override: str) -> str | None:
    """Apply one ``dotted.key=value`` override in place (the value is parsed as YAML).

    Returns a problem description instead of applying a malformed override.
    """
    key, sep, raw_value = override.partition("=")
    key = key.strip()
    if not sep or not key:
        return f"override {override!r} must look like section.key=value, e.g. base.sft.steps=100"
    parts = key.split(".")
    if any(not part for part in parts):
        return f"override key {key!r} has an empty part"
    try:
        value = safe_load_yaml(raw_value) if raw_value.strip() else None
    except yaml.YAMLError as exc:
        return f"override {key}: value {raw_value!r} is not valid YAML ({exc.__class__.__name__})"
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            prefix = ".".join(parts[: depth + 1])
            return f"override {key}: {prefix} is a value ({child!r}), not a section with keys"
        node = child
    node[parts[-1]] = value
    return None


def _allowed_keys(loc: Sequence[str | int]) -> list[str] | None:
    """Field names of the model at ``loc`` (the parent of an unknown key)."""
    model: Any = PsoupsConfig
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        annotation = fields[part].annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
        if model is None:
            return None
    return list(model.model_fields) if model is not None else None


def _describe(error: dict[str, Any]) -> str:
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc) or "<root>"
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(error["loc"][:-1]) or []
        hint = difflib.get_close_matches(loc[-1], allowed, n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        return f"{key}: unknown key{suggestion}; allowed here: {', '.join(allowed)}"
    given = error.get("input")
    given_text = repr(given)
    if len(given_text) > 80:
        given_text = given_text[:77] + "..."
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"{key}: required but not given"
    if error["type"] == "value_error" and isinstance(given, dict):
        return f"{key}: {message}"  # a check across fields: the message names them
    return f"{key}: {message} (given {given_text})"


def load_config(source: str | Path | None = None, overrides: Sequence[str] = ()) -> PsoupsConfig:
    """Load a built-in config by name (default ``tiny``) or a YAML file, apply overrides,
    validate. Raises :class:`ConfigError` listing every problem."""
    data, label = _read_yaml(source)
    problems = [p for p in (apply_override(data, o) for o in overrides) if p is not None]
    try:
        config = PsoupsConfig.model_validate(data)
    except ValidationError as exc:
        problems.extend(_describe(e) for e in exc.errors(include_url=False))
    if problems:
        raise ConfigError(problems, source=label)
    return config


def explain(model: type[BaseModel] = PsoupsConfig, prefix: str = "") -> Iterator[str]:
    """Lines ``key (type, default): doc`` for every field, recursing into sections."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield f"{key}: {(field.description or '').strip()}"
            yield from explain(annotation, prefix=f"{key}.")
            continue
        default = field.get_default(call_default_factory=True)
        type_name = type_text(annotation)
        default_text = json.dumps(
            default, default=lambda o: o.model_dump() if isinstance(o, BaseModel) else str(o)
        )
        if len(default_text) > 60:
            default_text = default_text[:57] + "..."
        doc = " ".join((field.description or "").split())
        yield f"{key} ({type_name}, default {default_text}): {doc}"


def type_text(annotation: Any) -> str:
    """A field's type as a user reads it: ``one of a|b``, ``[float, float]``,
    ``list of one of pmorl|rlhf``, ``int | empty``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + "|".join(map(str, args))
    if origin in (Union, types.UnionType):
        return " | ".join("empty" if a is type(None) else type_text(a) for a in args)
    if origin is tuple:
        return "[" + ", ".join(type_text(a) for a in args) + "]"
    if origin is list:
        return f"list of {type_text(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping {type_text(args[0])} -> {type_text(args[1])}" if args else "mapping"
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
