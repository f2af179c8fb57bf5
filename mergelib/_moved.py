"""Old module paths of mergelib 0.1, kept working for one release (removed in 0.3).

mergelib 0.2 grouped its flat modules into subpackages (``methods``, ``analysis``, ``io``,
``data``, ``models``, ``protocols``, ``experiments``, ``report``). Importing an old path, such
as ``mergelib.miniature``, returns a stand-in module that forwards every attribute to the new
module and warns once with a :class:`DeprecationWarning` naming the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

#: old module name (below ``mergelib.``) -> its new module name
MOVED = {
    "grid": "methods.grid", "reference": "methods.reference",
    "checkpoints": "io.checkpoints", "provenance": "io.provenance", "locks": "io.locks",
    "merge_files": "io.merge_files",
    "backbones": "models.backbones", "heads": "models.heads", "pretrain": "models.pretrain",
    "finetune": "models.finetune", "evaluation": "models.evaluation", "essential": "models.essential",
    "importers": "models.importers",
    "stats": "analysis.stats",
    "dg": "protocols.domain_generalization", "multitask": "protocols.multitask",
    "coefficients": "protocols.coefficients",
    "miniature": "experiments.miniature", "replication": "experiments.replication",
    "ablations": "experiments.ablations", "sweep": "experiments.sweep",
    "benchmark_sweeps": "experiments.benchmark_sweeps", "seeds_study": "experiments.seeds_study",
    "benchmarking": "experiments.benchmarking",
    "published": "report.published", "reporting": "report.comparisons",
    "book_helpers": "report.book_helpers", "book": "report.book",
    "notebook_parameters": "report.notebook_parameters",
}


class _Forward(types.ModuleType):
    def __init__(self, name: str, target: str):
        super().__init__(name, f"Moved to {target}; this name is removed in mergelib 0.3.")
        self.__target = target

    def _module(self) -> types.ModuleType:
        return importlib.import_module(self.__target)

    def __getattr__(self, attribute: str):
        return getattr(self._module(), attribute)

    def __dir__(self):
        return dir(self._module())


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        old = fullname.removeprefix("mergelib.")
        if fullname.startswith("mergelib.") and old in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        target = "mergelib." + MOVED[spec.name.removeprefix("mergelib.")]
        warnings.warn(f"{spec.name} moved to {target}; the old name is removed in mergelib 0.3",
                      DeprecationWarning, stacklevel=2)
        return _Forward(spec.name, target)

    def exec_module(self, module):
        pass


def renamed(module: str, names: dict[str, str]):
    """A module-level ``__getattr__`` that serves each old name in ``names`` as its new one, with
    a :class:`DeprecationWarning` (``__getattr__ = renamed(__name__, {"old": "new"})``)."""

    def __getattr__(name: str):
        if name in names:
            warnings.warn(f"{module}.{name} is now {module}.{names[name]}; the old name is removed in mergelib 0.3",
                          DeprecationWarning, stacklevel=2)
            return getattr(sys.modules[module], names[name])
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__


def install() -> None:
    """Let ``import mergelib.<old name>`` find its moved module (idempotent)."""
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModules())
