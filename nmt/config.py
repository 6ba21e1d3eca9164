"""Typed, validated configuration: YAML -> dataclasses, with every mistake reported at once.

The schema is a tree of dataclasses. Model components (encoder, decoder, attention) declare their
own option dataclass when they register in the zoo; a `type:` key selects which one validates that
section. Field constraints live in the field's metadata (see `opt`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from nmt.errors import NmtError


def opt(default: Any = dataclasses.MISSING, *, gt: float | None = None, ge: float | None = None,
        lt: float | None = None, le: float | None = None, factory: Any = dataclasses.MISSING,
        doc: str = "") -> Any:
    """A dataclass field with optional numeric bounds checked by the loader."""
    meta = {"gt": gt, "ge": ge, "lt": lt, "le": le, "doc": doc}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


class Component:
    """Base of every registry-selected options dataclass; `type` names it in YAML."""

    type: str = ""  # class attribute set by register_schema, not a dataclass field


# kind ("encoder" | "decoder" | "attention") -> name -> options dataclass
COMPONENT_SCHEMAS: dict[str, dict[str, type]] = {"encoder": {}, "decoder": {}, "attention": {}}


def register_schema(kind: str, name: str, schema: type) -> None:
    """Make `schema` the options dataclass for `{kind}.type: name` (called by the zoo registries)."""
    if not issubclass(schema, Component):
        raise TypeError(f"{schema.__name__} must subclass nmt.config.Component")
    schema.type = name
    COMPONENT_SCHEMAS[kind][name] = schema


# ----------------------------------------------------------------------------------------------
# Schema of the top-level sections


@dataclass
class VocabConfig:
    type: Literal["unigram", "bpe"] = opt("unigram", doc="SentencePiece model type")
    size: int = opt(8000, gt=0, doc="subword vocabulary size (per side when not joint)")
    joint: bool = opt(True, doc="one SentencePiece model for both languages")
    src_model: str | None = opt(None, doc="reuse this SentencePiece model instead of training")
    tgt_model: str | None = opt(None, doc="reuse this target model (separate vocabularies)")
    character_coverage: float = opt(1.0, gt=0, le=1, doc="share of characters covered (rest map to unk)")
    sample_sentences: int = opt(1_000_000, gt=0, doc="sentences sampled to train SentencePiece")


@dataclass
class SamplingConfig:
    copies: int = opt(0, ge=0, doc="extra segmentations of the training data, each with subword sampling "
                                   "(BPE-dropout); training reads one per epoch, in turn with the plain one")
    alpha: float = opt(0.1, gt=0, lt=1, doc="bpe: probability of skipping each merge (BPE-dropout); unigram: "
                                            "smoothing of the sampling distribution")


@dataclass
class DataConfig:
    src_lang: str = opt("src", doc="source file suffix (language code)")
    tgt_lang: str = opt("tgt", doc="target file suffix (language code)")
    train: str = opt("", doc="path prefix: files are PREFIX.SRC_LANG and PREFIX.TGT_LANG (.gz allowed)")
    valid: str = opt("", doc="path prefix of the validation corpus (never filtered)")
    test: str | None = opt(None, doc="path prefix of a test corpus to binarize too (optional)")
    dir: str = opt("", doc="binarized output directory")
    max_len: int = opt(100, gt=0, doc="drop training pairs longer than this (subword tokens)")
    max_len_ratio: float = opt(3.0, gt=0, doc="drop training pairs whose length ratio exceeds this")
    vocab: VocabConfig = opt(factory=VocabConfig)
    sampling: SamplingConfig = opt(factory=SamplingConfig)
    workers: int | None = opt(None, gt=0, doc="encoding processes for `nmt preprocess` (default min(4, CPUs))")
    shard_size: int = opt(1_000_000, gt=0, doc="sentences per binarized shard of a split")


@dataclass
class EmbeddingsConfig:
    src_dim: int = opt(256, gt=0, doc="source embedding size")
    tgt_dim: int = opt(256, gt=0, doc="target embedding size")
    dropout: float = opt(0.1, ge=0, lt=1, doc="dropout on the embeddings")
    tie_output: bool = opt(False, doc="decoder input embedding = output projection")
    share_src_tgt: bool = opt(False, doc="one embedding table for both sides (needs a joint vocabulary)")
    scale: bool = opt(False, doc="multiply embeddings by sqrt(dim) (Transformer convention)")


@dataclass
class ModelConfig:
    encoder: Component = opt(factory=lambda: {"type": "rnn"}, doc="a mapping with `type:` and that type's options")
    decoder: Component = opt(factory=lambda: {"type": "rnn"}, doc="a mapping with `type:` and that type's options")
    attention: Component = opt(factory=lambda: {"type": "none"}, doc="used by the rnn decoder; a bare name works")
    embeddings: EmbeddingsConfig = opt(factory=EmbeddingsConfig)


@dataclass
class OptimizerConfig:
    type: Literal["adam", "adamw", "sgd"] = opt("adam", doc="optimizer")
    lr: float = opt(1e-3, gt=0, doc="peak learning rate")
    betas: list[float] = opt(factory=lambda: [0.9, 0.98], doc="adam/adamw")
    eps: float = opt(1e-9, gt=0, doc="adam/adamw")
    weight_decay: float = opt(0.0, ge=0, doc="L2 (adam, sgd) or decoupled (adamw)")
    momentum: float = opt(0.9, ge=0, lt=1, doc="sgd only")


@dataclass
class ScheduleConfig:
    type: Literal["constant", "noam", "inverse_sqrt", "linear", "cosine", "plateau"] = opt(
        "constant", doc="learning-rate schedule (plateau: decay when the early-stopping metric stalls)")
    warmup_steps: int = opt(0, ge=0, doc="linear warm-up from 0 to optimizer.lr")
    total_steps: int | None = opt(None, gt=0, doc="linear/cosine: decay horizon (default train.max_steps)")
    min_lr: float = opt(0.0, ge=0, doc="floor of the decaying schedules")
    plateau_factor: float = opt(0.5, gt=0, lt=1, doc="plateau: lr multiplier on each decay")
    plateau_patience: int = opt(2, ge=0, doc="validations without improvement before decaying")


@dataclass
class EarlyStoppingConfig:
    metric: Literal["bleu", "loss", "ppl"] = opt("bleu", doc="validation metric that picks best.pt")
    patience: int = opt(10, ge=0, doc="validations without improvement before stopping; 0 = never")


@dataclass
class TrainConfig:
    run_dir: str = opt("", doc="where checkpoints, logs and the resolved config go")
    seed: int = opt(1, doc="seeds the initialisation, dropout and batch order")
    batch_tokens: int = opt(4096, gt=0, doc="token budget per batch (max(src,tgt) padded length x sentences)")
    update_freq: int = opt(1, gt=0, doc="gradient accumulation: batches per optimizer step")
    max_steps: int = opt(10000, ge=0, doc="0 = no step limit")
    max_epochs: int = opt(100, ge=0, doc="0 = no epoch limit")
    max_minutes: float | None = opt(None, gt=0, doc="wall-time budget")
    optimizer: OptimizerConfig = opt(factory=OptimizerConfig)
    schedule: ScheduleConfig = opt(factory=ScheduleConfig)
    clip_norm: float = opt(1.0, ge=0, doc="gradient-norm clipping; 0 = off")
    label_smoothing: float = opt(0.1, ge=0, lt=1, doc="label-smoothed cross-entropy")
    precision: Literal["fp32", "bf16", "fp16", "auto"] = opt(
        "fp32", doc="bf16 autocast (CPU/CUDA), fp16 + grad scaler (CUDA); auto = fastest safe one")
    log_every: int = opt(50, gt=0, doc="steps between log.jsonl records")
    valid_every: int = opt(500, gt=0, doc="steps between validations (and checkpoints)")
    valid_beam: int = opt(1, gt=0, doc="1 = greedy decoding for validation BLEU")
    valid_batch_size: int = opt(64, gt=0, doc="sentences per decoding batch during validation")
    keep_last: int = opt(0, ge=0, doc="also keep the last N periodic checkpoints (for averaging)")
    early_stopping: EarlyStoppingConfig = opt(factory=EarlyStoppingConfig)


@dataclass
class Config:
    data: DataConfig = opt(factory=DataConfig)
    model: ModelConfig = opt(factory=ModelConfig)
    train: TrainConfig = opt(factory=TrainConfig)
    path: str | None = opt(None, doc="(set by the loader) the file this config came from")


# ----------------------------------------------------------------------------------------------
# The validating loader


class _Errors(list):
    def add(self, path: str, message: str) -> None:
        self.append(f"{path}: {message}" if path else message)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, path: str, errors: _Errors, kind: str | None = None) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, path, errors)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            errors.add(path, f"must be one of {', '.join(map(repr, choices))}, got {value!r}{extra}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            errors.add(path, f"expected a list, got {_describe(value)}")
            return value
        return [_convert(item, v, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    if tp is Component:
        return _component(kind or path.rsplit(".", 1)[-1], value, path, errors)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path, errors)
    if tp is bool:
        if not isinstance(value, bool):
            errors.add(path, f"expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.add(path, f"expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.add(path, f"expected a number, got {_describe(value)}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.add(path, f"expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"unsupported schema type {tp!r} at {path}")  # a bug in the schema, not user input


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    return f"{type(value).__name__} {value!r}"


def _component(kind: str, value: Any, path: str, errors: _Errors) -> Any:
    """Validate a registry-selected section against the options of its `type`."""
    import nmt.models  # noqa: F401  (registers the zoo's schemas)

    schemas = COMPONENT_SCHEMAS[kind]
    if isinstance(value, str):
        value = {"type": value}
    if not isinstance(value, dict):
        errors.add(path, f"expected a mapping with a 'type' key, got {_describe(value)}")
        return value
    name = value.get("type")
    if name not in schemas:
        hint = difflib.get_close_matches(str(name), list(schemas), n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        errors.add(f"{path}.type", f"unknown {kind} {name!r}; known: {', '.join(sorted(schemas))}{extra}")
        return value
    rest = {k: v for k, v in value.items() if k != "type"}
    return build(schemas[name], rest, path, errors)


def build(cls: type, data: Any, path: str = "", errors: _Errors | None = None) -> Any:
    """Build dataclass `cls` from a mapping, collecting every problem into `errors`.

    Called with `errors=None` it raises one NmtError listing all problems.
    """
    top = errors is None
    errors = _Errors() if errors is None else errors
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.add(path, f"expected a mapping, got {_describe(data)}")
        data = {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values: dict[str, Any] = {}
    for key, value in data.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in fields or key == "path" and cls is Config:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            errors.add(sub, f"unknown key{extra}")
            continue
        f = fields[key]
        before = len(errors)
        converted = _convert(hints[key], value, sub, errors, kind=key)
        if len(errors) == before:
            _check_bounds(f, converted, sub, errors)
        values[key] = converted
    for name, f in fields.items():
        if name in values:
            continue
        tp = hints[name]
        sub = f"{path}.{name}" if path else name
        if tp is Component and f.default_factory is not dataclasses.MISSING:
            values[name] = _component(name, f.default_factory(), sub, errors)
        elif dataclasses.is_dataclass(tp) and f.default_factory is not dataclasses.MISSING:
            values[name] = build(tp, {}, sub, errors)  # so nested components get their defaults too
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.add(sub, "required key is missing")
    if top and errors:
        raise NmtError(_join(errors))
    try:
        return cls(**values)
    except TypeError:  # a missing required key, already reported
        return None


def _check_bounds(f: dataclasses.Field, value: Any, path: str, errors: _Errors) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    meta = f.metadata
    checks = [("gt", lambda b: value > b, ">"), ("ge", lambda b: value >= b, ">="),
              ("lt", lambda b: value < b, "<"), ("le", lambda b: value <= b, "<=")]
    for key, ok, sign in checks:
        bound = meta.get(key)
        if bound is not None and not ok(bound):
            errors.add(path, f"must be {sign} {bound}, got {value!r}")


def _join(errors: list[str], source: str | None = None) -> str:
    prefix = f"{source}: " if source else ""
    if len(errors) == 1:
        return f"{prefix}{errors[0]}"
    return f"{prefix}{len(errors)} problems: " + "; ".join(errors)


# ----------------------------------------------------------------------------------------------
# Files and overrides


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping from `path`, turning every failure into an NmtError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NmtError(f"{path}: config file not found") from None
    except UnicodeDecodeError as e:
        raise NmtError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise NmtError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise NmtError(f"{path}{where}: invalid YAML ({problem})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise NmtError(f"{path}: the config must be a YAML mapping, got {_describe(data)}")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `key.path=value` overrides (value parsed as YAML) to a raw config mapping."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise NmtError(f"--set {item!r}: expected KEY.PATH=VALUE")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise NmtError(f"--set {item!r}: {part!r} is not a mapping")
            node = child
        node[parts[-1]] = value
    return data


def from_dict(data: Any, source: str | None = None) -> Config:
    """Validate a raw mapping into a Config; all problems in one NmtError prefixed by `source`."""
    errors = _Errors()
    cfg = build(Config, data, "", errors)
    if errors:
        raise NmtError(_join(errors, source))
    cfg.path = source
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load, override and validate a YAML config file."""
    data = apply_overrides(read_yaml(path), list(overrides or []))
    return from_dict(data, str(path))


def to_dict(cfg: Any) -> Any:
    """The plain-data form of a config (what goes into config.yaml and checkpoints)."""
    if dataclasses.is_dataclass(cfg):
        out = {"type": cfg.type} if isinstance(cfg, Component) else {}
        for f in dataclasses.fields(cfg):
            if f.name == "path":
                continue
            out[f.name] = to_dict(getattr(cfg, f.name))
        return out
    if isinstance(cfg, list):
        return [to_dict(v) for v in cfg]
    return cfg


def dump_config(cfg: Config) -> str:
    """Resolved config as YAML text (loads back into an equal Config)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
