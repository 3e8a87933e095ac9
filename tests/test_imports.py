"""Data flows one way through the package (docs/development.md): ``shapes`` imports nothing of ours,
the ops never import the layers, the layers never import analysis, the models never import
training or data code (nor optax or Grain), ``testing`` builds on the ops alone, and only the
application (``cnnjax.train``) imports optax, Orbax, Grain, Pillow, matplotlib, scikit-learn or
tqdm, which a fresh interpreter importing the library checks too. Read from the source (every
``import`` statement, also those inside functions), so a lazy import cannot hide a cycle."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cnnjax"

OPS = ("_canon", "_cpu", "_primitives", "backprop", "convolution", "functional", "init", "pooling")
LAYERS = ("nn",)
ANALYSIS = ("analysis",)
MODELS = ("models",)
TESTING = ("testing",)
EXPORT = ("export",)
TRAINING = ("train", "visualize")
ABOVE_OPS = (*LAYERS, *ANALYSIS, *MODELS, *TESTING, *EXPORT, *TRAINING)


def _module_name(path: Path) -> str:
    """``cnnjax/models/resnet.py`` -> ``models``; ``cnnjax/nn.py`` -> ``nn``: the top-level piece."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    """Top-level names of what one file imports: ``cnnjax.<piece>`` for our own modules, the
    distribution's name for others (``optax``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "cnnjax":  # from cnnjax import nn, shapes: submodules (else the package)
                names = [f"cnnjax.{alias.name}" for alias in node.names]
            else:
                names = [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] != "cnnjax":
                found.add(parts[0])
            elif len(parts) == 1 or not ((PACKAGE / f"{parts[1]}.py").exists() or (PACKAGE / parts[1]).is_dir()):
                found.add("cnnjax")
            else:
                found.add(f"cnnjax.{parts[1]}")
    return found


def _imports_of(pieces) -> dict[str, set[str]]:
    """Per file of these top-level pieces, what it imports."""
    files = [p for p in sorted(PACKAGE.rglob("*.py")) if _module_name(p) in pieces]
    assert files, pieces
    return {str(p.relative_to(PACKAGE.parent)): _imports(p) for p in files}


@pytest.mark.parametrize(
    ("importers", "forbidden"),
    [
        (("shapes",), ("cnnjax", *OPS, *ABOVE_OPS)),
        (OPS, ABOVE_OPS),
        (LAYERS, (*ANALYSIS, *MODELS, *TESTING, *EXPORT, *TRAINING)),
        (ANALYSIS, (*MODELS, *TESTING, *EXPORT, *TRAINING)),
        (MODELS, (*ANALYSIS, *TESTING, *EXPORT, *TRAINING)),
        (TESTING, ABOVE_OPS),
        (EXPORT, (*ANALYSIS, *TESTING, *TRAINING)),
    ],
    ids=["shapes imports nothing of ours", "ops", "layers", "analysis", "models", "testing", "export"],
)
def test_lower_layers_never_import_higher_ones(importers, forbidden):
    if importers == ("shapes",):  # every module of ours is forbidden there: the list must be complete
        ours = {_module_name(p) for p in PACKAGE.rglob("*.py")} - {"__init__", "shapes"}
        assert ours <= set(forbidden), ours - set(forbidden)
    forbidden_names = {"cnnjax" if piece == "cnnjax" else f"cnnjax.{piece}" for piece in forbidden}
    bad = {f: sorted(i & forbidden_names) for f, i in _imports_of(importers).items() if i & forbidden_names}
    assert not bad


def test_models_never_import_optimizers_or_data_pipelines():
    outside = {"optax", "grain", "orbax"}
    bad = {f: sorted(i & outside) for f, i in _imports_of(MODELS).items() if i & outside}
    assert not bad


def test_only_the_application_imports_matplotlib():
    below = ("shapes", *OPS, *LAYERS, *ANALYSIS, *MODELS, *TESTING)
    bad = {f: sorted(i & {"matplotlib"}) for f, i in _imports_of(below).items() if "matplotlib" in i}
    assert not bad


LIBRARY = ("shapes", *OPS, *LAYERS, *ANALYSIS, *MODELS, *TESTING, *EXPORT)
APPLICATION_ONLY = {"grain", "PIL", "matplotlib", "sklearn", "tqdm", "optax", "orbax"}


def test_the_library_never_imports_the_applications_dependencies():
    bad = {f: sorted(i & APPLICATION_ONLY) for f, i in _imports_of(LIBRARY).items() if i & APPLICATION_ONLY}
    assert not bad


def test_importing_the_library_loads_none_of_the_applications_dependencies():
    """In a fresh interpreter: the library's modules, the weight readers included, and a layer's
    call load none of Grain, Pillow, matplotlib, scikit-learn or tqdm (``pip install cnnjax``
    does not install them)."""
    script = (
        "import sys, jax.numpy as jnp, flax.nnx as nnx\n"
        "import cnnjax, cnnjax.nn, cnnjax.models, cnnjax.models.torch_weights, cnnjax.analysis, cnnjax.init\n"
        "cnnjax.nn.Conv(1, 2, (3, 3), rngs=nnx.Rngs(0))(jnp.ones((1, 8, 8, 1)))\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'grain', 'PIL', 'matplotlib', 'sklearn', 'tqdm'}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_checker_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    from cnnjax import nn, shapes\n    import cnnjax.models.resnet\n")
    assert _imports(source) == {"os", "cnnjax.nn", "cnnjax.shapes", "cnnjax.models"}
