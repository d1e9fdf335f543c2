"""The shape most built-in actions share: a name and validated options, nothing to release.

Such a class is built as ``Cls(name, options)``, so the class itself is its ``ActionType.build``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from pydantic import BaseModel

OptionsT = TypeVar("OptionsT", bound=BaseModel)


@dataclass(slots=True)
class OptionsAction(Generic[OptionsT]):
    """An action made of its name and its validated options."""

    name: str
    options: OptionsT

    async def aclose(self) -> None:
        """Nothing to release: each attempt owns what it opens."""
