"""The offline default corpus: docstrings of the Python standard library (about 1.8 MB of English prose).

Every Python installation carries it, so training and tests work without a download. Source files
are parsed with `ast` rather than imported: nothing runs, no module has side effects or fails to
import, and the result depends only on the files. One document per module: its module, class and
function docstrings (in source order) joined by blank lines. Files are visited in sorted path order,
so the corpus is the same for a given installed Python version.
"""

from __future__ import annotations

import ast
import os
import platform
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

from hymba_jax.data import records

_DOCUMENTED = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
# Installed third-party packages are not the standard library; test suites (60% of its source bytes)
# document tests rather than the library and would triple the time to build the corpus.
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})


def stdlib_root() -> Path:
    """The directory of the running interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: Path) -> list[Path]:
    """All `.py` files under `root`, sorted, without third-party packages and test suites."""
    found = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [name for name in subdirectories if name not in _SKIPPED_DIRS]
        found.extend(Path(directory, name) for name in files if name.endswith(".py"))
    return sorted(found)


def module_documents(root: Path) -> Iterator[str]:
    """One document per source file under `root` that has docstrings; unparsable files are skipped."""
    for path in source_files(root):
        try:
            with warnings.catch_warnings():  # Old escape sequences in some sources are not our concern.
                warnings.simplefilter("ignore", (SyntaxWarning, DeprecationWarning))
                tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):  # Python 2 examples, test data with bad encodings, ...
            continue
        docstrings = list(_docstrings(tree))
        if docstrings:
            yield "\n\n".join(docstrings)


def prepare_default_corpus(cache_dir: Path, val_fraction: float) -> Path:
    """The prepared-corpus directory of the default corpus, built on first use (a few seconds).

    The cache key covers the Python version and the list of source files with their sizes, so a
    different interpreter or an upgraded standard library gets its own corpus.
    """
    root = stdlib_root()
    files = source_files(root)
    key = records.fingerprint(
        platform.python_version(),
        [(path.relative_to(root).as_posix(), path.stat().st_size) for path in files],
        val_fraction,
    )
    directory = cache_dir / "corpora" / f"stdlib-docstrings-py{platform.python_version()}-{key}"
    return records.ensure_prepared(directory, lambda: module_documents(root), val_fraction)


def _docstrings(node: ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) -> Iterator[str]:
    """Docstrings of `node` and of the classes and functions defined directly in its body, recursively."""
    docstring = ast.get_docstring(node, clean=True)
    if docstring:
        yield docstring
    for child in node.body:
        if isinstance(child, _DOCUMENTED):
            yield from _docstrings(child)
