"""The test job kind ``"sleep-and-square"`` of the sweep and lock tests, and helpers to use it.

A kind must be importable where its job runs: submitit workers and the tests' subprocesses are
fresh interpreters that import this module by name (:func:`mergelib.experiments.sweep.run_sweep`
passes ``"sweep_jobs"`` to its workers). pytest puts ``tests/`` on ``sys.path`` (``pythonpath`` in
pyproject.toml); importing this module also puts it on ``PYTHONPATH``, which those processes inherit.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from mergelib.experiments.sweep import Job, register_job_kind

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_TESTS, os.environ.get("PYTHONPATH")) if p)


@register_job_kind("sleep-and-square")
def sleep_and_square(params: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Sleep ``seconds`` (default 1.0), return ``{"square": x * x}``.

    With ``log_dir``, each execution first leaves one file there (``x{x}-{pid}-{ns}.run``), so
    that the number of executions of each job can be counted (:func:`executions`; tests of kill
    and resume). With ``fail: true`` it raises ``ValueError`` after sleeping (tests of failures).
    """
    x = params["x"]
    if params.get("log_dir"):
        log_dir = Path(params["log_dir"])
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / f"x{x}-{os.getpid()}-{time.time_ns()}.run").touch()
    time.sleep(float(params.get("seconds", 1.0)))
    if params.get("fail"):
        raise ValueError(f"sleep-and-square asked to fail for x={x}")
    return {"square": x * x}


def square_jobs(log_dir: Path, xs, seconds: float = 0.0, **extra) -> list[Job]:
    """One ``sleep-and-square`` job per ``x`` in ``xs``, logging its executions in ``log_dir``."""
    return [Job("sleep-and-square", {"x": x, "seconds": seconds, "log_dir": str(log_dir), **extra}) for x in xs]


def executions(log_dir: Path) -> dict[int, int]:
    """How many times each x of the ``sleep-and-square`` job kind was executed (each execution
    leaves one ``x<N>-*.run`` file in its ``log_dir``): the sweep and lock tests count reruns."""
    counts: dict[int, int] = {}
    for path in log_dir.glob("x*.run"):
        x = int(path.name[1:].split("-")[0])
        counts[x] = counts.get(x, 0) + 1
    return counts
