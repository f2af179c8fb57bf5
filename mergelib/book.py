"""Execute the book's notebooks with papermill, then build the Jupyter Book (1.x).

The notebooks in ``notebooks/`` are committed without outputs. :func:`execute_notebooks` runs each
with papermill (a failing cell raises, so the build fails) into ``book/_generated/``, which
``_toc.yml`` points at; :func:`build_book` then runs ``jupyter-book build -W -n --keep-going``
with execution off, so every number on a page comes from the papermill run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .provenance import REPO_ROOT

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
GENERATED_DIR = REPO_ROOT / "book" / "_generated"


@dataclass(frozen=True)
class BookNotebook:
    name: str  # file stem in notebooks/
    parameters: dict[str, Any] = field(default_factory=dict)  # overrides of the notebook's defaults
    smoke: dict[str, Any] = field(default_factory=dict)  # small parameters for CI (tests build the book with them)


def _miniature_smoke() -> dict[str, Any]:
    from .miniature import SMOKE_PARAMETERS

    return {k: v for k, v in SMOKE_PARAMETERS.items() if k not in ("warmup_steps", "batch_size")}


def _derivation_smoke(**extra: Any) -> dict[str, Any]:
    """Smoke parameters of the derivation chapters: their own names, the rest as ``overrides``."""
    from .miniature import SMOKE_PARAMETERS

    overrides = {k: v for k, v in SMOKE_PARAMETERS.items() if k not in ("domains", "coefficients")}
    return {"overrides": overrides, **extra}


# In book order. The defaults of each notebook's `parameters` cell are the embedded miniature.
NOTEBOOKS: tuple[BookNotebook, ...] = (
    BookNotebook("subspace_overlap", smoke=_derivation_smoke(domains=["photo", "negative", "sketch"])),
    BookNotebook("score_derived", smoke=_derivation_smoke(domains=["photo", "negative", "sketch"], z_values=[1.96, 4.0],
                                                          rank_fractions=[0.5, 1.0])),
    BookNotebook("esm_derived", smoke=_derivation_smoke(proxy_count=8, proxy_counts=[2, 8], coefficients=[0.5, 1.0],
                                                        rank_fractions=[0.05, 1.0])),
    BookNotebook("domain_generalization", smoke=_miniature_smoke()),
    BookNotebook("ablations", smoke=_derivation_smoke(domains=["photo", "negative", "sketch"], z_values=[], rank_fractions=[],
                                                      merge_baselines=["task_arithmetic"], esm_decompositions=["esd"],
                                                      esm_coefficients=[1.0], esm_proxy_count=8)),
    BookNotebook("benchmark_dg", smoke={"datasets": ["PACS"], "methods": ["task_arithmetic", "score", "esm"],
                                        "standin_images_per_class": 2, "standin_epochs": 1, "weights": "random"}),
    BookNotebook("benchmark_multitask", smoke={"tasks": ["MNIST", "DTD"], "methods": ["task_arithmetic", "esm"],
                                               "standin_images_per_class": 10, "standin_epochs": 1, "weights": "random",
                                               "esm_proxy_count": 4}),
    BookNotebook("results"),
    BookNotebook("methods"),
    BookNotebook("performance", smoke={"layer_shape": [48, 24]}),
)


def execute_notebook(
    source: Path, output: Path, parameters: dict[str, Any] | None = None, *, log_output: bool = True
) -> Path:
    """Run one notebook with papermill; tag papermill's injected cell so the book hides it."""
    import papermill

    output.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(
        str(source), str(output), parameters=parameters or {}, cwd=str(source.parent),
        log_output=log_output, progress_bar=False, kernel_name="python3",
    )
    notebook = json.loads(output.read_text())
    for cell in notebook["cells"]:
        tags = cell.get("metadata", {}).get("tags", [])
        if "injected-parameters" in tags and "remove-cell" not in tags:
            tags.append("remove-cell")  # the run's parameters are printed by the notebook itself
    output.write_text(json.dumps(notebook, indent=1, ensure_ascii=False))
    return output


def execute_notebooks(
    output_dir: Path = GENERATED_DIR, *, smoke: bool = False, extra: dict[str, dict[str, Any]] | None = None,
    log_output: bool = True,
) -> list[Path]:
    """Execute every book notebook into ``output_dir``, with its book parameters, or with its smoke
    parameters when ``smoke`` (plus ``extra[name]``, e.g. a results folder for a test)."""
    unknown = sorted(set(extra or {}) - {entry.name for entry in NOTEBOOKS})
    if unknown:
        raise ValueError(f"no book notebook named {unknown}; the notebooks are {[e.name for e in NOTEBOOKS]}")
    outputs = []
    for entry in NOTEBOOKS:
        start = time.perf_counter()
        print(f"[mergelib] executing notebooks/{entry.name}.ipynb with papermill", flush=True)
        parameters = {**(entry.smoke if smoke else entry.parameters), **(extra or {}).get(entry.name, {})}
        outputs.append(execute_notebook(NOTEBOOK_DIR / f"{entry.name}.ipynb", output_dir / f"{entry.name}.ipynb",
                                        parameters, log_output=log_output))
        print(f"[mergelib] notebooks/{entry.name}.ipynb: {time.perf_counter() - start:.1f} s", flush=True)
    return outputs


def build_book(root: Path = REPO_ROOT, **run_options: Any) -> subprocess.CompletedProcess:
    """``jupyter-book build -W -n --keep-going`` (warnings, broken references and errors fail)."""
    executable = Path(sys.executable).with_name("jupyter-book")
    command = [str(executable), "build", "-W", "-n", "--keep-going", str(root)]
    return subprocess.run(command, **{"check": True, **run_options})


def glue(name: str, value: Any) -> None:
    """``myst_nb.glue`` without display, converting numpy scalars to Python numbers.

    myst-nb formats glued numbers (``{glue:text}`key:.1f```) from their text repr, which for a
    numpy scalar is ``np.float64(...)`` and cannot be formatted.
    """
    from myst_nb import glue as myst_glue

    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()
    myst_glue(name, value, display=False)


def method_card(method) -> str:
    """A MyST Markdown description of a registered merging method, for the book's methods page.

    Everything comes from the registry: the paper, the arXiv id, the equation, the defaults read
    from the function's signature, the docstring's summary and the notes on where the method
    follows the released code rather than the paper's text.
    """
    import inspect

    lines = [f"## `{method.name}`", "", method.summary, "",
             f"**Paper.** {method.paper}" + (f", [arXiv {method.arxiv}](https://arxiv.org/abs/{method.arxiv})." if method.arxiv else "."),
             "", "$$", method.equation, "$$", ""]
    if method.defaults:
        lines += ["| parameter | default |", "| --- | --- |"]
        lines += [f"| `{name}` | `{value!r}` |" for name, value in method.defaults.items()]
        lines.append("")
    else:
        lines += ["No parameters.", ""]
    if method.code_notes:
        lines += ["**Where it follows the released code rather than the paper's text.**", ""]
        lines += [f"- {note}" for note in method.code_notes]
        lines.append("")
    module = inspect.getmodule(method.function)
    lines.append(f"Implemented in `{module.__name__}` (`{method.function.__name__}`).")
    return "\n".join(lines)
