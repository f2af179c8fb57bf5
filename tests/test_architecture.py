"""The package's layers: imports flow one way, from the command line down to the mathematics.

The order is the one the README's layout section and ``mergelib/__init__.py`` state; a module may
import its own layer and those below it, at module level or inside a function.
"""

import ast
import importlib
import pkgutil
import warnings
from pathlib import Path

import pytest

import mergelib

PACKAGE = Path(mergelib.__file__).parent
LAYERS = ["errors", "_moved", "methods", "task_vectors", "io", "data", "models", "analysis", "protocols",
          "experiments", "report", "cli"]
RANK = {name: rank for rank, name in enumerate(LAYERS)}
RANK["_moved"] = RANK["errors"]


def layer_of(module: str) -> str:
    """``mergelib.models.heads`` -> ``models``; the package itself is ``mergelib``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "mergelib"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every ``mergelib`` module a file imports, anywhere in it, as (line, dotted name)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "mergelib"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "mergelib":
            if node.module == "mergelib":
                found += [(node.lineno, f"mergelib.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.append((node.lineno, "relative"))
    return found


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_belongs_to_a_layer():
    for path in package_files():
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts == ("__init__",):
            continue
        assert parts[0] in RANK, f"{path}: not in any layer of tests/test_architecture.py (add it to LAYERS)"


@pytest.mark.parametrize("path", package_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_down(path):
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts == ("__init__",):
        return  # the package's public face re-exports from every layer
    own = RANK[parts[0]]
    for line, module in imported_modules(path):
        assert module != "relative", f"{path}:{line}: use absolute imports (from mergelib.<layer> ...)"
        target = layer_of(module)
        assert target != "mergelib", f"{path}:{line}: import from the submodule, not the package root"
        assert RANK[target] <= own, (f"{path}:{line}: imports {module}, a layer above {parts[0]} "
                                     f"(order: {' < '.join(LAYERS)})")


def test_the_checker_sees_an_upward_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from mergelib.experiments.miniature import MiniatureConfig\n")
    assert imported_modules(probe) == [(2, "mergelib.experiments.miniature")]
    assert RANK[layer_of("mergelib.experiments.miniature")] > RANK["models"]


def test_every_module_imports():
    for module in pkgutil.walk_packages(mergelib.__path__, "mergelib."):
        importlib.import_module(module.name)


def test_old_module_paths_forward_with_a_deprecation_warning():
    from mergelib._moved import MOVED

    for old, new in MOVED.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(f"mergelib.{old}")
            moved = importlib.import_module(f"mergelib.{new}")
            public = [name for name in vars(moved) if not name.startswith("_")]
            assert public and all(getattr(module, name) is getattr(moved, name) for name in public)
        if caught:  # only the first import of the old name warns
            assert issubclass(caught[0].category, DeprecationWarning)
            assert f"mergelib.{new}" in str(caught[0].message)


def test_old_name_warns_on_first_import():
    import sys

    sys.modules.pop("mergelib.dg", None)
    with pytest.warns(DeprecationWarning, match="mergelib.protocols.domain_generalization"):
        from mergelib.dg import ZERO_SHOT
    from mergelib.protocols.domain_generalization import ZERO_SHOT as moved

    assert ZERO_SHOT == moved
