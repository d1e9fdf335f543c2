"""What counts as a number, and how much of what was received a reason may echo."""

from __future__ import annotations

import math

import pytest

from rollbackd.readings import excerpt, parse_number


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("0", 0.0),
        ("-0", -0.0),
        ("42", 42.0),
        ("99.5", 99.5),
        ("-1.25e-3", -0.00125),
        ("1E+6", 1e6),
        (7, 7.0),
        (2.5, 2.5),
    ],
)
def test_finite_decimal_numbers_are_numbers(raw: object, expected: float) -> None:
    """JSON numbers and ASCII decimal text (JSON's number grammar) read as their float."""
    assert parse_number(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "1e309",
        "-1e309",
        "Infinity",
        "-Infinity",
        "inf",
        "NaN",
        "nan",
        "+Inf",
        "9_8",
        "\u0669\u0668",  # Arabic-Indic digits nine and eight
        "\uff19\uff18",  # fullwidth digits
        "+5",
        "05",
        ".5",
        "5.",
        "0x10",
        " 5",
        "",
        True,
        False,
        None,
        math.inf,
        -math.inf,
        math.nan,
        10**400,
        [1],
    ],
)
def test_everything_else_is_not_a_number(raw: object) -> None:
    """Infinities, NaN, out-of-range, underscores, non-ASCII digits and booleans are no number."""
    assert parse_number(raw) is None


def test_excerpt_truncates_long_text_with_an_ellipsis() -> None:
    """A reason echoes at most 200 characters of what it was given, marked with an ellipsis."""
    assert excerpt("up") == "up"
    long = "x" * 1_000_000
    assert excerpt(long) == "x" * 200 + "…"
    assert excerpt(long, 10) == "x" * 10 + "…"
