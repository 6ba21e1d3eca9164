"""The configuration reference (docs/configuration.md), generated from the schema itself.

Every key, its type, default, bounds and one-line description come from the dataclasses in
`nmt.config` and the option classes the zoo registers, so the reference cannot drift from the code
(a test regenerates it and compares).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from nmt.config import COMPONENT_SCHEMAS, Component, Config

BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return " \\| ".join(str(a) for a in args)
    if type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return f"{_type_name(inner[0])} or null"
    if origin is list:
        return f"list of {_type_name(args[0])}"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        return f"`{value['type']}`" if isinstance(value, dict) and "type" in value else f"`{value}`"
    if f.default is dataclasses.MISSING:
        return "required"
    return "null" if f.default is None else f"`{f.default}`"


def _rows(cls: type, prefix: str) -> list[str]:
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "path" and cls is Config:
            continue
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            rows.extend(_rows(tp, f"{key}."))
            continue
        bounds = ", ".join(f"{sym} {f.metadata[name]}" for name, sym in BOUNDS if f.metadata.get(name) is not None)
        kind = f"`type:` one of {', '.join(sorted(COMPONENT_SCHEMAS[f.name]))}" if tp is Component \
            else _type_name(tp)
        doc = f.metadata.get("doc", "").replace("|", "\\|")
        rows.append(f"| `{key}` | {kind}{' (' + bounds + ')' if bounds else ''} | {_default(f)} | {doc} |")
    return rows


def _table(rows: list[str]) -> list[str]:
    return ["| key | type | default | meaning |", "|---|---|---|---|", *rows, ""]


def render() -> str:
    """The whole reference as Markdown."""
    import nmt.models  # noqa: F401  (registers the zoo's option classes)

    lines = ["# Configuration reference", "",
             "Generated from the schema by `python scripts/config_reference.py`; do not edit by hand.",
             "Unknown keys, wrong types and out-of-range values are errors naming the key. Any key can be",
             "overridden on the command line: `nmt train CONFIG --set train.optimizer.lr=0.0005`.", ""]
    for section in ("data", "model", "train"):
        cls = typing.get_type_hints(Config)[section]
        lines += [f"## `{section}:`", "", *_table(_rows(cls, f"{section}."))]
    for kind, schemas in COMPONENT_SCHEMAS.items():
        lines += [f"## `model.{kind}` types", ""]
        for name, schema in sorted(schemas.items()):
            doc = (schema.__doc__ or "").strip().splitlines()
            lines += [f"### `{kind}.type: {name}`", ""]
            if doc and not doc[0].startswith(schema.__name__ + "("):
                lines += [doc[0], ""]
            rows = _rows(schema, f"model.{kind}.")
            lines += _table(rows) if rows else ["No options.", ""]
    return "\n".join(lines)
