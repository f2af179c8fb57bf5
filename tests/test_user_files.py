"""Nothing a user owns is overwritten (issue 10): inputs are never outputs, files mergelib did not
write are replaced only with --overwrite, outputs are finite, unreadable files and unwritable
locations are one-line errors, names are checked before any weights are read, a killed merge
leaves the old output or the complete new one, and the next write removes its temporaries."""

from __future__ import annotations

import os
import pickle
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergelib.io import merge_files
from mergelib.io.checkpoints import atomic_write, load_state, read_manifest, remove_stale_temporaries
from mergelib.cli import main
from mergelib.errors import CorruptCheckpointError, OutputRefusedError
from mergelib.io.merge_files import merge_checkpoint_files

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def files(tmp_path):
    g = torch.Generator().manual_seed(0)
    pretrained = {"visual.w": torch.randn(6, 4, generator=g), "visual.b": torch.randn(4, generator=g)}
    save_file(pretrained, tmp_path / "pre.safetensors")
    for i in range(2):
        save_file({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pretrained.items()}, tmp_path / f"e{i}.safetensors")
    return tmp_path


def _merge(folder, output, *extra, pretrained="pre.safetensors", experts=("e0.safetensors", "e1.safetensors")):
    return main(["merge", "--method", "task_arithmetic", "--pretrained", str(folder / pretrained),
                 *(str(folder / e) for e in experts), "-o", str(output), "--device", "cpu", *extra])


def _contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.is_symlink()}


@pytest.fixture()
def no_loading(monkeypatch):
    """Fail the test if merge_files loads any tensor (the refusals must come first)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was loaded before the refusal")
    monkeypatch.setattr(merge_files, "load_file", refuse)


# ------------------------------------------------------------------------- inputs are not outputs

@pytest.mark.parametrize("spelling", ["same", "dotdot", "hardlink", "symlink"])
@pytest.mark.parametrize("victim", ["pre.safetensors", "e1.safetensors"])
def test_an_output_that_is_an_input_is_refused_before_loading(files, capsys, no_loading, spelling, victim):
    if spelling == "same":
        output = files / victim
    elif spelling == "dotdot":
        (files / "sub").mkdir()
        output = files / "sub" / ".." / victim
    elif spelling == "hardlink":
        output = files / "link.safetensors"
        os.link(files / victim, output)
    else:
        output = files / "link.safetensors"
        output.symlink_to(files / victim)
    before = _contents(files)
    assert _merge(files, output) == 2
    err = capsys.readouterr().err
    assert f"is the input {files / victim} (the same file)" in err and "choose another output path" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert _contents(files) == before


def test_import_refuses_its_source_as_destination(files, capsys):
    source = files / "e0.safetensors"
    os.link(source, files / "alias.safetensors")
    before = source.read_bytes()
    for destination in (source, files / "alias.safetensors"):
        assert main(["import", str(source), str(destination), "--backbone", "tiny-clip"]) == 2
        assert "destination" in (err := capsys.readouterr().err) and "is the input" in err
    assert source.read_bytes() == before


# ------------------------------------------------------------------------- files mergelib did not write

def test_the_provenance_never_replaces_an_unrelated_json(files):
    (files / "report.json").write_text('{"mine": 1}\n')
    assert _merge(files, files / "report.safetensors") == 0
    assert (files / "report.json").read_text() == '{"mine": 1}\n'
    assert read_manifest(files / "report.safetensors")["method"] == "task_arithmetic"


def test_a_foreign_output_needs_overwrite_and_mergelibs_own_is_replaced(files, capsys):
    foreign = files / "out.safetensors"
    save_file({"x": torch.zeros(1)}, foreign)
    before = foreign.read_bytes()
    assert _merge(files, foreign) == 2
    err = capsys.readouterr().err
    assert f"{foreign} exists and was not written by mergelib" in err and "--overwrite" in err
    assert foreign.read_bytes() == before
    assert _merge(files, foreign, "--overwrite") == 0
    first = load_state(foreign)[1]
    assert _merge(files, foreign, "--alpha", "0.5") == 0  # mergelib's own earlier output: replaced
    second = load_state(foreign)[1]
    assert second["alpha"] == 0.5 and second["sha256"] != first["sha256"]
    mine = files / "notes.safetensors"  # not even a safetensors file
    mine.write_text("mine")
    with pytest.raises(OutputRefusedError, match="not written by mergelib"):
        merge_checkpoint_files("task_arithmetic", files / "pre.safetensors", [files / "e0.safetensors"], mine)
    assert mine.read_text() == "mine"
    merge_checkpoint_files("task_arithmetic", files / "pre.safetensors", [files / "e0.safetensors"], mine, overwrite=True)
    assert read_manifest(mine)["experts"][0]["file"] == str(files / "e0.safetensors")


def test_import_refuses_a_foreign_destination_without_overwrite(tmp_path, capsys):
    from mergelib.models.importers import expected_visual_shapes

    source = tmp_path / "finetuned.pt"
    torch.save({k: torch.zeros(s) for k, s in expected_visual_shapes("tiny-clip").items()}, source)
    destination = tmp_path / "dst.safetensors"
    destination.write_text("someone's file")
    assert main(["import", str(source), str(destination), "--backbone", "tiny-clip"]) == 2
    assert "was not written by mergelib" in capsys.readouterr().err
    assert destination.read_text() == "someone's file"
    assert main(["import", str(source), str(destination), "--backbone", "tiny-clip", "--overwrite"]) == 0
    assert read_manifest(destination)["kind"] == "imported_checkpoint"


@pytest.mark.parametrize("layout", ["empty", "model folder without tasks"])
def test_import_of_a_folder_without_checkpoints_names_the_folder_and_the_layout(tmp_path, capsys, layout):
    empty = tmp_path / "downloads"
    empty.mkdir()
    if layout != "empty":
        (empty / "tiny-clip" / "MNISTVal").mkdir(parents=True)
    assert main(["import", str(empty), str(tmp_path / "out"), "--backbone", "tiny-clip"]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "{Task}Val/nonlinear_finetuned.pt" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_an_import_of_an_older_mergelib_is_reported_and_redone(tmp_path):
    from mergelib.models.importers import expected_visual_shapes, is_imported, load_imported, load_manifest

    source = tmp_path / "finetuned.pt"
    torch.save({k: torch.zeros(s) for k, s in expected_visual_shapes("tiny-clip").items()}, source)
    old = tmp_path / "old.safetensors"
    save_file({"visual.proj": torch.zeros(1)}, old)
    old.with_suffix(".json").write_text(
        '{"format": 1, "file": "old.safetensors", "sha256": "%s", "kind": "imported_checkpoint"}' % ("0" * 64))
    with pytest.raises(CorruptCheckpointError, match="older mergelib.*old.json"):
        load_imported(old, "tiny-clip")
    with pytest.raises(CorruptCheckpointError, match="older mergelib"):
        load_manifest(old)
    assert not is_imported(old, source, "tiny-clip")
    main(["import", str(source), str(old), "--backbone", "tiny-clip"])  # replaced without --overwrite
    assert is_imported(old, source, "tiny-clip") and not old.with_suffix(".json").exists()


# ------------------------------------------------------------------------- outputs are finite

@pytest.mark.parametrize("alpha", ["inf", "-inf", "nan"])
def test_a_non_finite_alpha_is_refused_up_front(files, capsys, no_loading, alpha):
    assert _merge(files, files / "out.safetensors", f"--alpha={alpha}") == 2
    assert "alpha must be a finite number" in capsys.readouterr().err
    assert not (files / "out.safetensors").exists()


def test_a_float16_sum_that_overflows_is_named_and_nothing_is_written(tmp_path, capsys):
    save_file({"visual.w": torch.full((3,), 60000.0, dtype=torch.float16)}, tmp_path / "pre.safetensors")
    for i in range(2):
        save_file({"visual.w": torch.full((3,), 65000.0, dtype=torch.float16)}, tmp_path / f"e{i}.safetensors")
    assert _merge(tmp_path, tmp_path / "out.safetensors") == 2
    err = capsys.readouterr().err
    # named where the sum is formed (task_vectors.apply_task_vector) or, at the latest, before writing
    assert "'visual.w'" in err and ("not finite" in err or "NaN or Inf" in err) and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e0.safetensors", "e1.safetensors", "pre.safetensors"]


# ------------------------------------------------------------------------- unreadable and unwritable

def _make_unreadable(kind: str, path: Path) -> None:
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("these are not the weights you are looking for\n")
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"visual.w": [1.0, 2.0]}))
    elif kind == "torch-save":
        torch.save({"visual.w": torch.zeros(2)}, path)
    elif kind == "truncated":
        save_file({"visual.w": torch.zeros(64)}, path)
        path.write_bytes(path.read_bytes()[:-16])
    elif kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)


@pytest.mark.parametrize("kind", ["empty", "text", "pickle", "torch-save", "truncated", "directory", "fifo"])
@pytest.mark.parametrize("role", ["pretrained", "expert"])
def test_unreadable_checkpoints_are_one_line_errors(files, capsys, kind, role):
    bad = files / "bad.safetensors"
    _make_unreadable(kind, bad)
    signal.alarm(20)  # a FIFO opened for reading would block: fail instead of hanging
    try:
        if role == "pretrained":
            code = _merge(files, files / "out.safetensors", pretrained="bad.safetensors")
        else:
            code = _merge(files, files / "out.safetensors", experts=("e0.safetensors", "bad.safetensors"))
    finally:
        signal.alarm(0)
    err = capsys.readouterr().err
    assert code == 2 and str(bad) in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (files / "out.safetensors").exists()


@pytest.mark.parametrize("output", ["/proc/mergelib-test.safetensors", "/proc/self/mergelib/x.safetensors",
                                    "/sys/mergelib-test.safetensors"])
def test_an_unwritable_output_location_fails_before_loading(files, capsys, no_loading, output):
    assert _merge(files, Path(output)) == 2
    err = capsys.readouterr().err
    assert f"cannot write {output}" in err and "choose an output in a writable folder" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("arguments, message", [
    (["--method", "nope"], "unknown merge method 'nope'"),
    (["--method", "score", "--param", "kep=1"], "has no parameter"),
    (["--method", "score", "--param", "z=inf"], "z must be"),
])
def test_method_and_parameters_are_checked_before_any_checkpoint_is_loaded(files, capsys, no_loading, arguments, message):
    code = main(["merge", *arguments, "--pretrained", str(files / "pre.safetensors"), str(files / "e0.safetensors"),
                 "-o", str(files / "out.safetensors")])
    assert code == 2 and message in capsys.readouterr().err


# ------------------------------------------------------------------------- temporaries

def test_the_next_write_removes_leftover_temporaries_of_that_target_only(tmp_path, capsys):
    target = tmp_path / "x.csv"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    host = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())
    leftovers = [tmp_path / f".x.csv.mergelib-{host}-{pid}-abcd1234.tmp", tmp_path / ".x.csv.k2j4h5g6.tmp"]
    kept = [tmp_path / f".x.csv.mergelib-{host}-{os.getpid()}-live0000.tmp",  # a running writer (this process)
            tmp_path / f".x.csv.mergelib-otherhost-{pid}-abcd1234.tmp",  # another machine's, recent
            tmp_path / ".x.csv.bak.k2j4h5g6.tmp", tmp_path / ".y.csv.k2j4h5g6.tmp", tmp_path / "x.csv.tmp"]
    for path in leftovers + kept:
        path.write_text("partial")
    atomic_write(target, lambda tmp: tmp.write_text("a,b\n"))
    assert target.read_text() == "a,b\n"
    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in kept)
    err = capsys.readouterr().err
    assert all(f"removed {p}, left by an interrupted write of {target}" in err for p in leftovers)
    assert remove_stale_temporaries(target) == []


def test_a_failed_write_leaves_no_temporary(tmp_path):
    with pytest.raises(OSError, match="No space left"):
        atomic_write(tmp_path / "x.bin", _failing_write)
    assert list(tmp_path.iterdir()) == []


def _failing_write(tmp: Path) -> None:
    tmp.write_bytes(b"half")
    raise OSError(28, "No space left on device")


# ------------------------------------------------------------------------- killed merges

KILLER = """
import os, signal, sys
import mergelib.io.checkpoints as checkpoints
from mergelib.cli import main

where, nth = sys.argv[1], int(sys.argv[2])
calls = [0]

def kill_at(original, after):
    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if calls[0] == nth and after:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return wrapper

if where == "save_file":  # the safetensors writer has written the temporary file
    checkpoints.save_file = kill_at(checkpoints.save_file, after=True)
else:  # before the nth os.fsync / os.replace of the run
    setattr(os, where, kill_at(getattr(os, where), after=False))
sys.exit(main(sys.argv[3:]))
"""


def test_a_merge_killed_at_any_point_of_the_write_leaves_the_old_or_the_new_file(files):
    output = files / "out.safetensors"
    assert _merge(files, output, "--alpha", "0.5") == 0
    old = output.read_bytes()
    arguments = ["merge", "--method", "task_arithmetic", "--pretrained", str(files / "pre.safetensors"),
                 str(files / "e0.safetensors"), str(files / "e1.safetensors"), "-o", str(output), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    def temporaries():
        return [p.name for p in files.iterdir() if p.name.endswith(".tmp")]

    # killed: with the temporary written (unsynced), synced, about to be renamed, just renamed
    left = []
    for where, nth, expected in [("save_file", 1, "old"), ("fsync", 1, "old"), ("replace", 1, "old"), ("fsync", 2, "new")]:
        run = subprocess.run([sys.executable, "-c", KILLER, where, str(nth), *arguments, "--alpha", "0.25"],
                             env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == -signal.SIGKILL, run.stderr
        # each run first removed the temporary of the run killed before it, with a notice
        assert run.stderr.count("left by an interrupted write of") == len(left), (where, run.stderr)
        left = temporaries()
        if expected == "old":
            assert output.read_bytes() == old, where
            assert len(left) == 1 and left[0].startswith(".out.safetensors.mergelib-")
        else:
            state, manifest = load_state(output)  # complete, with its own provenance
            assert manifest["alpha"] == 0.25 and set(state) == {"visual.w", "visual.b"} and left == []
    new = output.read_bytes()
    run = subprocess.run([sys.executable, "-c", KILLER, "replace", "1", *arguments, "--alpha", "0.5"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == -signal.SIGKILL and output.read_bytes() == new and len(temporaries()) == 1
    run = subprocess.run([sys.executable, "-m", "mergelib.cli", *arguments, "--alpha", "0.75"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("left by an interrupted write of") == 1
    assert load_state(output)[1]["alpha"] == 0.75 and temporaries() == []
    assert sorted(p.name for p in files.iterdir()) == ["e0.safetensors", "e1.safetensors", "out.safetensors", "pre.safetensors"]
