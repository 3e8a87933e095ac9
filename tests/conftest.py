"""Shared test settings, chosen so the suite runs in minutes on 2 cores.

- XLA:CPU compiles with LLVM's optimizations off and its classic (non-MLIR) fusion emitters
  (``XLA_FLAGS``; subprocesses inherit them): the programs, and so every value the tests check,
  are XLA's same HLO, and they compile several times faster. ``CNNJAX_TEST_XLA_DEFAULTS=1`` runs
  the suite with XLA's default flags instead.
- A persistent compilation cache shared by the pytest workers and the subprocesses they start
  (``JAX_COMPILATION_CACHE_DIR``, default ``.jax_cache/`` in the repository; set it to move it).
- Hypothesis: the ``"ci"`` profile (small, seeded) by default; ``HYPOTHESIS_PROFILE=thorough``
  draws ten times as many examples; ``tests/budget.py`` scales the per-test budgets and the
  seeded grids with it.
"""

import os
from pathlib import Path

if not os.environ.get("CNNJAX_TEST_XLA_DEFAULTS"):
    _FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
    os.environ.setdefault(
        "CNNJAX_TEST_USER_XLA_FLAGS", os.environ.get("XLA_FLAGS", "")
    )  # for runs timed as a user runs them
    _flags = os.environ.get("XLA_FLAGS", "").split()
    os.environ["XLA_FLAGS"] = " ".join([*_flags, *(f for f in _FAST_COMPILE if f not in _flags)])
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import budget
import jax
from hypothesis import HealthCheck, settings

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs", float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"])
)

for _name, _examples in (("ci", 10), ("thorough", 100)):
    settings.register_profile(
        _name,
        max_examples=_examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
settings.load_profile(budget.PROFILE)
