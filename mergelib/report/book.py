"""Execute the book's notebooks with papermill, then build the Jupyter Book (1.x).

The notebooks in ``notebooks/`` are committed without outputs. :func:`execute_notebooks` runs each
with papermill (a failing cell raises, so the build fails) into ``book/_generated/``, which
``_toc.yml`` points at; :func:`build_book` then runs ``jupyter-book build -W -n --keep-going``
with execution off, so every number on a page comes from the papermill run.

Executions are cached: beside each executed notebook, ``book/_generated/.cache/<name>.json`` stores
the key it was executed with (its source, its parameters, the fingerprint of ``mergelib``'s code,
the package versions and the fingerprints of the stored files it reads, see
:attr:`BookNotebook.inputs`) and the fingerprints of the files it wrote
(:attr:`BookNotebook.outputs`). A chapter whose key is unchanged and whose outputs are intact is
reused as it is (the file is not touched, so Sphinx does not read it again); otherwise it is
executed again, and the reason is printed. :func:`lab_command` opens the same notebooks in
JupyterLab.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from mergelib.io.provenance import REPO_ROOT, code_fingerprint, versions, write_json

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
GENERATED_DIR = REPO_ROOT / "book" / "_generated"
KEY_DIR = ".cache"  # under the executed notebooks' folder: book/_generated/.cache/<name>.json


@dataclass(frozen=True)
class BookNotebook:
    """A chapter of the book: a notebook of ``notebooks/`` and what its execution depends on.

    ``inputs`` and ``outputs`` are globs relative to the repository (``**`` allowed). ``inputs``:
    the stored files the chapter reads (committed results, or files another chapter writes earlier
    in the same build); a glob matching nothing counts as "absent", so files appearing later
    re-execute the chapter. ``outputs``: the files the chapter writes (and may read back); they are
    fingerprinted after its execution, and the chapter is executed again when they are missing or
    changed. Caches under ``$MERGELIB_CACHE`` are keyed by content and need no declaration.
    """

    name: str  # file stem in notebooks/
    parameters: dict[str, Any] = field(default_factory=dict)  # overrides of the notebook's defaults
    # small parameters for CI (tests build the book with them), or a function returning them (so
    # that importing this module, e.g. for a build that reuses every chapter, does not load the models)
    smoke_parameters: dict[str, Any] | Callable[[], dict[str, Any]] = field(default_factory=dict, repr=False)
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()

    @property
    def smoke(self) -> dict[str, Any]:
        """The smoke parameters (``smoke_parameters``, called if it is a function)."""
        return self.smoke_parameters() if callable(self.smoke_parameters) else self.smoke_parameters


def _miniature_smoke() -> dict[str, Any]:
    from mergelib.experiments.miniature import SMOKE_PARAMETERS

    # the domain chapter has no task parameters (papermill would ignore them; its parameter check refuses them)
    return {k: v for k, v in SMOKE_PARAMETERS.items() if k not in ("warmup_steps", "batch_size") and not k.startswith("task_")}


def _derivation_smoke(**extra: Any) -> Callable[[], dict[str, Any]]:
    """Smoke parameters of the derivation chapters: their own names, the rest as ``overrides``."""

    def parameters() -> dict[str, Any]:
        from mergelib.experiments.miniature import SMOKE_PARAMETERS

        overrides = {k: v for k, v in SMOKE_PARAMETERS.items() if k not in ("domains", "coefficients")}
        return {"overrides": overrides, **extra}

    return parameters


MINIATURE_RESULTS = "results/miniature/domain_generalization"  # written by its chapter, shown by the results chapter
SEEDS_STUDY = "results/studies/miniature_seeds"  # `make seeds-study`; its spread is shown beside single runs

# In book order (a chapter reading another's outputs comes after it). The defaults of each
# notebook's `parameters` cell are the embedded miniature.
NOTEBOOKS: tuple[BookNotebook, ...] = (
    BookNotebook("subspace_overlap", smoke_parameters=_derivation_smoke(domains=["photo", "negative", "sketch"])),
    BookNotebook("score_derived", smoke_parameters=_derivation_smoke(
        domains=["photo", "negative", "sketch"], z_values=[1.96, 4.0], rank_fractions=[0.5, 1.0])),
    BookNotebook("esm_derived", smoke_parameters=_derivation_smoke(
        proxy_count=8, proxy_counts=[2, 8], coefficients=[0.5, 1.0], rank_fractions=[0.05, 1.0]),
                 inputs=(f"{SEEDS_STUDY}/*",)),
    BookNotebook("domain_generalization", smoke_parameters=_miniature_smoke,
                 inputs=("results/studies/miniature_recipe/*", f"{SEEDS_STUDY}/*"), outputs=(f"{MINIATURE_RESULTS}/*",)),
    BookNotebook("ablations", smoke_parameters=_derivation_smoke(
        domains=["photo", "negative", "sketch"], z_values=[], rank_fractions=[], merge_baselines=["task_arithmetic"],
        esm_decompositions=["esd"], esm_coefficients=[1.0], esm_proxy_count=8), inputs=(f"{SEEDS_STUDY}/*",)),
    BookNotebook("benchmark_dg", smoke_parameters={
        "datasets": ["PACS"], "methods": ["task_arithmetic", "score", "esm"], "standin_images_per_class": 2,
        "standin_epochs": 1, "weights": "random"},
                 outputs=("results/standin/*/domain_generalization/**",)),  # the page lists the stored files
    BookNotebook("benchmark_multitask", smoke_parameters={
        "tasks": ["MNIST", "DTD"], "methods": ["task_arithmetic", "esm"], "standin_images_per_class": 10,
        "standin_epochs": 1, "weights": "random", "esm_proxy_count": 4},
                 outputs=("results/standin/*/multitask/**",)),
    BookNotebook("results", inputs=("results/replication/**", f"{MINIATURE_RESULTS}/results.csv")),
    BookNotebook("methods"),
    BookNotebook("paper_vs_code"),  # rendered from the registry's code notes
    BookNotebook("performance", smoke_parameters={"layer_shape": [48, 24]},
                 inputs=("results/benchmarks/*.json", "benchmarks/gpu_checks.sh")),  # the script's time budget
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


# Cell metadata that Jupyter's interface writes (timings, collapsed or hidden state): not part of a
# chapter's source, so opening and saving a notebook in JupyterLab does not invalidate its execution.
_INTERFACE_METADATA = frozenset({"execution", "collapsed", "scrolled", "jupyter", "trusted", "editable", "deletable"})


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def source_fingerprint(notebook: Path) -> str:
    """SHA-256 of a notebook's cells as the book sees them: type, source and metadata (tags).

    Outputs, execution counts and the interface's state are left out, so a notebook that was run
    and saved in JupyterLab keeps its fingerprint; any edit of code or prose changes it.
    """
    cells = []
    for cell in json.loads(notebook.read_text())["cells"]:
        source = cell.get("source", "")
        cells.append({"cell_type": cell["cell_type"], "source": "".join(source) if isinstance(source, list) else source,
                      "metadata": {k: v for k, v in cell.get("metadata", {}).items() if k not in _INTERFACE_METADATA}})
    return _sha256(json.dumps(cells, sort_keys=True).encode())


def files_fingerprint(patterns: Sequence[str], root: Path = REPO_ROOT) -> dict[str, str]:
    """``{path: sha256}`` of the files matching ``patterns`` (globs relative to ``root``); a
    pattern matching no file maps to ``"absent"``. A trailing ``**`` means every file below (before
    Python 3.13, ``Path.glob`` matches only folders with it)."""
    found: dict[str, str] = {}
    for pattern in patterns:
        expanded = f"{pattern}/*" if pattern == "**" or pattern.endswith("/**") else pattern
        matches = sorted(path for path in root.glob(expanded) if path.is_file())
        if not matches:
            found[pattern] = "absent"
        for path in matches:
            found[path.relative_to(root).as_posix()] = _sha256(path.read_bytes())
    return found


def execution_key(source: Path, parameters: dict[str, Any], inputs: Sequence[str], root: Path = REPO_ROOT) -> dict[str, Any]:
    """Everything that can change an executed chapter, as named components (none varies between
    two identical runs): the notebook's source, its papermill parameters, ``mergelib``'s code
    fingerprint, the package versions and the fingerprints of the stored ``inputs`` it reads."""
    return {
        "source": source_fingerprint(source),
        "parameters": json.loads(json.dumps(parameters, sort_keys=True, default=str)),  # as stored in JSON
        "code": code_fingerprint(),
        "environment": {k: v for k, v in versions().items() if k != "platform"},
        "inputs": files_fingerprint(inputs, root),
    }


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def _changed_files(kind: str, before: dict[str, str], now: dict[str, str]) -> list[str]:
    reasons = []
    for path in sorted(set(before) | set(now)):
        old, new = before.get(path, "absent"), now.get(path, "absent")
        if old != new:
            state = "appeared" if old == "absent" else "is missing" if new == "absent" else "changed"
            reasons.append(f"{kind} {path} {state}")
    return reasons


def stale_reasons(stored: dict[str, Any] | None, key: dict[str, Any], outputs: dict[str, str]) -> list[str]:
    """Why a chapter must be executed again, given its stored record (``None``: none), its key now
    and its outputs' fingerprints now; empty when its executed copy can be reused."""
    if stored is None:
        return ["no stored execution key (first build, or the last execution did not finish)"]
    before = stored["key"]
    reasons = []
    if before.get("source") != key["source"]:
        reasons.append("notebook source changed")
    old, new = before.get("parameters", {}), key["parameters"]
    changed = [f"{name} {_short(old.get(name, '<default>'))} -> {_short(new.get(name, '<default>'))}"
               for name in sorted(set(old) | set(new)) if old.get(name, "<default>") != new.get(name, "<default>")]
    if changed:
        reasons.append("parameters changed: " + "; ".join(changed))
    if before.get("code") != key["code"]:
        reasons.append("mergelib's code changed (code fingerprint)")
    old, new = before.get("environment", {}), key["environment"]
    changed = [f"{name} {old.get(name)} -> {new.get(name)}" for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
    if changed:
        reasons.append("environment changed: " + "; ".join(changed))
    reasons += _changed_files("input", before.get("inputs", {}), key["inputs"])
    reasons += _changed_files("output", stored.get("outputs", {}), outputs)
    return reasons


@dataclass(frozen=True)
class ChapterRun:
    """What :func:`execute_notebooks` did with one chapter."""

    name: str
    path: Path  # the executed notebook
    executed: bool  # False: the executed copy was reused
    reasons: tuple[str, ...]  # why it was executed (empty when reused)
    seconds: float


def execute_notebooks(
    output_dir: Path = GENERATED_DIR, *, smoke: bool = False, extra: dict[str, dict[str, Any]] | None = None,
    log_output: bool = True, force: bool = False, notebooks: Sequence[BookNotebook] = NOTEBOOKS,
    notebook_dir: Path = NOTEBOOK_DIR, root: Path = REPO_ROOT,
) -> list[ChapterRun]:
    """Execute the book's notebooks into ``output_dir``, reusing each executed copy whose key is unchanged.

    Parameters: each notebook's book parameters, or its smoke parameters when ``smoke``, plus
    ``extra[name]`` (e.g. a results folder for a test). Chapters run in order, and each key is
    computed just before its chapter, so a chapter sees the outputs of those before it. ``force``
    executes every chapter. Prints, per chapter, whether it was executed (and why) or reused.
    ``notebooks``, ``notebook_dir`` and ``root`` (which ``inputs``/``outputs`` are relative to)
    default to the book's.
    """
    names = [entry.name for entry in notebooks]
    unknown = sorted(set(extra or {}) - set(names))
    if unknown:
        raise ValueError(f"no book notebook named {unknown}; the notebooks are {names}")
    key_dir = Path(output_dir) / KEY_DIR
    runs = []
    for entry in notebooks:
        start = time.perf_counter()
        source, output = notebook_dir / f"{entry.name}.ipynb", Path(output_dir) / f"{entry.name}.ipynb"
        record_path = key_dir / f"{entry.name}.json"
        parameters = {**(entry.smoke if smoke else entry.parameters), **(extra or {}).get(entry.name, {})}
        key = execution_key(source, parameters, entry.inputs, root)
        stored = json.loads(record_path.read_text()) if record_path.exists() else None
        if force:
            reasons = ["--force"]
        elif not output.exists():
            reasons = ["no executed copy"]
        else:
            reasons = stale_reasons(stored, key, files_fingerprint(entry.outputs, root))
        label = f"notebooks/{entry.name}.ipynb"
        if not reasons:
            print(f"[mergelib] {label}: reused (key unchanged; executed {stored.get('executed', '?')} "
                  f"in {stored.get('seconds', float('nan')):.1f} s)", flush=True)
            runs.append(ChapterRun(entry.name, output, False, (), time.perf_counter() - start))
            continue
        print(f"[mergelib] {label}: executing with papermill ({'; '.join(reasons)})", flush=True)
        record_path.unlink(missing_ok=True)  # an interrupted or failing execution leaves no key behind
        execute_notebook(source, output, parameters, log_output=log_output)
        seconds = time.perf_counter() - start
        record = {"notebook": entry.name, "key": key, "outputs": files_fingerprint(entry.outputs, root),
                  "executed": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seconds": round(seconds, 1)}
        write_json(record_path, record)
        print(f"[mergelib] {label}: executed in {seconds:.1f} s", flush=True)
        runs.append(ChapterRun(entry.name, output, True, tuple(reasons), seconds))
    executed = sum(run.executed for run in runs)
    print(f"[mergelib] notebooks: {executed} executed, {len(runs) - executed} reused "
          f"({sum(run.seconds for run in runs):.0f} s)", flush=True)
    return runs


def build_book(root: Path = REPO_ROOT, **run_options: Any) -> subprocess.CompletedProcess:
    """``jupyter-book build -W -n --keep-going`` (warnings, broken references and errors fail).

    The build is incremental: Sphinx keeps its environment in ``_build/.doctrees`` and reads
    again only the pages whose files changed. A page's warnings are only emitted when it is read,
    so after a failed build the environment is deleted: the next build reads every page again
    instead of passing silently.
    """
    executable = Path(sys.executable).with_name("jupyter-book")
    command = [str(executable), "build", "-W", "-n", "--keep-going", str(root)]
    check = run_options.pop("check", True)
    done = subprocess.run(command, **run_options)
    if done.returncode != 0:
        shutil.rmtree(Path(root) / "_build" / ".doctrees", ignore_errors=True)
        if check:
            done.check_returncode()
    return done


# Where `make book` keeps the miniature's caches (the Makefile exports the same MERGELIB_CACHE).
PROJECT_CACHE = REPO_ROOT / ".cache" / "mergelib"


def lab_command(*, port: int | None = None, open_browser: bool = True, token: str | None = None) -> list[str]:
    """The command of ``mergelib lab`` (and ``make lab``): this environment's JupyterLab on ``notebooks/``.

    ``token``: the server's access token (default: JupyterLab's own, a random one printed in the
    link it shows). Each notebook's kernel starts in ``notebooks/``, so its default parameters
    (the embedded miniature) run cell by cell exactly as in the book.
    """
    command = [str(Path(sys.executable).with_name("jupyter-lab")), f"--notebook-dir={NOTEBOOK_DIR}"]
    if port is not None:
        command.append(f"--port={port}")
    if not open_browser:
        command.append("--no-browser")
    if token is not None:
        command.append(f"--IdentityProvider.token={token}")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")  # containers often run as root; JupyterLab refuses it otherwise
    return command


def lab_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the project's settings: the caches
    of ``make book`` (``MERGELIB_CACHE``, unless set) and unbuffered output."""
    environment = dict(os.environ if base is None else base)
    environment.setdefault("MERGELIB_CACHE", str(PROJECT_CACHE))
    environment.setdefault("PYTHONUNBUFFERED", "1")
    return environment


def glue(name: str, value: Any) -> None:
    """``myst_nb.glue`` without display, converting numpy scalars to Python numbers.

    myst-nb formats glued numbers (``{glue:text}`key:.1f```) from their text repr, which for a
    numpy scalar is ``np.float64(...)`` and cannot be formatted.
    """
    from myst_nb import glue as myst_glue

    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()
    myst_glue(name, value, display=False)


def _table_cell(text: str) -> str:
    """``text`` as one cell of a Markdown table (pipes escaped)."""
    return text.replace("|", "\\|").replace("\n", " ")


def code_notes_table(method) -> str:
    """A MyST Markdown table of a registered method's code notes, one row per
    :class:`~mergelib.methods.registry.CodeNote`: the topic, what the paper's text says, what the
    released code does (mergelib's default), the switch to the paper's version and what mergelib
    does where that is not simply the released behaviour. "" for a method without notes."""
    if not method.code_notes:
        return ""
    lines = ["| # | topic | paper | released code (the default) | paper's version | `mergelib` |",
             "| --- | --- | --- | --- | --- | --- |"]
    for number, note in enumerate(method.code_notes, 1):
        switch = f"`{method.name}({note.switch})`" if note.switch else "—"
        cells = (str(number), note.topic, note.paper, note.released, switch, note.mergelib or "as released")
        lines.append("| " + " | ".join(_table_cell(cell) for cell in cells) + " |")
    return "\n".join(lines)


def method_card(method) -> str:
    """A MyST Markdown description of a registered merging method, for the book's methods page.

    Everything comes from the registry: the paper, the arXiv id, the equation, the defaults read
    from the function's signature, the docstring's summary and the topics of its code notes (where
    it follows the released code rather than the paper's text), each with the switch to the
    paper's version; :func:`code_notes_table` gives the notes in full (the paper versus code page).
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
        lines += ["**Where it follows the released code rather than the paper's text** "
                  "(in full in {doc}`paper_vs_code`):", ""]
        lines += [f"- {note.topic}" + (f" (the paper's version: `{note.switch}`)" if note.switch else "")
                  for note in method.code_notes]
        lines.append("")
    module = inspect.getmodule(method.function)
    lines.append(f"Implemented in `{module.__name__}` (`{method.function.__name__}`).")
    return "\n".join(lines)
