"""``fast_init``: the same objects as the generated ``__init__``, built by setting slots."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from rollbackd.engine import Check, MonitorState, Outcome, Transition
from rollbackd.frozen import fast_init
from rollbackd.readings import Reading, ReadingStatus
from rollbackd.verdicts import RuleResult, Verdict

FIELDS: list[Any] = [
    ("name", str),
    ("at", float),
    ("value", float | None, dataclasses.field(default=None)),
    ("labels", tuple, dataclasses.field(default=())),
]


def point() -> type[Any]:
    """A fresh frozen slots dataclass with two required fields and two defaults."""
    return dataclasses.make_dataclass("Point", FIELDS, frozen=True, slots=True)


def test_objects_equal_the_generated_init_ones() -> None:
    """Positional, keyword and default arguments: same fields, equality, hash and repr."""
    plain, fast = point(), fast_init(point())
    for args, kwargs in [
        (("a", 1.0), {}),
        (("a", 1.0, 2.5), {}),
        (("a",), {"at": 3.0, "labels": (("k", "v"),)}),
        ((), {"name": "b", "at": 4.0, "value": None}),
    ]:
        want, got = plain(*args, **kwargs), fast(*args, **kwargs)
        assert dataclasses.astuple(got) == dataclasses.astuple(want)
        assert repr(got) == repr(want)
        assert hash(got) == hash(want)
        assert got == fast(*args, **kwargs)
        assert dataclasses.replace(got, value=9.0).value == 9.0


def test_objects_stay_frozen_and_arguments_are_checked() -> None:
    """Assigning still raises; missing, unknown and extra arguments raise TypeError."""
    fast = fast_init(point())
    made = fast("a", 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.at = 2.0
    with pytest.raises(TypeError, match="at"):
        fast("a")
    with pytest.raises(TypeError, match="unit"):
        fast("a", 1.0, unit="%")
    with pytest.raises(TypeError):
        fast("a", 1.0, 2.0, (), "extra")


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda: dataclasses.make_dataclass("P", [("a", int)], slots=True), "frozen slots"),
        (lambda: dataclasses.make_dataclass("P", [("a", int)], frozen=True), "frozen slots"),
        (
            lambda: dataclasses.make_dataclass(
                "P", [("a", list, dataclasses.field(default_factory=list))], frozen=True, slots=True
            ),
            "P.a needs the generated",
        ),
        (
            lambda: dataclasses.make_dataclass(
                "P", [("a", int, dataclasses.field(kw_only=True))], frozen=True, slots=True
            ),
            "P.a needs the generated",
        ),
        (
            lambda: dataclasses.make_dataclass(
                "P",
                [("a", int)],
                frozen=True,
                slots=True,
                namespace={"__post_init__": lambda self: None},
            ),
            "__post_init__",
        ),
    ],
)
def test_classes_it_cannot_serve_are_refused(make: Any, why: str) -> None:
    """Not frozen, no slots, a default factory, keyword-only, ``__post_init__``: refused."""
    with pytest.raises(TypeError, match=why):
        fast_init(make())


def test_the_values_of_a_check_use_it() -> None:
    """The five kinds of value every check builds, with their defaults."""
    for cls in (Reading, RuleResult, Check, MonitorState, Transition):
        assert "_set0" in cls.__init__.__code__.co_names, cls
    assert MonitorState().checks == 0
    assert MonitorState(checks=3, last_outcome=Outcome.OK).last_outcome is Outcome.OK
    reading = Reading(ReadingStatus.OK, 1.0, 0.5)
    assert (reading.labels, reading.reason) == ((), "")
    result = RuleResult("r", (), 0.5, 1.0, "above", "%", Verdict.OK, "fine", 1.0)
    check = Check("m", 1.0, Outcome.OK, (result,))
    assert check.shadow_outcome is None
    assert Transition(MonitorState(), (), "why").state == MonitorState()
