"""JSON forms of the engine's values, in one place.

Strict JSON (Inf/NaN spelled as Prometheus does), the store's compact rows, served documents.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from operator import attrgetter
from typing import Any

from rollbackd.engine import Check, Outcome
from rollbackd.readings import labels_of
from rollbackd.verdicts import RuleResult, Verdict

_SPELLED = {math.inf: "+Inf", -math.inf: "-Inf"}
_UNSPELLED = {"+Inf": math.inf, "-Inf": -math.inf, "Inf": math.inf, "NaN": math.nan}


def float_out(value: float | None) -> float | str | None:
    """A number for strict JSON: finite as is, ``+Inf`` / ``-Inf`` / ``NaN`` as strings."""
    if value is None or math.isfinite(value):
        return value
    return _SPELLED.get(value, "NaN")


def float_in(value: object) -> float | None:
    """The number ``float_out`` wrote."""
    if value is None:
        return None
    if isinstance(value, str):
        return _UNSPELLED[value]
    assert isinstance(value, int | float)
    return float(value)


def result_to_json(result: RuleResult) -> dict[str, Any]:
    """A rule result as a strict-JSON-able dict (labels as an object)."""
    return {
        "rule": result.rule,
        "labels": dict(result.labels),
        "value": float_out(result.value),
        "threshold": float_out(result.threshold),
        "direction": result.direction,
        "unit": result.unit,
        "verdict": result.verdict.value,
        "reason": result.reason,
        "at": result.at,
    }


def result_from_json(data: dict[str, Any]) -> RuleResult:
    """Rebuild a rule result from ``result_to_json``'s output."""
    threshold = float_in(data["threshold"])
    assert threshold is not None
    return RuleResult(
        rule=data["rule"],
        labels=labels_of(data["labels"]),
        value=float_in(data["value"]),
        threshold=threshold,
        direction="above" if data["direction"] == "above" else "below",
        unit=data["unit"],
        verdict=Verdict(data["verdict"]),
        reason=data["reason"],
        at=float(data["at"]),
    )


def check_to_json(check: Check) -> dict[str, Any]:
    """A check with all its results as a strict-JSON-able dict."""
    return {
        "monitor": check.monitor,
        "at": check.at,
        "outcome": check.outcome.value,
        "results": [result_to_json(r) for r in check.results],
    }


def check_from_json(data: dict[str, Any]) -> Check:
    """Rebuild a check from ``check_to_json``'s output."""
    return Check(
        monitor=data["monitor"],
        at=float(data["at"]),
        outcome=Outcome(data["outcome"]),
        results=tuple(result_from_json(r) for r in data["results"]),
    )


# --- compact rows (the store's check history) --------------------------------------------

_ROW = attrgetter(*RuleResult.__dataclass_fields__)  # the field order of the rows


def _compact_encoder() -> Callable[[object], str]:
    """JSON without spaces; ``Infinity``/``NaN`` as ``json.dumps`` writes them.

    ``JSONEncoder.encode`` builds the C encoder again on every call, through two Python
    frames: a third of a check row's cost. This builds it once, with the arguments
    ``JSONEncoder.iterencode`` gives it (same output; ``test_codec`` compares the two).
    """
    encoder = json.JSONEncoder(separators=(",", ":"), check_circular=False)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # a Python without the C accelerator
        return encoder.encode
    chunks = make(
        None, encoder.default, json.encoder.encode_basestring_ascii, None, ":", ",",
        False, False, True,
    )  # fmt: skip

    def encode(value: object) -> str:
        return "".join(chunks(value, 0))

    return encode


_ENCODE = _compact_encoder()


def compact(value: object) -> str:
    """JSON without spaces (the store's columns)."""
    return _ENCODE(value)


def encode_results(results: tuple[RuleResult, ...]) -> str:
    """Encode results as JSON rows; several times cheaper than ``result_to_json`` dicts."""
    return _ENCODE(list(map(_ROW, results)))


def decode_results(text: str) -> tuple[RuleResult, ...]:
    """The results ``encode_results`` wrote."""
    return tuple(
        RuleResult(rule, tuple(map(tuple, labels)), value, threshold, direction, unit,
                   Verdict(verdict), reason, at)
        for rule, labels, value, threshold, direction, unit, verdict, reason, at in json.loads(text)
    )  # fmt: skip


# --- documents (HTTP answers, incident records) ------------------------------------------


def dumps(data: object, *, indent: int | None = None) -> str:
    """Strict JSON of any JSON-able document, non-finite floats spelled as strings."""
    try:
        return json.dumps(data, allow_nan=False, indent=indent)
    except ValueError:  # strict JSON has no Inf/NaN: spell them as Prometheus does
        return json.dumps(_finite(data), allow_nan=False, indent=indent)


def _finite(data: object) -> object:
    if isinstance(data, float):
        return float_out(data)
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(v) for v in data]
    return data
