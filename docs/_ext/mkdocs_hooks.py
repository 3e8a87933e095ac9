"""MkDocs hook: every public name of cnnjax appears in the API reference (``mkdocs.yml``'s ``hooks``).

Public names are each public module's ``__all__``, or, without one, the functions and classes it
defines whose names do not start with ``_``; the names of ``cnnjax.__all__`` appear in
``reference/functional.md`` (ops) or as a module page. A name missing from every page is a warning,
which fails ``mkdocs build --strict``.
"""

from __future__ import annotations

import importlib
import inspect
import re

from mkdocs.plugins import get_plugin_logger

PUBLIC_MODULES = (
    "cnnjax.functional",
    "cnnjax.shapes",
    "cnnjax.backprop",
    "cnnjax.nn",
    "cnnjax.init",
    "cnnjax.analysis",
    "cnnjax.models",
    "cnnjax.models.torch_weights",
    "cnnjax.train.data",
    "cnnjax.train.pipeline",
    "cnnjax.train",
    "cnnjax.train.recipe",
    "cnnjax.train.steps",
    "cnnjax.train.loop",
    "cnnjax.train.checkpoint",
    "cnnjax.train.report",
    "cnnjax.train.errors",
    "cnnjax.train.cli",
    "cnnjax.train.predict",
    "cnnjax.train.visualize",
    "cnnjax.testing",
)

log = get_plugin_logger("reference")
_anchors: set[str] = set()


def public_names(module_name: str) -> list[str]:
    """``__all__``, or the public functions and classes the module itself defines."""
    module = importlib.import_module(module_name)
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and value.__module__ == module_name
    ]


def expected_anchors() -> set[str]:
    """The heading id of every public name: ``cnnjax.nn.Conv``; ``cnnjax.functional.conv`` for ``cnnjax.conv``."""
    import cnnjax

    functional = set(importlib.import_module("cnnjax.functional").__all__)
    anchors = {f"cnnjax.functional.{n}" if n in functional else f"cnnjax.{n}" for n in cnnjax.__all__}
    return anchors | {f"{module}.{name}" for module in PUBLIC_MODULES for name in public_names(module)}


def on_pre_build(config, **kwargs) -> None:
    _anchors.clear()


def on_page_content(html: str, page, **kwargs) -> str:
    _anchors.update(re.findall(r'id="(cnnjax[\w.]*)"', html))
    return html


def _documented(anchor: str) -> bool:
    """The anchor itself, or the name rendered at its defining submodule's path (``cnnjax.models.mobilenet_v2``
    is both a submodule and a preset; the preset appears as ``cnnjax.models.mobilenet_v2.mobilenet_v2``)."""
    module, _, name = anchor.rpartition(".")
    return anchor in _anchors or any(a.startswith(f"{module}.") and a.endswith(f".{name}") for a in _anchors)


def on_post_build(config, **kwargs) -> None:
    missing = sorted(a for a in expected_anchors() if not _documented(a))
    if missing:
        log.warning(f"public names missing from the API reference: {', '.join(missing)}")
