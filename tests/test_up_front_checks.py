"""Unknown names (methods, method parameters, datasets, domains, tasks, backbones, executors) and
missing experts are refused before any checkpoint is loaded or any expert fine-tuned, through the
command line and the Python API, and nothing is written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mergelib.experiments.replication as replication
from mergelib.experiments.benchmark_sweeps import dg_sweep, multitask_sweep
from mergelib.cli import main
from mergelib.data.standins import make_dg_standin
from mergelib.errors import ParameterError, ParameterValueError, UnknownNameError
from mergelib.methods import MethodSpec
from mergelib.experiments.replication import (MissingExpertsError, finetune_task_experts, method_specs, prepare_dg_experiment,
                                  replicate_domain_generalization, replicate_multitask, task_names)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root`` with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture()
def nothing_loaded(monkeypatch):
    """Loading a backbone or fine-tuning fails the test: the checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a backbone was loaded or an expert fine-tuned before the names were checked")

    for name in ("create_clip", "finetune_image_encoder", "prepare_dg_experiment"):
        monkeypatch.setattr(replication, name, refuse)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    return make_dg_standin("PACS", tmp_path_factory.mktemp("data"), images_per_class=1)


def test_replicate_dg_refuses_a_misspelt_method_parameter_in_a_subprocess_before_any_work(tmp_path):
    checkpoints, results = tmp_path / "ckpt", tmp_path / "results"
    checkpoints.mkdir()
    run = subprocess.run([str(Path(sys.executable).with_name("mergelib")), "replicate-dg", "--backbone", "tiny-clip",
                          "--datasets", "PACS", "--data-root", str(tmp_path / "no-data"), "--checkpoint-dir", str(checkpoints),
                          "--results-dir", str(results), "--methods", "task_arithmetic", "score[zz=1]"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert "has no parameter(s) ['zz']; valid parameters:" in run.stderr
    assert list(checkpoints.iterdir()) == [] and not results.exists()


@pytest.mark.parametrize("arguments, message", [
    (["--methods", "score[zz=1]"], "has no parameter(s) ['zz']; valid parameters:"),
    (["--methods", "scor"], "unknown merge method 'scor'; valid merge method names:"),
    (["--datasets", "PACS", "Pacs"], "unknown DG dataset 'Pacs'; valid DG dataset names:"),
    (["--backbone", "ViT-B-33"], "unknown backbone 'ViT-B-33'; valid backbone names:"),
])
def test_replicate_dg_checks_every_name_before_the_first_dataset_runs(pacs, tmp_path, capsys, nothing_loaded,
                                                                     arguments, message):
    checkpoints, results = tmp_path / "ckpt", tmp_path / "results"
    checkpoints.mkdir()
    data = snapshot(pacs)
    base = {"--backbone": "tiny-clip", "--datasets": "PACS"}
    argv = ["replicate-dg", "--data-root", str(pacs), "--checkpoint-dir", str(checkpoints), "--results-dir", str(results),
            "--weights", "random"]
    for flag, value in base.items():
        if flag not in arguments:
            argv += [flag, value]
    assert main([*argv, *arguments]) == 2
    assert message in capsys.readouterr().err
    assert list(checkpoints.iterdir()) == [] and not results.exists() and snapshot(pacs) == data


def test_replicate_multitask_names_an_unknown_task_and_the_valid_ones(tmp_path, capsys, nothing_loaded):
    experts = tmp_path / "experts"
    experts.mkdir()
    for extra in ([], ["--finetune"]):
        assert main(["replicate-multitask", "--backbone", "ViT-B-32", "--tasks", "MNIST", "Mnist", "--data-root",
                     str(tmp_path / "data"), "--experts-dir", str(experts), "--results-dir", str(tmp_path / "r"), *extra]) == 2
        err = capsys.readouterr().err
        assert "unknown task 'Mnist'; valid task names:" in err and "MNIST" in err and "SUN397" in err
    assert list(experts.iterdir()) == [] and not (tmp_path / "r").exists()


def test_replicate_multitask_names_the_missing_experts_and_how_to_get_them_before_loading_the_backbone(
        tmp_path, capsys, nothing_loaded):
    experts = tmp_path / "experts"
    (experts / "ViT-B-32").mkdir(parents=True)
    save_file({"visual.w": torch.zeros(2)}, experts / "ViT-B-32" / "MNIST.safetensors")
    before = snapshot(experts)
    assert main(["replicate-multitask", "--backbone", "ViT-B-32", "--tasks", "MNIST", "DTD", "GTSRB", "--data-root",
                 str(tmp_path / "data"), "--experts-dir", str(experts), "--results-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"no experts for 2 of the 3 tasks in {experts / 'ViT-B-32'}: DTD, GTSRB" in err
    assert f"mergelib import <folder of checkpoints> {experts} --backbone ViT-B-32" in err and "--finetune" in err
    assert snapshot(experts) == before and not (tmp_path / "r").exists()


def test_replicate_multitask_refuses_a_misspelt_method_before_fine_tuning(tmp_path, capsys, nothing_loaded):
    assert main(["replicate-multitask", "--backbone", "ViT-B-32", "--tasks", "MNIST", "--data-root", str(tmp_path),
                 "--experts-dir", str(tmp_path / "experts"), "--finetune", "--methods", "esm[levels=2]"]) == 2
    assert "has no parameter(s) ['levels']" in capsys.readouterr().err
    assert not (tmp_path / "experts").exists()


def test_sweep_on_slurm_without_sbatch_says_so_at_once(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no sbatch here
    checkpoints = tmp_path / "ckpt"
    for setting in (["dg", "--datasets", "PACS", "--checkpoint-dir", str(checkpoints)],
                    ["multitask", "--tasks", "MNIST", "--experts-dir", str(checkpoints), "--finetune"]):
        assert main(["sweep", *setting, "--backbones", "tiny-clip", "--data-root", str(tmp_path / "data"),
                     "--executor", "slurm"]) == 2
        err = capsys.readouterr().err
        assert "executor 'slurm' needs SLURM, but `sbatch` is not on PATH on this machine" in err
        assert "--executor local" in err
    assert not checkpoints.exists()


@pytest.mark.parametrize("setting, message", [
    (["dg", "--datasets", "PACS", "--methods", "score[zz=1]"], "has no parameter(s) ['zz']"),
    (["dg", "--datasets", "PACS", "--domains", "PACS=photo,cubism"], "PACS has no domains ['cubism']"),
    (["dg", "--datasets", "PACS", "--domains", "OfficeHome=Art,Clipart"], "domains are given for ['OfficeHome']"),
    (["multitask", "--tasks", "MNIST", "Nope", "--finetune"], "unknown task 'Nope'; valid task names:"),
    (["multitask", "--tasks", "MNIST"], "no experts for 1 of the 1 tasks"),
])
def test_sweep_checks_names_and_experts_before_planning(tmp_path, capsys, setting, message):
    folder = tmp_path / "work"
    assert main(["sweep", *setting, "--checkpoint-dir" if setting[0] == "dg" else "--experts-dir", str(folder),
                 "--backbones", "tiny-clip", "--data-root", str(tmp_path / "data"), "--executor", "inline"]) == 2
    assert message in capsys.readouterr().err
    assert not folder.exists()


# ------------------------------------------------------------------------------- the Python API

def test_run_domain_generalization_checks_methods_before_loading_anything(pacs, tmp_path, nothing_loaded):
    with pytest.raises(ParameterError, match=r"has no parameter\(s\) \['zz'\]"):
        replicate_domain_generalization("tiny-clip", "PACS", data_root=pacs, checkpoint_dir=tmp_path / "ckpt",
                                  results_dir=tmp_path / "r", methods=["task_arithmetic", "score[zz=1]"], weights=None)
    with pytest.raises(ParameterValueError, match="PACS has no domains"):
        replicate_domain_generalization("tiny-clip", "PACS", data_root=pacs, checkpoint_dir=tmp_path / "ckpt",
                                  results_dir=tmp_path / "r", domains=["photo", "cubism"])
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "r").exists()


def test_prepare_dg_experiment_checks_the_backbone_before_reading_the_data(tmp_path, monkeypatch):
    monkeypatch.setattr(replication, "create_clip", lambda *a, **k: pytest.fail("backbone loaded"))
    with pytest.raises(UnknownNameError, match="unknown backbone 'ViT-B-33'"):
        prepare_dg_experiment("ViT-B-33", "PACS", data_root=tmp_path / "no-data", checkpoint_dir=tmp_path)
    with pytest.raises(ParameterValueError, match="precision must be one of fp32, bf16, fp16"):
        prepare_dg_experiment("tiny-clip", "PACS", data_root=tmp_path / "no-data", checkpoint_dir=tmp_path, precision="fp8")


def test_run_multitask_and_finetune_task_experts_check_before_loading_the_backbone(tmp_path, nothing_loaded):
    common = dict(data_root=tmp_path / "data", experts_dir=tmp_path / "experts")
    with pytest.raises(UnknownNameError, match="unknown task 'Mnist'"):
        replicate_multitask("tiny-clip", ["MNIST", "Mnist"], results_dir=tmp_path / "r", **common)
    with pytest.raises(MissingExpertsError, match="no experts for 2 of the 2 tasks .*: MNIST, DTD"):
        replicate_multitask("tiny-clip", ["MNIST", "DTD"], results_dir=tmp_path / "r", **common)
    with pytest.raises(ParameterError, match=r"has no parameter\(s\) \['zz'\]"):
        replicate_multitask("tiny-clip", ["MNIST"], results_dir=tmp_path / "r", methods=["score[zz=1]"], **common)
    with pytest.raises(UnknownNameError, match="unknown task 'Mnist'"):
        finetune_task_experts("tiny-clip", ["Mnist"], **common)
    with pytest.raises(ParameterValueError, match=r"unknown options \['lr'\] for finetune_task_experts"):
        finetune_task_experts("tiny-clip", ["MNIST"], lr=1e-3, **common)
    assert not (tmp_path / "experts").exists() and not (tmp_path / "r").exists()


def test_sweeps_check_names_before_planning(tmp_path):
    paths = dict(data_root=tmp_path, results_dir=tmp_path / "r")
    with pytest.raises(ParameterError, match=r"has no parameter\(s\) \['zz'\]"):
        dg_sweep(["tiny-clip"], ["PACS"], checkpoint_dir=tmp_path, methods=["score[zz=1]"], **paths)
    with pytest.raises(UnknownNameError, match="unknown backbone 'ViT-B-33'"):
        dg_sweep(["ViT-B-33"], ["PACS"], checkpoint_dir=tmp_path, **paths)
    with pytest.raises(UnknownNameError, match="unknown backbone 'ViT-B-33'"):
        multitask_sweep(["ViT-B-33"], ["MNIST"], experts_dir=tmp_path, **paths)
    with pytest.raises(MissingExpertsError, match="no experts for 1 of the 1 tasks"):
        multitask_sweep(["tiny-clip"], ["MNIST"], experts_dir=tmp_path, finetune=False, **paths)
    jobs = dg_sweep("tiny-clip", "PACS", checkpoint_dir=tmp_path, methods="score", **paths)  # one name, not letters
    assert {tuple(j.params["methods"]) for j in jobs if j.kind == "dg-fold"} == {("score",)}


def test_a_single_name_is_one_method_or_task_and_a_suite_size_its_tasks():
    assert [s.label for s in method_specs("score[keep=diagonal]")] == ["score[keep=diagonal]"]
    with pytest.raises(ParameterError, match=r"has no parameter\(s\) \['zz'\]"):
        method_specs([MethodSpec("mine", "score", {"zz": 1})])  # built in Python: checked like a parsed one
    with pytest.raises(ParameterValueError, match="keep"):
        method_specs([MethodSpec("mine", "score", {"keep": "everything"})])
    from mergelib.data.task_suites import SUITES

    assert task_names("MNIST") == ["MNIST"] and task_names(["8"]) == task_names("8") == list(SUITES[8])
    assert task_names(14) == list(SUITES[14])
