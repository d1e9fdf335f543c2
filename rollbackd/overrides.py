"""``ROLLBACKD_<KEY>`` environment variables over a model's keys, as pydantic-settings did.

Names match in any case; the environment wins over the file; a key that takes a table reads
JSON, merged into the file's table; a value that is not JSON goes to the model as written,
whose validator then names the problem.
"""

from __future__ import annotations

import json
import os
import types
import typing
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

_CONTAINERS = (dict, list, tuple, set, frozenset)


def overridden(
    model: type[BaseModel],
    given: Mapping[str, Any],
    prefix: str,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """``given`` (keys in any case) with ``prefix + KEY`` variables of ``environ`` over it."""
    values = _by_field_name(model, given)
    environ = os.environ if environ is None else environ
    found = {name.lower(): value for name, value in environ.items()}  # the last of a case wins
    for name, field in model.model_fields.items():
        text = found.get(f"{prefix}{name}".lower())
        if text is None:
            continue
        value = _decoded(field.annotation, text)
        if value is None:  # JSON null leaves the file's value, as pydantic-settings did
            continue
        if isinstance(value, dict) and isinstance(values.get(name), dict):
            value = _merged(values[name], value)
        values[name] = value
    return values


def _by_field_name(model: type[BaseModel], given: Mapping[str, Any]) -> dict[str, Any]:
    """Keys renamed to the field they name in any case; the first one written wins."""
    fields = {name.lower(): name for name in model.model_fields}
    values: dict[str, Any] = {}
    unknown: dict[str, Any] = {}
    for key, value in given.items():
        name = fields.get(key.lower())
        if name is None:
            unknown[key] = value  # the model refuses it by name
        elif name not in values:
            values[name] = value
    return values | unknown


def _decoded(annotation: Any, text: str) -> Any:
    """A table key's value from JSON (keys matched in any case); other keys' text as is."""
    if not _takes_json(annotation):
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return text
    model = _model_of(annotation)
    if model is not None and isinstance(value, dict):
        return _keys_of(model, value)
    return value


def _takes_json(annotation: Any) -> bool:
    """Whether a key is a table or a list (or may be one: ``RateLimit | None``)."""
    annotation = _unannotated(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_takes_json(member) for member in typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, (str, bytes)):
        return False
    kind = origin or annotation
    return isinstance(kind, type) and issubclass(kind, (BaseModel, *_CONTAINERS))


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The model a key holds, optional or not."""
    annotation = _unannotated(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [_model_of(member) for member in typing.get_args(annotation)]
        return next((m for m in models if m is not None), None)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _unannotated(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _keys_of(model: type[BaseModel], table: dict[str, Any]) -> dict[str, Any]:
    """``{"COUNT": 3}`` -> ``{"count": 3}`` for the model's fields, nested tables included."""
    fields = {name.lower(): (name, field) for name, field in model.model_fields.items()}
    out: dict[str, Any] = {}
    for key, value in table.items():
        name, field = fields.get(key.lower(), (key, None))
        nested = _model_of(field.annotation) if field is not None else None
        out[name] = _keys_of(nested, value) if nested and isinstance(value, dict) else value
    return out


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on ``base``, tables merged key by key."""
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        out[key] = (
            _merged(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
        )
    return out
