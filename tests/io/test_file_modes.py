"""Issue 15: every file mergelib writes through atomic_write ends with the mode an ordinary new
file gets under the umask (0666 & ~umask), not mkstemp's 0600."""

from __future__ import annotations

import os
import stat

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from mergelib.io.checkpoints import cached_tables, new_file_mode, save_state
from mergelib.io.merge_files import merge_checkpoint_files
from mergelib.io.provenance import write_json
from mergelib.experiments.sweep import Job, execute_job
import sweep_jobs  # noqa: F401 (registers the job kind sleep-and-square)


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_file_mode_follows_the_umask(umask):
    assert new_file_mode() == 0o666 & ~umask
    assert os.umask(umask) == umask  # reading it left the process's umask as it was


def test_every_kind_of_written_file_gets_the_umask_mode(tmp_path, umask):
    expected = 0o666 & ~umask
    written = []

    checkpoint = tmp_path / "ckpt" / "expert.safetensors"
    save_state(checkpoint, {"w": torch.ones(3)}, {"key": "k"})
    written.append(checkpoint)

    save_file({"w": torch.zeros(3)}, tmp_path / "pre.safetensors")
    save_file({"w": torch.ones(3)}, tmp_path / "e.safetensors")
    merged = tmp_path / "merged.safetensors"
    merge_checkpoint_files("task_arithmetic", tmp_path / "pre.safetensors", [tmp_path / "e.safetensors"], merged, device="cpu")
    written.append(merged)

    cached_tables(tmp_path / "tables", {"k": 1}, lambda: (pd.DataFrame({"a": [1, 2]}),))
    written.extend((tmp_path / "tables").iterdir())  # the CSV and its index JSON

    write_json(tmp_path / "provenance.json", {"a": 1})
    written.append(tmp_path / "provenance.json")

    record = execute_job(Job("sleep-and-square", {"x": 3, "seconds": 0}), tmp_path / "sweep")
    assert record["outputs"] == {"square": 9}
    records = [p for p in (tmp_path / "sweep").rglob("*.json")]
    assert records
    written.extend(records)

    assert {p.name: oct(_mode(p)) for p in written} == {p.name: oct(expected) for p in written}
