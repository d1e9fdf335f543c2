"""The operator page's templates: a jinja2 environment with autoescape on, and its renders.

Imported on the first page request, in the render pool: a daemon nobody looks at does not
load jinja2. Every text from the daemon (names, labels, reasons, details) is autoescaped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jinja2 import ChainableUndefined, Environment, PackageLoader

from rollbackd.pageview import (
    CONTROLS,
    control,
    counted,
    duration,
    label_set,
    number,
    pretty,
    segment,
    took,
    when,
)


class Templates:
    """The page's templates (``rollbackd/web/templates``), compiled once."""

    def __init__(self) -> None:
        self.env = Environment(
            loader=PackageLoader("rollbackd", "web/templates"),
            autoescape=True,
            undefined=ChainableUndefined,  # a key a document lacks renders empty, not a 500
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(
            when=when,
            seg=segment,
            num=number,
            duration=duration,
            pretty=pretty,
            count=counted,
            labels=label_set,
            took=took,
        )
        self.env.globals.update(controls=CONTROLS, control=control)

    def page(self, template: str, context: Mapping[str, Any]) -> str:
        """A whole page (``index.html``, ``incident.html``)."""
        return self.env.get_template(template).render(context)

    def sections(self, context: Mapping[str, Any], names: Sequence[str]) -> dict[str, str]:
        """Each named section's HTML (``_NAME.html``), as the page's script puts it in place."""
        return {name: self.env.get_template(f"_{name}.html").render(context) for name in names}
