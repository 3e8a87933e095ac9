"""How much each randomized test draws: the seeded grids and hypothesis budgets, scaled together.

``HYPOTHESIS_PROFILE`` picks the scale: ``"ci"`` (the default, what ``pytest`` runs) or
``"thorough"`` (ten times as many cases as ``"ci"``). Every test keeps at least one case, so a small budget
still runs every rule; a larger one draws more geometry.
"""

import os

import pytest

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
SCALE = {"ci": 0.5, "thorough": 5.0}[PROFILE]


def examples(n: int) -> int:
    """The hypothesis ``max_examples`` of a test written for ``n``, at this run's scale."""
    return max(1, round(n * SCALE))


def seeds(n: int) -> range:
    """The seeds of a grid written for ``n`` cases, at this run's scale (for ``parametrize``)."""
    return range(max(1, round(n * SCALE)))


# A test (or case) too heavy for the default scale: the deepest zoo presets where shallower ones of the
# same blocks run by default.
thorough_only = pytest.mark.skipif(PROFILE != "thorough", reason="runs with HYPOTHESIS_PROFILE=thorough")
