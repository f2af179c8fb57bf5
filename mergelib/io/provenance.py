"""Provenance of results (git commit, versions, parameters, seeds, timings) and stage timing."""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

REPO_ROOT = Path(__file__).resolve().parents[2]


def git_state(repo: Path = REPO_ROOT) -> dict[str, Any]:
    """The commit of ``repo`` and whether its tracked files have uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """SHA-256 of mergelib's source files (``*.py`` and the shipped model configs).

    Part of the key of every cached *result* (not of checkpoints, whose keys name everything that
    determines them): any change to the code invalidates cached evaluations.
    """
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted([*package.rglob("*.py"), *package.rglob("*.json")]):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0], "platform": platform.platform()}
    for package in ("mergelib", "torch", "open_clip_torch", "numpy", "safetensors"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def provenance(parameters: dict[str, Any], *, git: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """The provenance record of a result.

    ``git``: the repository state when the run *started* (take it with :func:`git_state` before
    the work; a long run may otherwise record a commit made while it ran). Default: now.
    """
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git": git or git_state(),
        "versions": versions(),
        "parameters": parameters,
        **extra,
    }


class StageTimer:
    """Times named stages and prints each one as it ends (``[mergelib] stage: 1.2 s``)."""

    def __init__(self, verbose: bool = True):
        self.seconds: dict[str, float] = {}
        self.verbose = verbose

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
            if self.verbose:
                # stderr: shown on the console (papermill streams it), left out of the book's pages
                print(f"[mergelib] {name}: {elapsed:.1f} s", file=sys.stderr, flush=True)

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as JSON atomically (an interrupted run leaves the old file or none)."""
    from mergelib.io.checkpoints import atomic_write

    text = json.dumps(payload, indent=2, sort_keys=True, default=str)
    atomic_write(Path(path), lambda tmp: tmp.write_text(text))
