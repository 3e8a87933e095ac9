"""Griffe extension for cnnjax's docstrings (loaded by mkdocstrings, see ``mkdocs.yml``).

cnnjax's docstrings are Google style, written to read well in ``help()`` and to run as doctests,
with two habits Google style's parser does not know; this rewrites them before parsing, so that
the API reference renders them and ``mkdocs build --strict`` stays quiet about them:

- one ``Args:`` entry for parameters that share a meaning (``strides, kernel_dilation: ...``)
  becomes one entry per parameter, each with the shared description;
- doctest examples (``>>>`` lines and their output) become ``pycon`` code blocks, so their
  brackets are not read as Markdown links;
- Sphinx roles (``:func:`max_pool```, ``:mod:`cnnjax.backprop```) become inline code.

It also warns (a warning fails the strict build) about every public function, class or module of
cnnjax without a docstring.
"""

from __future__ import annotations

import re

import griffe

_SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters):\s*$")
_GROUPED = re.compile(r"^(\s*)(\w+(?:,\s*\w+)+):(.*)$")
_ROLE = re.compile(r":(?:func|mod|class|meth|data|attr|exc|obj):`~?([^`]+)`")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def split_grouped_args(lines: list[str]) -> list[str]:
    """``a, b: text`` in an ``Args:`` section -> ``a: text`` and ``b: text`` (continuations copied)."""
    out: list[str] = []
    section_indent = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if _SECTION.match(line):
            section_indent = _indent(line)
        elif line.strip() and section_indent is not None and _indent(line) <= section_indent:
            section_indent = None
        grouped = _GROUPED.match(line) if section_indent is not None else None
        if grouped is None:
            out.append(line)
            i += 1
            continue
        indent, names, text = grouped.groups()
        block_end = i + 1
        while block_end < len(lines) and lines[block_end].strip() and _indent(lines[block_end]) > len(indent):
            block_end += 1
        for name in re.split(r",\s*", names):
            out.append(f"{indent}{name}:{text}")
            out.extend(lines[i + 1 : block_end])
        i = block_end
    return out


def fence_doctests(lines: list[str]) -> list[str]:
    """Runs of ``>>>``/``...`` lines and their output (up to a blank line) -> a ``pycon`` block."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        if not lines[i].lstrip().startswith(">>>"):
            out.append(lines[i])
            i += 1
            continue
        indent = " " * _indent(lines[i])
        end = i
        while end < len(lines) and lines[end].strip():
            end += 1
        out += [f"{indent}```pycon", *lines[i:end], f"{indent}```"]
        i = end
    return out


class CnnjaxDocstrings(griffe.Extension):
    """Rewrite cnnjax's docstrings for Google style's parser; warn about missing docstrings."""

    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.is_alias or not obj.path.startswith("cnnjax"):
            return
        if obj.docstring is not None:
            lines = obj.docstring.value.splitlines()
            text = "\n".join(fence_doctests(split_grouped_args(lines)))
            obj.docstring.value = _ROLE.sub(r"`\1`", text)
        private = any(part.startswith("_") for part in obj.path.split("."))  # dunders: the class says it
        kinds = (griffe.Kind.MODULE, griffe.Kind.CLASS, griffe.Kind.FUNCTION)
        if obj.kind in kinds and not private and obj.is_public and not obj.docstring:
            griffe.logger.warning(f"{obj.relative_filepath}:{obj.lineno}: {obj.path} has no docstring")
