"""``cnnjax.visualize``: the pictures of :mod:`cnnjax.train.visualize` (feature maps, filters,
effective receptive fields, saliency), under the name users import; it needs the ``[train]``
extra (matplotlib)."""

from cnnjax.train.visualize import *  # noqa: F403
from cnnjax.train.visualize import __all__  # noqa: F401
