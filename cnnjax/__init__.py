"""cnnjax: a JAX functional CNN library.

The functional core (conv and pooling ops) is re-exported here and in ``cnnjax.functional``;
the layers, models, analysis, initializers and closed-form gradients are the submodules
``cnnjax.nn``, ``cnnjax.models``, ``cnnjax.analysis``, ``cnnjax.init`` and ``cnnjax.backprop``.
``cnnjax.train.data`` and ``cnnjax.train`` are imported on first use (they pull in optax, orbax and
tqdm, which the functional core does not need).
"""

import importlib

from cnnjax import backprop, functional, shapes
from cnnjax.functional import *  # noqa: F403
from cnnjax.functional import __all__ as _functional_all

__version__ = "0.1.0"
_LAZY_SUBMODULES = ("analysis", "init", "models", "nn", "train")

__all__ = [*_functional_all, "backprop", "functional", "shapes", *_LAZY_SUBMODULES]


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"cnnjax.{name}")
    raise AttributeError(f"module 'cnnjax' has no attribute {name!r}")
