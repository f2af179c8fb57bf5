"""Sweeps: idempotent jobs over backbone x dataset x domain/task, run inline or through submitit.

A :class:`Job` is a job *kind* (the name of a registered function) with JSON parameters and the
ids of the jobs it depends on. Its id is the kind plus a short hash of the parameters, so the
same configuration always maps to the same result file::

    {results_dir}/{kind}/{job.id}.json      the result record (params, outputs, provenance, timings)
    {results_dir}/{kind}/{job.id}/          the job's working directory (large artefacts)

The record is written atomically and *last*: its presence, parseable and with matching
parameters, is what marks a job done. A kind's function writes its artefacts (atomically, e.g.
with :func:`mergelib.io.checkpoints.save_state`) into its working directory before returning, so a
job killed at any point leaves either a complete result or no record at all.

:func:`run_sweep` skips done jobs, reruns jobs whose record is corrupt, and runs the rest in
dependency waves (topological levels): ``"inline"`` in this process, or through submitit
(https://github.com/facebookincubator/submitit) with ``"local"`` (subprocesses of this machine),
``"slurm"`` (one job array per wave) or ``"debug"`` (submitit's in-process executor). A failing
job does not lose the others' results; its dependants are reported as blocked, not run.
Rerunning the same sweep resumes it: finished jobs are never redone.

One sweep at a time per ``results_dir``, and every job runs once: :func:`run_sweep` holds the
lock ``{results_dir}/sweep.lock`` (:mod:`mergelib.io.locks`) while it runs, so a second sweep over
the same folder stops at once with :class:`~mergelib.experiments.sweep.SweepLockedError`, naming the sweep that runs there;
:func:`sweep_status` stays usable meanwhile (read-only). Each job runs under its own lock
``{results_dir}/{kind}/{job.id}.lock``: a worker that finds its job being run by another live
process (e.g. a worker left running by a killed sweep) waits for it and returns its record. The
lock of a killed sweep or worker is stale and is taken over by the next run, with a notice.

Job kinds must be importable on the worker: submitit pickles :func:`execute_job` and the
:class:`Job` by reference and the worker (a fresh interpreter) looks the kind up in
:data:`JOB_KINDS`. Define kinds in an importable module (installed, or on ``PYTHONPATH``),
never in ``__main__`` (a script or notebook); :func:`run_sweep` passes the defining module to the
worker, which imports it. A kind may also be named ``"package.module:function"``; the worker
imports that module and calls the function without prior registration.

This module knows no kind itself. The kinds mergelib ships are registered by the modules in
:data:`BUILT_IN_KIND_MODULES` (``"merge-files"``, :mod:`mergelib.experiments.jobs`), imported
when a kind is not registered yet, and by :mod:`mergelib.experiments.benchmark_sweeps` (the
benchmarks' kinds, registered when it is imported).

Not from a paper: this is infrastructure, following no released code.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import json
import math
import os
import re
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from mergelib.io.checkpoints import atomic_write, config_hash, remove_stale_temporaries
from mergelib.errors import MergelibError, ParameterValueError, lookup
from mergelib.io.locks import DEFAULT_WAIT_SECONDS, LockHeldError, OwnerLock, lock_holder
from mergelib.io.provenance import code_fingerprint, git_state, provenance
from mergelib.methods.common import is_list_like

if TYPE_CHECKING:
    import pandas as pd

RECORD_FORMAT = 1
ID_HASH_LENGTH = 12
EXECUTORS = ("inline", "local", "slurm", "debug", "auto")
#: submitit options used unless ``executor_options`` overrides them. submitit's local executor
#: kills a job after 2 minutes by default, too short for fine-tuning.
DEFAULT_EXECUTOR_OPTIONS: dict[str, Any] = {"timeout_min": 12 * 60}


def check_executor(executor: str) -> str:
    """``executor`` if it is one of ``EXECUTORS`` and can run here, else a clear error:
    ``"slurm"`` needs SLURM's ``sbatch`` on ``PATH`` (a cluster's login node)."""
    import shutil

    if executor not in EXECUTORS:
        raise ParameterValueError(f"unknown executor {executor!r}; valid executors: {', '.join(EXECUTORS)}")
    if executor == "slurm" and shutil.which("sbatch") is None:
        raise ParameterValueError(
            "executor 'slurm' needs SLURM, but `sbatch` is not on PATH on this machine; run the sweep from the "
            "cluster's login node, or use executor 'local' (--executor local: subprocesses of this machine)")
    return executor

JobFunction = Callable[..., Mapping[str, Any]]


class SweepPlanError(MergelibError, ValueError):
    """A sweep that cannot be scheduled: duplicate ids, unknown dependencies, cycles."""


class SweepFailedError(MergelibError, RuntimeError):
    """Raised by :meth:`SweepReport.raise_on_failure` when jobs failed or were blocked."""


class SweepLockedError(LockHeldError):
    """Another sweep runs over the same ``results_dir`` (its lock names it)."""


# --------------------------------------------------------------------------------------- jobs


def _canonical_json(value: Any, what: str) -> Any:
    """``value`` after a JSON round trip (tuples become lists); a clear error if it is not JSON."""
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ParameterValueError(
            f"{what} must be JSON-serialisable (str, int, float, bool, None, lists, dicts with str keys; "
            f"no NaN): {error}. Pass paths as str and tensors as files."
        ) from None


def kind_slug(kind: str) -> str:
    """The folder name of a kind's results (``pkg.mod:fn`` -> ``pkg.mod_fn``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", kind)


@dataclass(frozen=True)
class Job:
    """One unit of work: ``kind`` (a registered name or ``"package.module:function"``), its
    JSON ``params``, and the ids of the jobs it depends on (``after``; :class:`Job` objects are
    accepted and replaced by their ids). The id depends on ``kind`` and ``params`` only."""

    kind: str
    params: Mapping[str, Any] = field(default_factory=dict)
    after: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not self.kind.strip() or self.kind != self.kind.strip():
            raise ParameterValueError(f"job kind must be a non-empty name without surrounding spaces, got {self.kind!r}")
        if not isinstance(self.params, Mapping):
            raise ParameterValueError(f"job {self.kind!r}: params must be a dict, got {type(self.params).__name__}")
        object.__setattr__(self, "params", _canonical_json(dict(self.params), f"params of job kind {self.kind!r}"))
        if isinstance(self.after, (str, Job)):
            after: Iterable[Any] = (self.after,)
        else:
            after = self.after
        ids = tuple(dict.fromkeys(a.id if isinstance(a, Job) else a for a in after))
        if not all(isinstance(a, str) for a in ids):
            raise ParameterValueError(f"job {self.kind!r}: 'after' must hold job ids (str) or Jobs, got {list(ids)!r}")
        object.__setattr__(self, "after", ids)

    def __hash__(self) -> int:  # params is a dict: hash by identity of the configuration
        return hash((self.id, self.after))

    @property
    def id(self) -> str:
        digest = config_hash({"kind": self.kind, "params": self.params})
        return f"{kind_slug(self.kind)}-{digest[:ID_HASH_LENGTH]}"

    def record_path(self, results_dir: str | Path) -> Path:
        return record_path(results_dir, self.id)

    def workdir(self, results_dir: str | Path) -> Path:
        return Path(results_dir) / kind_slug(self.kind) / self.id


def _slug_of_id(job_id: str) -> str:
    return job_id.rsplit("-", 1)[0]


def record_path(results_dir: str | Path, job_id: str) -> Path:
    """Where the record of job ``job_id`` lives: ``{results_dir}/{kind}/{job_id}.json``."""
    return Path(results_dir) / _slug_of_id(job_id) / f"{job_id}.json"


def _failure_path(results_dir: str | Path, job_id: str) -> Path:
    # Not *.json, so that every *.json under a kind's folder is a result record.
    return Path(results_dir) / _slug_of_id(job_id) / f"{job_id}.failed"


def sweep_lock_path(results_dir: str | Path) -> Path:
    """The lock of the sweep running over ``results_dir`` (see the module docstring)."""
    return Path(results_dir) / "sweep.lock"


def _job_lock(results_dir: str | Path, job: "Job") -> OwnerLock:
    return OwnerLock(Path(results_dir) / _slug_of_id(job.id) / f"{job.id}.lock", f"job {job.id} ({job.kind})")


# ------------------------------------------------------------------------------- job registry

#: Registered job kinds by name, filled by :func:`register_job_kind`.
JOB_KINDS: dict[str, JobFunction] = {}

#: Modules that register mergelib's general-purpose kinds; :func:`resolve_job_kind` imports them
#: when it meets a name not registered yet (in this process or on a worker).
BUILT_IN_KIND_MODULES: tuple[str, ...] = ("mergelib.experiments.jobs",)


def _qualified_name(function: Callable) -> str:
    return f"{function.__module__}:{function.__qualname__}"


def register_job_kind(name: str, function: JobFunction | None = None, *, replace: bool = False):
    """Register ``function(params, workdir) -> dict`` as job kind ``name``.

    Use directly (``register_job_kind("x", f)``) or as a decorator (``@register_job_kind("x")``).
    The function may also take a keyword ``inputs``: it then receives the records of the jobs
    it depends on (``{job id: record}``). Define it in an importable module (see the module
    docstring). Registering another function under a taken name needs ``replace=True``; the
    same function (same module and qualified name, e.g. a re-imported module) is accepted.
    """
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ParameterValueError(
            f"job kind name {name!r}: use letters, digits, '.', '_' and '-' (':' is reserved for "
            "'package.module:function' kinds)"
        )

    def decorator(fn: JobFunction) -> JobFunction:
        if not callable(fn):
            raise ParameterValueError(f"job kind {name!r}: {fn!r} is not callable")
        old = JOB_KINDS.get(name)
        if old is not None and not replace and _qualified_name(old) != _qualified_name(fn):
            raise ParameterValueError(
                f"job kind {name!r} is already registered to {_qualified_name(old)}; choose another name "
                "or pass replace=True"
            )
        JOB_KINDS[name] = fn
        return fn

    return decorator if function is None else decorator(function)


def resolve_job_kind(kind: str) -> JobFunction:
    """The function of job kind ``kind``: registered (by the caller or by one of
    :data:`BUILT_IN_KIND_MODULES`), or imported from ``"package.module:function"``."""
    if kind in JOB_KINDS:
        return JOB_KINDS[kind]
    module_name, colon, attribute = kind.partition(":")
    if colon and module_name and attribute:
        try:
            target: Any = importlib.import_module(module_name)
            for part in attribute.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError) as error:
            raise ParameterValueError(
                f"job kind {kind!r}: cannot import {attribute!r} from module {module_name!r} ({error}); "
                "the module must be importable (installed or on PYTHONPATH) where the job runs"
            ) from error
        if not callable(target):
            raise ParameterValueError(f"job kind {kind!r}: {attribute!r} in {module_name!r} is not callable")
        return target
    for module in BUILT_IN_KIND_MODULES:
        importlib.import_module(module)
    return lookup(JOB_KINDS, "job kind", kind)


def check_job_params(kind: str, params: Mapping[str, Any], required: Iterable[str], optional: Iterable[str] = ()) -> None:
    """For the functions of job kinds: raise a :class:`~mergelib.errors.ParameterValueError`
    naming the unknown and the missing parameters of a job."""
    required, valid = set(required), set(required) | set(optional)
    unknown, missing = sorted(set(params) - valid), sorted(required - set(params))
    if unknown or missing:
        raise ParameterValueError(f"{kind} job: unknown parameters {unknown}, missing {missing}; "
                                  f"valid parameters: {', '.join(sorted(valid))}")


def _worker_modules(jobs: Sequence[Job], executor: str) -> tuple[str, ...]:
    """Modules the worker must import so that the registry holds every kind of ``jobs``."""
    modules = []
    for job in jobs:
        function = resolve_job_kind(job.kind)  # unknown kinds fail here, before anything is submitted
        module = function.__module__
        if module == "__main__" and executor not in ("inline", "debug"):
            raise SweepPlanError(
                f"job kind {job.kind!r} is defined in __main__ (a script, notebook or 'python -c'); submitit "
                "workers cannot import it. Move the function to an importable module, or run with executor='inline'"
            )
        if job.kind in JOB_KINDS and module not in (__name__, "__main__"):
            modules.append(module)
    return tuple(dict.fromkeys(modules))


# ------------------------------------------------------------------------------------ planning


def grid(
    kind: str,
    *,
    fixed: Mapping[str, Any] | None = None,
    after: Sequence[Job | str] | Callable[[dict[str, Any]], Sequence[Job | str]] = (),
    **axes: Sequence[Any],
) -> list[Job]:
    """Jobs of ``kind`` over the Cartesian product of ``axes`` (the last axis varies fastest).

    Every axis is a list (or tuple) of values; a parameter with one value for all jobs goes in
    ``fixed`` (also the way to give a list-valued parameter). ``after``: the dependencies of
    every job, or a function ``params -> dependencies`` (e.g. the fine-tuning jobs of the same
    backbone and dataset for a merge job).

    ``grid("finetune", backbone=["ViT-B-32"], domain=["photo", "sketch"], fixed={"dataset": "PACS"})``
    gives two jobs.
    """
    fixed = dict(fixed or {})
    for name, values in axes.items():
        if not is_list_like(values):
            raise ParameterValueError(
                f"grid axis {name!r} must be a list of values, got {values!r}; put a parameter shared "
                f"by all jobs in fixed={{{name!r}: ...}}"
            )
    overlap = sorted(set(fixed) & set(axes))
    if overlap:
        raise ParameterValueError(f"grid parameters {overlap} are given both as axes and in fixed; give each once")
    jobs = []
    for values in itertools.product(*axes.values()):
        params = {**fixed, **dict(zip(axes, values))}
        dependencies = after(params) if callable(after) else after
        jobs.append(Job(kind, params, tuple(dependencies)))
    return jobs


def _unique_jobs(jobs: Iterable[Job]) -> list[Job]:
    by_id: dict[str, Job] = {}
    for job in jobs:
        if not isinstance(job, Job):
            raise SweepPlanError(f"a sweep holds Job objects, got {type(job).__name__}: {job!r}")
        seen = by_id.get(job.id)
        if seen is not None and seen.after != job.after:
            raise SweepPlanError(
                f"job {job.id} is listed twice with different dependencies ({list(seen.after)} and "
                f"{list(job.after)}); give each configuration once"
            )
        by_id.setdefault(job.id, job)
    return list(by_id.values())


def dependency_waves(jobs: Iterable[Job]) -> list[list[Job]]:
    """Topological levels: wave 0 has no dependencies; wave k depends only on earlier waves.

    Duplicate jobs (same id and dependencies) are merged. Raises :class:`SweepPlanError` for a
    dependency that is not among ``jobs`` or for a cycle (naming the jobs on it).
    """
    unique = _unique_jobs(jobs)
    by_id = {job.id: job for job in unique}
    for job in unique:
        unknown = [d for d in job.after if d not in by_id]
        if unknown:
            raise SweepPlanError(
                f"job {job.id} ({job.kind}) depends on {unknown}, which are not in this sweep; "
                "include those jobs in the list given to the sweep"
            )
    level: dict[str, int] = {}
    remaining = dict(by_id)
    while remaining:
        ready = [i for i, job in remaining.items() if all(d in level for d in job.after)]
        if not ready:
            raise SweepPlanError(f"dependency cycle among jobs: {' -> '.join(_find_cycle(remaining))}")
        for job_id in ready:
            level[job_id] = 1 + max((level[d] for d in remaining[job_id].after), default=-1)
            del remaining[job_id]
    waves: list[list[Job]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for job in unique:  # keeps the given order within a wave
        waves[level[job.id]].append(job)
    return waves


def _find_cycle(remaining: Mapping[str, Job]) -> list[str]:
    """A cycle among ``remaining`` (each of which has an unresolved dependency in it)."""
    path: list[str] = []
    current = next(iter(remaining))
    while current not in path:
        path.append(current)
        current = next(d for d in remaining[current].after if d in remaining)
    return [*path[path.index(current):], current]


def plan_sweep(*job_lists: Iterable[Job]) -> list[Job]:
    """Concatenate job lists (e.g. several :func:`grid` calls), drop duplicates, check the
    dependencies, and return the jobs in an order where each comes after its dependencies."""
    return [job for wave in dependency_waves(itertools.chain(*job_lists)) for job in wave]


# ------------------------------------------------------------------------------------- records


def check_record(job: Job, results_dir: str | Path) -> tuple[str, str | None]:
    """``("done", None)``, ``("missing", None)`` or ``("corrupt", reason)`` for ``job``'s record."""
    path = job.record_path(results_dir)
    if not path.is_file():
        return "missing", None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return "corrupt", f"unparseable JSON ({error})"
    if not isinstance(record, dict):
        return "corrupt", f"not a JSON object but a {type(record).__name__}"
    problems = []
    if record.get("format") != RECORD_FORMAT:
        problems.append(f"format {record.get('format')!r} (expected {RECORD_FORMAT})")
    if record.get("job_id") != job.id or record.get("kind") != job.kind:
        problems.append(f"made for job {record.get('job_id')!r} of kind {record.get('kind')!r}")
    if config_hash(record.get("params")) != config_hash(job.params):
        problems.append("params differ from the job's")
    if not isinstance(record.get("outputs"), dict):
        problems.append("no 'outputs'")
    return ("corrupt", "; ".join(problems)) if problems else ("done", None)


def load_record(job: Job, results_dir: str | Path) -> dict[str, Any]:
    """The valid record of a done job; :class:`SweepPlanError` if it is missing or corrupt."""
    state, reason = check_record(job, results_dir)
    if state != "done":
        detail = f": {reason}" if reason else ""
        raise SweepPlanError(f"job {job.id} has no valid record at {job.record_path(results_dir)} ({state}{detail}); run the sweep")
    return json.loads(job.record_path(results_dir).read_text())


def _to_json(value: Any) -> Any:
    """``json.dumps`` default: tensors and numpy values as lists/numbers, paths as str."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _write_json(path: Path, payload: Any) -> None:
    text = json.dumps(payload, indent=2, sort_keys=True, default=_to_json, allow_nan=True)
    atomic_write(path, lambda tmp: tmp.write_text(text))


# ------------------------------------------------------------------------------------- worker


def execute_job(job: Job, results_dir: str | Path, modules: Sequence[str] = (), *,
                wait: float = DEFAULT_WAIT_SECONDS) -> dict[str, Any]:
    """Run one job and write its record; the entry point of every worker (inline or submitit).

    ``modules`` are imported first (they register the job kinds defined outside mergelib). A job
    whose valid record exists is not run again: its record is returned. The job runs under its
    lock: if another live process runs it, this one waits for it (up to ``wait`` seconds, then
    :class:`mergelib.io.locks.LockHeldError`) and returns the record it wrote. On an exception a
    ``{id}.failed`` file (JSON: error, traceback) is written beside the record's place and the
    exception propagates (submitit records it too).
    """
    results_dir = Path(results_dir)
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ParameterValueError(
                f"job {job.id}: cannot import module {module!r}, which defines job kind {job.kind!r} ({error}); "
                "job kinds must live in a module importable where the job runs (installed, or on PYTHONPATH)"
            ) from error
    if check_record(job, results_dir)[0] == "done":
        return json.loads(job.record_path(results_dir).read_text())
    with _job_lock(results_dir, job).acquire(wait=wait):
        return _run_job(job, results_dir)


def _run_job(job: Job, results_dir: Path) -> dict[str, Any]:
    """The body of :func:`execute_job`, under the job's lock: the record, made now unless another
    process made it while this one waited for the lock."""
    path = job.record_path(results_dir)
    state, _ = check_record(job, results_dir)
    if state == "done":
        return json.loads(path.read_text())
    failure = _failure_path(results_dir, job.id)
    git = git_state()
    started_wall, started = datetime.now(timezone.utc), time.perf_counter()
    try:
        function = resolve_job_kind(job.kind)
        workdir = job.workdir(results_dir)
        workdir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)  # a killed earlier run's temporaries of this record
        kwargs = {}
        if "inputs" in inspect.signature(function).parameters:
            kwargs["inputs"] = {d: json.loads(record_path(results_dir, d).read_text()) for d in job.after}
        outputs = function(dict(job.params), workdir, **kwargs)
        if not isinstance(outputs, Mapping):
            raise ParameterValueError(
                f"job kind {job.kind!r} returned a {type(outputs).__name__}; a job function returns a dict of outputs"
            )
        outputs = json.loads(json.dumps(dict(outputs), default=_to_json))
    except Exception as error:
        _write_json(failure, {
            "job_id": job.id, "kind": job.kind, "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc(), "host": socket.gethostname(),
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })
        raise
    seconds = time.perf_counter() - started
    record = {
        "format": RECORD_FORMAT,
        "job_id": job.id,
        "kind": job.kind,
        "params": job.params,
        "after": list(job.after),
        "outputs": outputs,
        "timings": {
            "started": started_wall.isoformat(timespec="milliseconds"),
            "finished": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "seconds": seconds,
        },
        "provenance": provenance(
            job.params, git=git, code=code_fingerprint(), host=socket.gethostname(), pid=os.getpid(),
            submitit_job_id=_submitit_job_id(),
        ),
    }
    _write_json(path, record)  # last: its presence marks the job done
    failure.unlink(missing_ok=True)
    return record


def _submitit_job_id() -> str | None:
    for variable in ("SLURM_ARRAY_JOB_ID", "SLURM_JOB_ID", "SUBMITIT_LOCAL_JOB_ID", "SUBMITIT_DEBUG_JOB_ID"):
        if os.environ.get(variable):
            if variable == "SLURM_ARRAY_JOB_ID" and os.environ.get("SLURM_ARRAY_TASK_ID"):
                return f"{os.environ[variable]}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            return os.environ[variable]
    return None


# ------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class JobFailure:
    job_id: str
    kind: str
    error: str  # one line: "ExceptionType: message"
    details: str  # the traceback, or submitit's message with the end of the logs
    log: str | None  # the submitit log (stderr) of the job; None inline


@dataclass(frozen=True)
class JobBlocked:
    job_id: str
    kind: str
    blocked_by: tuple[str, ...]  # its failed or blocked dependencies


@dataclass
class SweepReport:
    """What :func:`run_sweep` did. Ids in the order of the sweep."""

    results_dir: Path
    executor: str
    completed: list[str] = field(default_factory=list)  # run now, record written
    skipped: list[str] = field(default_factory=list)  # done before this run (valid record)
    failed: list[JobFailure] = field(default_factory=list)
    blocked: list[JobBlocked] = field(default_factory=list)
    rerun_corrupt: dict[str, str] = field(default_factory=dict)  # job id -> why its record was invalid
    submitit_ids: dict[str, str] = field(default_factory=dict)  # job id -> submitit job id
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocked

    @property
    def total(self) -> int:
        return len(self.completed) + len(self.skipped) + len(self.failed) + len(self.blocked)

    def summary(self) -> str:
        lines = [
            f"sweep in {self.results_dir} ({self.executor}, {self.seconds:.1f} s): {len(self.completed)} run, "
            f"{len(self.skipped)} skipped (done before), {len(self.failed)} failed, {len(self.blocked)} blocked"
        ]
        lines += [f"  rerun (corrupt record) {i}: {why}" for i, why in self.rerun_corrupt.items()]
        lines += [f"  FAILED {f.job_id}: {f.error}" + (f" [log: {f.log}]" if f.log else "") for f in self.failed]
        lines += [f"  blocked {b.job_id}: depends on {', '.join(b.blocked_by)}" for b in self.blocked]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def raise_on_failure(self) -> "SweepReport":
        if not self.ok:
            raise SweepFailedError(self.summary())
        return self


# ------------------------------------------------------------------------------------- runner


def _log(message: str) -> None:
    print(f"[mergelib] sweep: {message}", file=sys.stderr, flush=True)


def _headline(results_dir: Path, job: Job, fallback: BaseException) -> str:
    """The worker's one-line error when it wrote one, else the last line of submitit's message."""
    try:
        return json.loads(_failure_path(results_dir, job.id).read_text())["error"]
    except (OSError, ValueError, KeyError, TypeError):
        lines = [line for line in str(fallback).splitlines() if line.strip() and not set(line) <= {"-"}]
        return f"{type(fallback).__name__}: {lines[0] if lines else fallback!r}"


def _run_inline(jobs: Sequence[Job], results_dir: Path, modules: Sequence[str]) -> dict[str, JobFailure | None]:
    outcome: dict[str, JobFailure | None] = {}
    for job in jobs:
        try:
            execute_job(job, results_dir, modules)
            outcome[job.id] = None
        except Exception as error:  # one job's failure must not stop the sweep
            outcome[job.id] = JobFailure(job.id, job.kind, f"{type(error).__name__}: {error}", traceback.format_exc(), None)
    return outcome


def _make_executor(executor: str, results_dir: Path, options: Mapping[str, Any], max_parallel: int | None):
    import submitit

    folder = results_dir / "submitit"
    auto = submitit.AutoExecutor(folder=folder, cluster=None if executor == "auto" else executor)
    parameters = {**DEFAULT_EXECUTOR_OPTIONS, "name": "mergelib-sweep", **options}
    if max_parallel is not None:
        parameters.setdefault("slurm_array_parallelism", max_parallel)
    auto.update_parameters(**parameters)
    return auto


def _run_submitit(
    auto, jobs: Sequence[Job], results_dir: Path, modules: Sequence[str], chunk: int, report: SweepReport
) -> dict[str, JobFailure | None]:
    """Submit ``jobs`` with ``map_array`` in chunks of ``chunk`` and wait for each chunk."""
    outcome: dict[str, JobFailure | None] = {}
    for start in range(0, len(jobs), chunk):
        part = list(jobs[start:start + chunk])
        handles = auto.map_array(execute_job, part, [str(results_dir)] * len(part), [tuple(modules)] * len(part))
        for job, handle in zip(part, handles):
            report.submitit_ids[job.id] = str(handle.job_id)
        for job, handle in zip(part, handles):
            try:
                handle.result()
                outcome[job.id] = None
            except Exception as error:  # FailedJobError (raised) or UncompletedJobError (killed, timed out)
                log = str(handle.paths.stderr)
                outcome[job.id] = JobFailure(job.id, job.kind, _headline(results_dir, job, error), str(error), log)
    return outcome


def run_sweep(
    jobs: Iterable[Job],
    results_dir: str | Path,
    *,
    executor: str = "inline",
    executor_options: Mapping[str, Any] | None = None,
    max_parallel: int | None = None,
) -> SweepReport:
    """Run the jobs that are not done yet; return a :class:`SweepReport`.

    Args:
        jobs: the sweep (dependencies must be among them; see :func:`plan_sweep`).
        results_dir: where records, working directories and submitit's files (``submitit/``) go;
            on Slurm, a folder on a filesystem shared with the compute nodes.
        executor: ``"inline"`` (this process, one job after another), ``"local"`` (submitit
            subprocesses of this machine), ``"slurm"``, ``"debug"`` (submitit in-process) or
            ``"auto"`` (Slurm when available, else local).
        executor_options: passed to submitit's ``update_parameters`` over
            :data:`DEFAULT_EXECUTOR_OPTIONS`, e.g. ``{"timeout_min": 240, "slurm_partition":
            "gpu", "gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 32}``.
        max_parallel: jobs running at once. Slurm: ``slurm_array_parallelism`` of each wave's
            job array (default: no cap). Local and debug: a wave is submitted in chunks of this
            size, each waited for (default 1; submitit's local executor runs a whole array at once).
            Note: submitit's debug executor opens pdb on a failing job (meant for debugging).

    Jobs with a valid record are skipped; a corrupt record (unparseable, or made for other
    params) is reported, deleted and its job rerun. Waves run in dependency order; dependants
    of a failed job are blocked, not run. The sweep holds ``{results_dir}/sweep.lock`` while it
    runs: a second sweep over the same folder raises :class:`~mergelib.experiments.sweep.SweepLockedError` (naming the
    first) before it runs anything; the lock of a killed sweep is taken over with a notice.
    """
    check_executor(executor)
    if max_parallel is not None and (not isinstance(max_parallel, int) or max_parallel < 1):
        raise ParameterValueError(f"max_parallel must be a positive integer or None, got {max_parallel!r}")
    results_dir = Path(results_dir).resolve()
    waves = dependency_waves(jobs)
    all_jobs = [job for wave in waves for job in wave]
    modules = _worker_modules(all_jobs, executor)
    lock = OwnerLock(sweep_lock_path(results_dir), f"a sweep of {len(all_jobs)} job(s) over {results_dir}", hint=(
        "This sweep stops without running anything: both would run the same jobs. Follow the running sweep with "
        "`mergelib sweep ... --status` (or mergelib.experiments.sweep.sweep_status; read-only, safe while it runs) and rerun "
        "this command when it has ended"))
    try:
        lock.acquire()
    except LockHeldError as error:
        raise SweepLockedError(f"sweep directory {results_dir} is in use: {error}", error.path, error.owner) from None
    with lock:
        return _run_waves(waves, results_dir, executor, executor_options, max_parallel, modules)


def _run_waves(waves: Sequence[Sequence[Job]], results_dir: Path, executor: str, executor_options: Mapping[str, Any] | None,
               max_parallel: int | None, modules: Sequence[str]) -> SweepReport:
    """The body of :func:`run_sweep`, under the sweep's lock."""
    report = SweepReport(results_dir, executor)
    began = time.perf_counter()
    auto = None  # made when a job is to run: a sweep with everything done imports no submitit

    unsuccessful: set[str] = set()  # failed or blocked
    for number, wave in enumerate(waves, start=1):
        to_run = []
        for job in wave:
            state, reason = check_record(job, results_dir)
            if state == "done":
                report.skipped.append(job.id)
                lock = _job_lock(results_dir, job)
                if lock.path.exists():  # left by a worker killed after it wrote the record
                    lock.clear_stale()
                continue
            bad = tuple(d for d in job.after if d in unsuccessful)
            if bad:
                report.blocked.append(JobBlocked(job.id, job.kind, bad))
                unsuccessful.add(job.id)
                continue
            if state == "corrupt":
                _log(f"record {job.record_path(results_dir)} is corrupt ({reason}); rerunning job {job.id}")
                report.rerun_corrupt[job.id] = str(reason)
                job.record_path(results_dir).unlink(missing_ok=True)
            to_run.append(job)
        if not to_run:
            continue
        _log(f"wave {number}/{len(waves)}: running {len(to_run)} job(s) with executor {executor!r}")
        if executor == "inline":
            outcome = _run_inline(to_run, results_dir, modules)
        else:
            if auto is None:
                auto = _make_executor(executor, results_dir, executor_options or {}, max_parallel)
            # Slurm throttles a job array itself (slurm_array_parallelism): one array per wave.
            # The local and debug executors start every element of an array at once: chunks.
            chunk = len(to_run) if auto.cluster == "slurm" else (max_parallel or 1)
            outcome = _run_submitit(auto, to_run, results_dir, modules, chunk, report)
        for job in to_run:
            failure = outcome[job.id]
            state, reason = check_record(job, results_dir)
            if failure is None and state != "done":  # the function returned but no valid record is there
                failure = JobFailure(job.id, job.kind, f"no valid record after the job ({state}: {reason})", "", None)
            if failure is None or state == "done":  # a record written before a late crash still counts
                report.completed.append(job.id)
                continue
            _write_json(_failure_path(results_dir, job.id), {
                "job_id": job.id, "kind": job.kind, "error": failure.error, "traceback": failure.details,
                "log": failure.log, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            })
            report.failed.append(failure)
            unsuccessful.add(job.id)
            _log(f"job {job.id} failed: {failure.error}" + (f" (log: {failure.log})" if failure.log else ""))
    report.seconds = time.perf_counter() - began
    _log(report.summary())
    return report


# ------------------------------------------------------------------------------------- status


def sweep_status(jobs: Iterable[Job], results_dir: str | Path) -> "pd.DataFrame":
    """One row per job: ``job_id``, ``kind``, ``state``, one column per parameter, ``params``,
    ``seconds`` (of the run that made the record), ``error`` and ``record`` (path).

    States: ``done`` (valid record), ``running`` (a live process holds the job's lock; ``error``
    names it), ``failed`` (its last run failed), ``blocked`` (a dependency failed or is blocked),
    ``corrupt`` (a record that will be rerun), ``pending`` (otherwise). Read-only: safe while a
    sweep runs over ``results_dir``.
    """
    import pandas as pd

    results_dir = Path(results_dir)
    base = ("job_id", "kind", "state", "params", "seconds", "error", "record")
    rows, states = [], {}
    for job in plan_sweep(jobs):
        state, reason = check_record(job, results_dir)
        seconds, error = math.nan, reason
        holder = None if state == "done" else lock_holder(_job_lock(results_dir, job).path)
        if state == "done":
            seconds = json.loads(job.record_path(results_dir).read_text()).get("timings", {}).get("seconds", math.nan)
        elif holder is not None:
            state, error = "running", f"run by {holder.describe()}"
        elif _failure_path(results_dir, job.id).is_file():
            state = "failed"
            try:
                error = json.loads(_failure_path(results_dir, job.id).read_text()).get("error")
            except (OSError, ValueError):
                error = "failed (unreadable failure file)"
        elif state == "missing":
            bad = [d for d in job.after if states.get(d) in ("failed", "blocked")]
            state, error = ("blocked", f"depends on {', '.join(bad)}") if bad else ("pending", None)
        states[job.id] = state
        params = {(f"param.{k}" if k in base else k): v for k, v in job.params.items()}
        rows.append({"job_id": job.id, "kind": job.kind, "state": state, **params, "params": job.params,
                     "seconds": seconds, "error": error, "record": str(job.record_path(results_dir))})
    if not rows:
        return pd.DataFrame(columns=list(base))
    frame = pd.DataFrame(rows)
    first = ["job_id", "kind", "state"]
    return frame[first + [c for c in frame.columns if c not in first]]


def sweep_results(jobs: Iterable[Job], results_dir: str | Path) -> "pd.DataFrame":
    """The outputs of the done jobs, one row each: ``job_id``, ``kind``, the parameters, then the
    outputs (an output named like a parameter gets the prefix ``output.``) and ``seconds``.
    Jobs without a valid record are left out (see :func:`sweep_status` for them)."""
    import pandas as pd

    rows = []
    for job in plan_sweep(jobs):
        if check_record(job, results_dir)[0] != "done":
            continue
        record = load_record(job, results_dir)
        outputs = {(f"output.{k}" if k in job.params or k in ("job_id", "kind", "seconds") else k): v
                   for k, v in record["outputs"].items()}
        rows.append({"job_id": job.id, "kind": job.kind, **job.params, **outputs,
                     "seconds": record.get("timings", {}).get("seconds", math.nan)})
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=["job_id", "kind", "seconds"])
