"""The papermill parameters of the book's notebooks, checked by one function before any work.

papermill injects ``-p name value`` as assignments after a notebook's ``parameters`` cell and only
*warns* about a name the notebook does not have, so a misspelt ``-p method score`` (the notebook
has ``methods``) would run the defaults without a word; and ``-p datasets PACS`` gives a string
where a list is expected, which a loop would read letter by letter. The first code cell of every
notebook therefore starts with ::

    from mergelib.report.notebook_parameters import check_notebook_parameters

    check_notebook_parameters("benchmark_dg", globals())

which, before anything is computed:

* reads the notebook's parameters and their defaults from its ``parameters`` cell
  (:func:`notebook_defaults`), so the notebook stays the one place where they are written;
* refuses a name that is not a parameter (:class:`~mergelib.errors.ParameterError` naming the
  valid ones): in the notebook's globals, every name besides the parameters is one papermill
  injected, except modules, functions and classes (imports), IPython's own (``In``, ``Out``,
  ``get_ipython``, ``exit``, ``quit``) and names starting with ``_``;
* coerces each value to the type of its default (:func:`coerce_parameter`, which
  :meth:`mergelib.experiments.miniature.MiniatureConfig.from_parameters` uses too): a single value given for
  a list parameter is a one-element list (``-p datasets PACS`` is ``["PACS"]``), an int is
  accepted for a float;
* checks each value's choices and range (``RULES``: method specs through
  :func:`~mergelib.methods.registry.parse_method_spec`, datasets, tasks, domains and backbones through
  their registries, devices through :func:`mergelib.methods.common.resolve_device`, counts at
  least 1, ...) and the notebook's constraints between parameters (``CROSS_CHECKS``, e.g.
  the miniature's parameters through ``MiniatureConfig.from_parameters``);
* writes the checked values back into the globals and returns them.

:func:`validate_notebook_parameters` is the same check on a plain mapping, which the tests use to
validate every notebook's defaults and the smoke parameters of ``mergelib.report.book.NOTEBOOKS``
without executing anything.

Not from a paper: this is infrastructure.
"""

from __future__ import annotations

import ast
import difflib
import json
import types
import typing
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping, MutableMapping

from mergelib.errors import ParameterError, ParameterValueError, lookup
from mergelib.methods.common import coerce_parameter

#: Names IPython puts into a notebook's globals (besides ``_``-prefixed ones).
IPYTHON_NAMES = frozenset({"In", "Out", "get_ipython", "exit", "quit"})
#: Marks a namespace already checked (an interactive rerun of the first cell).
_CHECKED = "_mergelib_checked_parameters"


# --------------------------------------------------------------------------------- coercion

def hint_of_default(name: str, default: Any) -> Any:
    """The type of a parameter read from its default: ``[0.5, 1]`` is a list of float, ``["a"]``
    a list of str; an empty list says nothing, so such a parameter needs a :class:`Rule` hint."""
    if isinstance(default, (list, tuple)):
        kinds = {type(item) for item in default}
        if not kinds:
            raise ParameterError(f"parameter {name!r}: an empty default list needs an explicit type in RULES")
        if kinds <= {int, float} and bool not in kinds:
            return list[float] if float in kinds else list[int]
        if len(kinds) == 1:
            return list[kinds.pop()]
        raise ParameterError(f"parameter {name!r}: a default list mixing {sorted(k.__name__ for k in kinds)} needs an explicit type")
    return type(default)


# ------------------------------------------------------------------------------------ rules

@dataclass(frozen=True)
class Rule:
    """What a parameter must be besides the type of its default: ``hint`` overrides that type
    (needed for an empty default list, or an int-or-list), ``check(name, value)`` is called on the
    coerced value and raises with a sentence."""

    hint: Any = None
    check: Callable[[str, Any], None] | None = None


def _each(check: Callable[[str, Any], None]) -> Callable[[str, Any], None]:
    def run(name: str, value: Any) -> None:
        for i, item in enumerate(value if isinstance(value, (list, tuple)) else [value]):
            check(f"{name}[{i}]" if isinstance(value, (list, tuple)) else name, item)
    return run


def at_least(minimum: float) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if value < minimum:
            raise ParameterValueError(f"parameter {name!r} must be at least {minimum}, got {value!r}")
    return _each(check)


def positive(name: str, value: Any) -> None:
    def check(label: str, item: Any) -> None:
        if not item > 0:
            raise ParameterValueError(f"parameter {label!r} must be positive, got {item!r}")
    _each(check)(name, value)


def fraction(name: str, value: Any) -> None:
    def check(label: str, item: Any) -> None:
        if not 0 < item <= 1:
            raise ParameterValueError(f"parameter {label!r} must be in (0, 1], got {item!r}")
    _each(check)(name, value)


def one_of(*choices: Any) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if value not in choices:
            raise ParameterValueError(f"parameter {name!r} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return _each(check)


def registered(kind: str, registry: Callable[[], Mapping[str, Any]]) -> Callable[[str, Any], None]:
    """Each value a key of ``registry()`` (an :class:`~mergelib.errors.UnknownNameError` listing them)."""
    return _each(lambda name, value: lookup(registry(), kind, value))


def method_spec(name: str, value: Any) -> None:
    from mergelib.methods import parse_method_spec

    _each(lambda label, item: parse_method_spec(item))(name, value)


def device(name: str, value: Any) -> None:
    from mergelib.methods.common import resolve_device

    resolve_device(value)


def precision(name: str, value: Any) -> None:
    from mergelib.models.evaluation import check_precision_name

    check_precision_name(value)


def folder_or_empty(name: str, value: Any) -> None:
    if value and not Path(value).is_dir():
        raise ParameterValueError(f"parameter {name!r}: no folder {value!r} (relative paths start in notebooks/); "
                                  "give an existing folder, or \"\" for the default")


def weights(name: str, value: Any) -> None:
    if value not in ("published", "random") and not Path(value).is_file():
        raise ParameterValueError(f"parameter {name!r} must be 'published', 'random' or an existing weights file "
                                  f"(relative paths start in notebooks/), got {value!r}")


def _backbones() -> Mapping[str, Any]:
    from mergelib.models.backbones import BACKBONES

    return BACKBONES


def _dg_datasets() -> Mapping[str, Any]:
    from mergelib.data.dg_datasets import DG_DATASETS

    return DG_DATASETS


def _miniature_domains() -> Mapping[str, Any]:
    from mergelib.data import DOMAINS

    return DOMAINS


def _miniature_tasks() -> Mapping[str, Any]:
    from mergelib.data import MINI_SUITE_TASKS

    return MINI_SUITE_TASKS


def _methods() -> Mapping[str, Any]:
    from mergelib.methods import METHODS

    return METHODS


def _esm_decompositions() -> Mapping[str, Any]:
    from mergelib.methods.esm import DECOMPOSITIONS

    return dict.fromkeys(DECOMPOSITIONS)


def suite_tasks(name: str, value: Any) -> None:
    from mergelib.experiments.replication import task_names

    task_names(value)


BACKBONE = Rule(check=registered("backbone", _backbones))
DG_DATASETS = Rule(check=registered("DG dataset", _dg_datasets))
MINIATURE_DOMAINS = Rule(check=registered("domain", _miniature_domains))
MINIATURE_TASKS = Rule(check=registered("task", _miniature_tasks))
METHOD_SPECS = Rule(list[str], method_spec)
COUNT = Rule(check=at_least(1))  # images, epochs, batch sizes: at least 1
EPOCHS_OR_ZERO = Rule(check=at_least(0))  # 0: the dataset's released epochs
WORKERS = Rule(check=at_least(0))
SEED = Rule(check=at_least(0))

#: The rules shared by the notebooks that run the papers' benchmarks on real backbones.
_REAL_RUN = {"backbone": BACKBONE, "datasets": DG_DATASETS, "data_root": Rule(check=folder_or_empty),
             "weights": Rule(check=weights), "device": Rule(check=device), "precision": Rule(check=precision),
             "epochs": EPOCHS_OR_ZERO, "batch_size": COUNT, "num_workers": WORKERS}
_STANDINS = {"standin_images_per_class": COUNT, "standin_classes": COUNT, "standin_epochs": COUNT,
             "standin_lr": Rule(check=positive)}

#: Per notebook, the rules of its parameters beyond the type of their defaults.
RULES: dict[str, dict[str, Rule]] = {
    "subspace_overlap": {"backbone": BACKBONE, "domains": MINIATURE_DOMAINS, "tasks": MINIATURE_TASKS, "seed": SEED,
                         "energy": Rule(check=fraction)},
    "score_derived": {"backbone": BACKBONE, "domains": MINIATURE_DOMAINS, "seed": SEED, "z_values": Rule(check=positive),
                      "rank_fractions": Rule(check=fraction)},
    "esm_derived": {"backbone": BACKBONE, "tasks": MINIATURE_TASKS, "seed": SEED, "proxy_count": COUNT,
                    "rank_fractions": Rule(check=fraction), "coefficients": Rule(check=positive), "proxy_counts": COUNT},
    "domain_generalization": {"domains": MINIATURE_DOMAINS, "methods": METHOD_SPECS, "sweep_methods": METHOD_SPECS,
                              "seed": SEED, "coefficients": Rule(check=positive), "lr": Rule(check=positive),
                              "fine_caption_fraction": Rule(check=fraction)},
    "ablations": {**_REAL_RUN, "z_values": Rule(check=positive), "rank_fractions": Rule(list[float], fraction),
                  "merge_baselines": METHOD_SPECS,
                  "esm_decompositions": Rule(check=registered("ESM decomposition", _esm_decompositions)),
                  "esm_ends_only": Rule(check=registered("ESM decomposition", _esm_decompositions)),
                  "esm_coefficients": Rule(check=positive), "domains": MINIATURE_DOMAINS, "tasks": MINIATURE_TASKS,
                  "esm_proxy_count": COUNT, "seed": SEED, "n_test": COUNT, "task_n_test": COUNT},
    "benchmark_dg": {**_REAL_RUN, "methods": METHOD_SPECS, **_STANDINS},
    "benchmark_multitask": {**{k: v for k, v in _REAL_RUN.items() if k != "datasets"},
                            "tasks": Rule(int | list[str], suite_tasks), "methods": METHOD_SPECS,
                            "import_from": Rule(check=folder_or_empty),
                            "normalize_with": Rule(check=one_of("", "published", "experts")), "esm_proxy_count": COUNT,
                            **_STANDINS},
    "results": {"backbones": BACKBONE},
    "methods": {"methods": Rule(list[str], registered("merge method", _methods))},
    "paper_vs_code": {"methods": Rule(list[str], registered("merge method", _methods))},
    "performance": {"layer_shape": COUNT, "layer_tasks": COUNT, "seed": SEED},
}

#: Per notebook, the parameters that make its :class:`~mergelib.experiments.miniature.MiniatureConfig`
#: (with ``overrides``, where the notebook has it: they win over the named ones), checked by
#: ``MiniatureConfig.from_parameters``.
MINIATURE_PARAMETERS: dict[str, tuple[str, ...]] = {
    "subspace_overlap": ("backbone", "domains", "tasks", "seed"),
    "score_derived": ("backbone", "domains", "seed"),
    "esm_derived": ("backbone", "tasks", "seed"),
    "domain_generalization": ("backbone", "domains", "seed", "epochs", "methods", "sweep_methods", "coefficients",
                              "n_train", "n_test", "pretrain_epochs", "pretrain_per_domain", "pretrain_per_task",
                              "pretrain_domains", "fine_caption_fraction", "lr", "esm_proxy_count"),
    "ablations": ("domains", "tasks", "seed", "esm_proxy_count", "n_test", "task_n_test"),
}


def _miniature_config(notebook: str, values: Mapping[str, Any]) -> None:
    from mergelib.experiments.miniature import MiniatureConfig

    MiniatureConfig.from_parameters(**miniature_parameters(notebook, values))


def miniature_parameters(notebook: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``MiniatureConfig.from_parameters`` in ``notebook``: its
    ``MINIATURE_PARAMETERS``, then ``overrides`` (which win)."""
    return {**{k: values[k] for k in MINIATURE_PARAMETERS[notebook]}, **values.get("overrides", {})}


def _member(notebook: str, name: str, of: str) -> Callable[[Mapping[str, Any]], None]:
    def check(values: Mapping[str, Any]) -> None:
        if values[name] not in values[of]:
            raise ParameterValueError(f"parameter {name!r} of notebook {notebook} must be one of {of} "
                                      f"{list(values[of])}, got {values[name]!r}")
    return check


def _multitask_standins(values: Mapping[str, Any]) -> None:
    """Without ``data_root`` the notebook generates stand-ins, which exist for some tasks only."""
    from mergelib.data.standins import check_task_standin
    from mergelib.experiments.replication import task_names

    if not values["data_root"]:
        for task in task_names(values["tasks"]):
            check_task_standin(task)


#: Per notebook, constraints between its parameters (each a function of all the checked values).
CROSS_CHECKS: dict[str, tuple[Callable[[Mapping[str, Any]], None], ...]] = {
    "score_derived": (_member("score_derived", "held_out", "domains"),),
    "esm_derived": (_member("esm_derived", "expert", "tasks"),),
    "benchmark_multitask": (_multitask_standins,),
    "performance": (lambda values: _length("layer_shape", values["layer_shape"], 2),),
}


def _length(name: str, value: Any, length: int) -> None:
    if len(value) != length:
        raise ParameterValueError(f"parameter {name!r} must have {length} items, got {value!r}")


# ------------------------------------------------------------------------------ the check

@lru_cache(maxsize=None)
def _read_defaults(path: str, mtime: float) -> tuple[tuple[str, Any], ...]:
    notebook = json.loads(Path(path).read_text())
    cells = [c for c in notebook["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ParameterError(f"{path} must have exactly one cell tagged 'parameters', found {len(cells)}")
    source = "".join(cells[0]["source"])
    defaults = []
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise ParameterError(f"{path}: the parameters cell may only assign literals to names, found {ast.unparse(node)!r}")
        defaults.append((node.targets[0].id, ast.literal_eval(node.value)))
    return tuple(defaults)


def notebook_defaults(notebook: str) -> dict[str, Any]:
    """The parameters of ``notebooks/{notebook}.ipynb`` and their defaults, read from its
    ``parameters`` cell (literal assignments only)."""
    from mergelib.report.book import NOTEBOOK_DIR

    path = NOTEBOOK_DIR / f"{notebook}.ipynb"
    if not path.is_file():
        names = sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb"))
        raise ParameterError(f"no notebook {notebook!r} in {NOTEBOOK_DIR}; the notebooks are {', '.join(names)}")
    return dict(_read_defaults(str(path), path.stat().st_mtime))


def _unknown_names(notebook: str, unknown: list[str], defaults: Mapping[str, Any]) -> ParameterError:
    hints = [f"{name!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(name, defaults, n=1)) else repr(name)
             for name in unknown]
    return ParameterError(f"notebook {notebook} has no parameter(s) {', '.join(hints)}; its parameters are: "
                          f"{', '.join(defaults)}")


def validate_notebook_parameters(notebook: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Every parameter of ``notebook`` checked: ``values`` (some of them; the rest take their
    defaults) must name parameters of the notebook, have the types of their defaults (coerced
    as :func:`coerce_parameter` does) and pass ``RULES`` and ``CROSS_CHECKS``. Returns
    all the parameters, checked."""
    defaults = notebook_defaults(notebook)
    unknown = [name for name in values if name not in defaults]
    if unknown:
        raise _unknown_names(notebook, unknown, defaults)
    rules = RULES.get(notebook, {})
    stray = sorted(set(rules) - set(defaults))
    if stray:
        raise ParameterError(f"RULES of notebook {notebook} name {stray}, which are not among its parameters")
    checked = {}
    for name, default in defaults.items():
        rule = rules.get(name, Rule())
        value = coerce_parameter(name, values.get(name, default), rule.hint or hint_of_default(name, default))
        if rule.check is not None:
            rule.check(name, value)
        checked[name] = value
    if notebook in MINIATURE_PARAMETERS:
        _miniature_config(notebook, checked)
    for check in CROSS_CHECKS.get(notebook, ()):
        check(checked)
    return checked


def _is_parameter_like(name: str, value: Any) -> bool:
    if name.startswith("_") or name in IPYTHON_NAMES:
        return False
    return not isinstance(value, (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType))


def check_notebook_parameters(notebook: str, namespace: MutableMapping[str, Any]) -> dict[str, Any]:
    """Check the parameters of a running notebook, as its first code cell:
    ``check_notebook_parameters("benchmark_dg", globals())``.

    Every global that is not a parameter, a module, a function or class, IPython's own or
    ``_``-prefixed was injected by papermill under a name the notebook does not have: a
    :class:`~mergelib.errors.ParameterError` names it and the valid parameters. The parameters are then checked
    by :func:`validate_notebook_parameters`, and the checked (coerced) values written back into
    ``namespace`` and returned. Rerunning the cell in an interactive session checks the values
    again but not the names (the notebook's later cells have made globals of their own).
    """
    defaults = notebook_defaults(notebook)
    if _CHECKED not in namespace:
        unknown = [name for name, value in namespace.items() if name not in defaults and _is_parameter_like(name, value)]
        if unknown:
            raise _unknown_names(notebook, unknown, defaults)
    values = validate_notebook_parameters(notebook, {name: namespace[name] for name in defaults if name in namespace})
    namespace.update(values)
    namespace[_CHECKED] = notebook
    return values


__all__ = ["CROSS_CHECKS", "MINIATURE_PARAMETERS", "RULES", "Rule", "check_notebook_parameters", "coerce_parameter",
           "hint_of_default", "miniature_parameters", "notebook_defaults", "validate_notebook_parameters"]
