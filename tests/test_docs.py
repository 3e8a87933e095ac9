"""The pages in docs/ (and the README) cannot drift from the code: every example that shows a result
is a doctest (``>>>`` lines in a ``pycon`` or ``python`` block), run here.

Each page runs in one fresh namespace, its blocks in order (as ``doctest.testfile`` runs a file), with
``NORMALIZE_WHITESPACE`` and ``ELLIPSIS``. Python blocks without ``>>>`` show code that needs files,
data or a GPU (torchvision's weights, ImageNet folders) and must not print: a test checks that they
do not call ``print``. Shell blocks (``bash``) are not run: they train for minutes or run the
benchmarks (minutes on 2 cores), and their ``text`` outputs are records of measured runs, dated
where they appear. The API reference pages hold only mkdocstrings directives; the docstrings they
render are doctested by ``pytest --doctest-modules`` with the package.
"""

import doctest
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS


def _blocks(page: Path) -> list[tuple[str, str, int]]:
    """``(language, body, line number)`` of every fenced block of a page."""
    text = page.read_text()
    return [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 2) for m in FENCE.finditer(text)]


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_page_examples_run(page):
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=FLAGS)
    globs = {"__name__": "__docs__"}
    for language, body, line in _blocks(page):
        if language in ("pycon", "python") and ">>>" in body:
            test = parser.get_doctest(body, globs, f"{_name(page)}:{line}", str(page), line - 1)
            runner.run(test, clear_globs=False)
            globs = test.globs  # a DocTest runs in a copy: the next block continues from this one
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} of {results.attempted} examples failed in {_name(page)}"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_code_blocks_that_are_not_run_print_nothing(page):
    for language, body, line in _blocks(page):
        if language in ("pycon", "python") and ">>>" not in body:
            assert "print(" not in body, f"{_name(page)}:{line}: a block that prints must be a doctest (>>>)"
        assert language, f"{_name(page)}:{line}: name the block's language (pycon, python, bash, text, ...)"


def test_the_pages_are_in_the_site_and_link_to_each_other():
    """Every page is in mkdocs.yml's nav, and every relative link between pages (and from the README)
    points at a page; ``mkdocs build --strict`` checks the anchors too."""
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in PAGES:
        if page.parent != ROOT:
            relative = page.relative_to(ROOT / "docs").as_posix()
            assert relative in nav, f"{relative} is not in mkdocs.yml's nav"
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).resolve().exists(), f"{_name(page)} links to missing {target}"
