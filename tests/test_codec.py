"""JSON forms: strict JSON round trips of checks, the store's compact rows, served documents."""

from __future__ import annotations

import json
import math

from rollbackd.codec import (
    check_from_json,
    check_to_json,
    compact,
    decode_results,
    dumps,
    encode_results,
)
from rollbackd.config import RuleConfig
from rollbackd.engine import decide
from rollbackd.readings import error, labels_of, ok
from rollbackd.verdicts import evaluate_rule

AT = 1_790_000_000.0
INF = math.inf


def rule(direction: str = "above", threshold: float = 1.0) -> RuleConfig:
    """A rule on a query, breaching on the given side of the threshold."""
    return RuleConfig.model_validate(
        {"name": "err", "source": "prom", "query": "q", direction: threshold}
    )


def test_check_round_trips_through_strict_json() -> None:
    """check_to_json is strict JSON (infinities as strings); check_from_json restores it."""
    results = [
        *evaluate_rule(rule(), [ok(INF, AT, labels_of({"a": "1", "b": "2"})), ok(0.5, AT)]),
        *evaluate_rule(rule("below", 5.0), [ok(-INF, AT)]),
        *evaluate_rule(rule(), [error("timeout", AT)]),
    ]
    check = decide("payments", results, AT)
    text = json.dumps(check_to_json(check), allow_nan=False)
    assert json.loads(text)["results"][0]["value"] == "+Inf"
    assert check_from_json(json.loads(text)) == check


def test_compact_rows_round_trip() -> None:
    """The store's compact rows decode to the very results that were encoded."""
    results = (
        *evaluate_rule(rule(), [ok(2.0, AT, labels_of({"region": "eu"})), ok(INF, AT)]),
        *evaluate_rule(rule("below", 3.0), [error("refused", AT)]),
    )
    assert decode_results(encode_results(results)) == results


def test_compact_json_is_what_json_dumps_writes() -> None:
    """The store's encoder (built once) writes what ``json.dumps`` without spaces writes."""
    values: list[object] = [
        [["err", [["région", 'é\u2028"\\']], 0.1 + 0.2, 1.0, "above", "%", "ok", "r", AT]],
        [INF, -INF, math.nan, None, True, False, 0, -7, 1e300, 5e-324],
        {"k": [1, {"n": None}], "é": "\x00"},
        "plain text",
        [],
        (1.5, "tuple"),
    ]
    for value in values:
        assert compact(value) == json.dumps(value, separators=(",", ":"))
    results = evaluate_rule(rule(), [ok(INF, AT), ok(0.25, AT), error("refused", AT)])
    rows = [[getattr(r, f) for f in r.__dataclass_fields__] for r in results]
    assert encode_results(tuple(results)) == json.dumps(rows, separators=(",", ":"))


def test_dumps_spells_non_finite_numbers() -> None:
    """A served document with Inf or NaN is still strict JSON, spelled as Prometheus does."""
    text = dumps({"a": [INF, -INF], "b": {"c": math.nan}, "d": 1.5})
    assert json.loads(text) == {"a": ["+Inf", "-Inf"], "b": {"c": "NaN"}, "d": 1.5}
