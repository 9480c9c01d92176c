"""Griffe extension for the API reference: Sphinx roles in docstrings become inline code.

The packages' docstrings use Sphinx roles (``:func:`minference_kernels.sparse_prefill```,
``:class:`~minference_patterns.PatternConfig```) and reST double-backtick literals. mkdocstrings
renders Markdown, where both would show as stray colons and backticks; this turns them into
Markdown inline code (``~`` keeps only the last component, as Sphinx does). It changes only what
the docs show, never the packages' source.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const):`(~?)([^`]+)`")
_LITERAL = re.compile(r"``([^`]+?)``")


def _fix(text: str) -> str:
    def role(m: re.Match[str]) -> str:
        target = m.group(2).strip()
        if m.group(1):
            target = target.split(".")[-1]
        return f"`{target}`"

    text = _ROLE.sub(role, text)
    return _LITERAL.sub(lambda m: f"`{m.group(1)}`", text)


class SphinxRolesToCode(Extension):
    """Rewrite every docstring of a loaded package (see the module docstring)."""

    def on_package(self, *, pkg: Any, **kwargs: Any) -> None:
        seen: set[int] = set()

        def visit(obj: Object) -> None:
            if id(obj) in seen:
                return
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = _fix(obj.docstring.value)
            for member in obj.members.values():
                if not member.is_alias:
                    visit(member)

        visit(pkg)
