"""Griffe extension for the docs build: adapt two habits of the package's docstrings to griffe's parser.

* Doctests are headed ``Example:``; griffe's Google parser only knows the plural as a code section and
  renders the singular as a note, where ``>>>`` lines would be read as Markdown quotes. The heading is
  read as ``Examples:``.
* An ``Args:`` section may group its arguments under bold sub-headings (an indented line that is only
  ``**Regularisers**``). Google sections have no sub-headings, so griffe would take the line for a
  malformed argument and warn; the line is dropped from the rendered page.

Both happen at docs-build time only; the code is untouched.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_HEADING = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_SUBHEADING = re.compile(r"^[ \t]+\*\*[^*\n]+\*\*[ \t]*\n(?:[ \t]*\n)?", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rewrite every docstring as above, once the object tree is loaded."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            value = _HEADING.sub(r"\1Examples:", obj.docstring.value)
            obj.docstring.value = _SUBHEADING.sub("", value)
