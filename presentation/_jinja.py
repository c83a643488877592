"""The Jinja2 environment of the package's templates (``templates/``)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import jinja2

__all__ = ["environment"]


@functools.cache
def environment() -> jinja2.Environment:
    """The one environment (built at first use): templates shipped as package data, every value escaped
    for HTML/XML (all templates here are HTML or SVG markup, so escaping is on for every name, not chosen by
    file extension), and an undefined name is an error rather than an empty string."""
    # Imported here: the CLI imports the report's helpers at start-up, and `distplan --help` should not
    # pay for the template engine.
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("distplan.presentation", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
