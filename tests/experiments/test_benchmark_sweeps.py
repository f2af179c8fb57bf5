"""The benchmarks as sweeps: the same experts and numbers as the one-process runs, resumable.

Everything runs the tiny backbone on generated stand-in folders (the real datasets and backbones
are not available here); the code path is the one of the real benchmarks.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from mergelib.models.backbones import create_clip
from mergelib.io.checkpoints import load_state, save_state
from mergelib.experiments.benchmark_sweeps import dg_sweep, multitask_sweep
from mergelib.cli import main
from mergelib.data.standins import TASK_STANDINS, make_dg_standin, make_task_standin
from mergelib.data.task_suites import load_task
from mergelib.errors import ParameterValueError
from mergelib.models.importers import CheckpointMismatchError
from mergelib.experiments.replication import finetune_task_experts, replicate_domain_generalization, replicate_multitask
from mergelib.experiments.sweep import run_sweep, sweep_status

logging.getLogger().setLevel(logging.ERROR)
DOMAINS = {"PACS": ["art_painting", "photo", "sketch"]}
DG_METHODS = ["task_arithmetic", "score", "esm"]
RECIPE = {"device": "cpu", "epochs": 1, "num_workers": 0, "batch_size": 8,
          "finetune_overrides": {"lr": 1e-4, "warmup_steps": 1}}


def _store(root, backbone="tiny-clip", setting="domain_generalization", name="PACS"):
    folder = root / backbone / setting / name
    return {p.name: pd.read_csv(p) for p in sorted(folder.glob("*.csv"))}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweeps")
    torch.manual_seed(0)
    weights = tmp / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in create_clip("tiny-clip", weights=None).model.state_dict().items()}, str(weights))
    return tmp, weights


@pytest.fixture(scope="module")
def dg(tiny):
    """The same experiment run directly and as an inline sweep, each with its own experts."""
    tmp, weights = tiny
    root = make_dg_standin("PACS", tmp / "data", images_per_class=2, domains=DOMAINS["PACS"])
    direct, _ = replicate_domain_generalization(
        "tiny-clip", "PACS", data_root=root, checkpoint_dir=tmp / "ckpt-direct", results_dir=tmp / "direct",
        methods=DG_METHODS, domains=DOMAINS["PACS"], weights=weights, esm_proxy_count=4, progress=False, **RECIPE)
    jobs = dg_sweep(["tiny-clip"], ["PACS"], data_root=root, checkpoint_dir=tmp / "ckpt-sweep", results_dir=tmp / "swept",
                    methods=DG_METHODS, domains=DOMAINS, weights=weights, esm_proxy_count=4, **RECIPE)
    report = run_sweep(jobs, tmp / "sweep", executor="inline")
    return tmp, root, weights, direct, jobs, report


def test_dg_sweep_plans_finetunes_then_folds_then_the_store(dg):
    *_, jobs, report = dg
    kinds = [job.kind for job in jobs]
    assert kinds == ["dg-finetune"] * 3 + ["dg-fold"] * 3 + ["dg-collect"]
    finetunes = {job.id for job in jobs if job.kind == "dg-finetune"}
    folds = [job for job in jobs if job.kind == "dg-fold"]
    assert all(set(job.after) == finetunes for job in folds)
    assert [job.params["held_out"] for job in folds] == ["art_painting", "photo", "sketch"]
    assert set(jobs[-1].after) == finetunes | {job.id for job in folds}
    assert report.ok and len(report.completed) == len(jobs)


def test_dg_sweep_gives_the_same_experts_and_store_as_the_direct_run(dg):
    tmp, *_ = dg
    for domain in DOMAINS["PACS"]:
        direct = load_state(tmp / "ckpt-direct/tiny-clip/domain_generalization/PACS" / f"{domain}.safetensors")[1]
        swept = load_state(tmp / "ckpt-sweep/tiny-clip/domain_generalization/PACS" / f"{domain}.safetensors")[1]
        assert direct["sha256"] == swept["sha256"]  # fine-tuning is deterministic and the recipes are the same
    direct, swept = _store(tmp / "direct"), _store(tmp / "swept")
    assert sorted(direct) == sorted(swept) and "matrix.csv" in direct and "score.csv" in direct
    for name in direct:
        pd.testing.assert_frame_equal(direct[name], swept[name])
    record = json.loads((tmp / "swept/tiny-clip/domain_generalization/PACS/provenance.json").read_text())
    assert record["parameters"]["method_params"]["score"]["divide_by_tasks"] is True
    assert set(record["experts"]) == set(DOMAINS["PACS"])


def test_a_fold_is_one_third_of_the_direct_results(dg):
    tmp, _, _, direct, jobs, _ = dg
    fold = next(job for job in jobs if job.kind == "dg-fold" and job.params["held_out"] == "photo")
    record = json.loads(fold.record_path(tmp / "sweep").read_text())
    rows = pd.read_csv(record["outputs"]["results"])
    expected = direct[direct["held_out"] == "photo"].reset_index(drop=True)
    pd.testing.assert_frame_equal(rows, expected, check_dtype=False)
    assert record["outputs"]["value"]["score"] == pytest.approx(float(expected.set_index("method").loc["score", "value"]))


def test_a_resumed_sweep_reruns_only_what_is_missing(dg, monkeypatch):
    tmp, root, weights, _, jobs, _ = dg
    fold = next(job for job in jobs if job.kind == "dg-fold" and job.params["held_out"] == "sketch")
    collect = jobs[-1]
    before = {job.id: job.record_path(tmp / "sweep").read_bytes() for job in jobs}
    for job in (fold, collect):
        job.record_path(tmp / "sweep").unlink()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished expert was fine-tuned again")

    monkeypatch.setattr("mergelib.experiments.replication.finetune_image_encoder", no_training)
    report = run_sweep(jobs, tmp / "sweep", executor="inline")
    assert sorted(report.completed) == sorted([fold.id, collect.id])
    assert len(report.skipped) == len(jobs) - 2
    for job in jobs:
        if job.id not in (fold.id, collect.id):
            assert job.record_path(tmp / "sweep").read_bytes() == before[job.id]  # untouched
    pd.testing.assert_frame_equal(_store(tmp / "swept")["score.csv"], _store(tmp / "direct")["score.csv"])


def test_the_cli_runs_a_sweep_and_reports_every_job_done(dg, capsys):
    tmp, root, weights, *_ = dg
    arguments = ["sweep", "dg", "--backbones", "tiny-clip", "--datasets", "PACS", "--data-root", str(root),
                 "--domains", "PACS=art_painting,photo,sketch", "--checkpoint-dir", str(tmp / "ckpt-cli"),
                 "--results-dir", str(tmp / "cli-results"), "--sweep-dir", str(tmp / "cli-sweep"),
                 "--methods", "task_arithmetic", "--weights", str(weights), "--device", "cpu", "--epochs", "1",
                 "--batch-size", "8", "--workers", "0"]
    assert main([*arguments, "--status"]) == 0
    assert capsys.readouterr().out.count("pending") == 3 + 3 + 1  # nothing recorded yet
    assert main([*arguments, "--executor", "inline"]) == 0
    capsys.readouterr()
    assert main([*arguments, "--status"]) == 0
    out = capsys.readouterr().out
    assert out.count(" done ") == 7 and "pending" not in out
    stored = _store(tmp / "cli-results")["task_arithmetic.csv"]
    assert sorted(stored["held_out"]) == DOMAINS["PACS"]
    assert main([*arguments, "--domains", "PACS"]) == 2  # a malformed --domains is a clear error, not a traceback
    assert "DATASET=domain" in capsys.readouterr().err


def test_dg_sweep_rejects_unknown_domains_and_options(tmp_path):
    with pytest.raises(ParameterValueError, match="no domains"):
        dg_sweep(["tiny-clip"], ["PACS"], data_root=tmp_path, checkpoint_dir=tmp_path, results_dir=tmp_path,
                 domains={"PACS": ["photo", "clipart"]})
    with pytest.raises(ParameterValueError, match="unknown options"):
        dg_sweep(["tiny-clip"], ["PACS"], data_root=tmp_path, checkpoint_dir=tmp_path, results_dir=tmp_path, lr=1e-3)


# ------------------------------------------------------------- killed on the local executor

KILLED_SWEEP = textwrap.dedent("""
    import sys, torch
    from mergelib.experiments.benchmark_sweeps import dg_sweep
    from mergelib.experiments.sweep import run_sweep
    data, ckpt, results, sweep, weights = sys.argv[1:6]
    recipe = dict(device="cpu", epochs=1, num_workers=0, batch_size=8, finetune_overrides={"lr": 1e-4, "warmup_steps": 1})
    jobs = dg_sweep(["tiny-clip"], ["PACS"], data_root=data, checkpoint_dir=ckpt, results_dir=results,
                    methods=["task_arithmetic"], domains={"PACS": ["art_painting", "photo", "sketch"]}, weights=weights, **recipe)
    run_sweep(jobs, sweep, executor="local", max_parallel=1)
""")


def test_a_local_sweep_killed_after_a_finetune_resumes_without_redoing_it(dg):
    tmp, root, weights, *_ = dg
    paths = [str(root), str(tmp / "ckpt-killed"), str(tmp / "killed-results"), str(tmp / "killed-sweep"), str(weights)]
    script = tmp / "killed_sweep.py"
    script.write_text(KILLED_SWEEP)
    sweep = subprocess.Popen([sys.executable, str(script), *paths], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = tmp / "killed-sweep" / "dg-finetune"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not list(records.glob("*.json")):
            time.sleep(0.2)
    finally:
        os.killpg(sweep.pid, signal.SIGKILL)  # the sweep, its submitit controllers and workers
        sweep.wait()
    finished = sorted(records.glob("*.json"))
    assert 1 <= len(finished) < 3, "the kill should come after the first expert and before the last"
    kept = {p.name: p.read_bytes() for p in finished}
    experts = {p.name: p.stat().st_mtime_ns for p in (tmp / "ckpt-killed").rglob("*.safetensors")}

    jobs = dg_sweep(["tiny-clip"], ["PACS"], data_root=root, checkpoint_dir=tmp / "ckpt-killed",
                    results_dir=tmp / "killed-results", methods=["task_arithmetic"], domains=DOMAINS, weights=weights, **RECIPE)
    report = run_sweep(jobs, tmp / "killed-sweep", executor="inline")
    assert report.ok and len(report.skipped) >= len(finished)
    assert all(path.read_bytes() == kept[path.name] for path in finished)  # finished records untouched
    after = {p.name: p.stat().st_mtime_ns for p in (tmp / "ckpt-killed").rglob("*.safetensors")}
    assert all(after[name] == mtime for name, mtime in experts.items())  # no expert written twice
    assert (sweep_status(jobs, tmp / "killed-sweep")["state"] == "done").all()
    pd.testing.assert_frame_equal(_store(tmp / "killed-results")["task_arithmetic.csv"],
                                  _store(tmp / "direct")["task_arithmetic.csv"])


# ----------------------------------------------------------------------------- multi-task

MT_TASKS = ["MNIST", "DTD"]
MT_RECIPE = {"epochs": 2, "batch_size": 8, "num_workers": 0, "finetune_overrides": {"lr": 1e-3, "warmup_steps": 1}}


@pytest.fixture(scope="module")
def multitask(tiny):
    tmp, weights = tiny
    data = tmp / "task-data"
    for task in MT_TASKS:
        make_task_standin(task, data, images_per_class=10, n_classes=4)
    evaluation = {"weights": weights, "device": "cpu", "num_workers": 0, "normalize_with": "experts"}
    manifests = finetune_task_experts("tiny-clip", MT_TASKS, data_root=data, experts_dir=tmp / "experts-direct",
                                      weights=weights, device="cpu", progress=False, **MT_RECIPE)
    direct = replicate_multitask("tiny-clip", MT_TASKS, data_root=data, experts_dir=tmp / "experts-direct",
                           results_dir=tmp / "mt-direct", methods=["task_arithmetic", "weight_average"], progress=False, **evaluation)
    jobs = multitask_sweep(["tiny-clip"], MT_TASKS, data_root=data, experts_dir=tmp / "experts-sweep",
                           results_dir=tmp / "mt-swept", methods=["task_arithmetic", "weight_average"], finetune=True,
                           weights=weights, device="cpu", num_workers=0, normalize_with="experts", **{
                               k: v for k, v in MT_RECIPE.items() if k != "num_workers"})
    report = run_sweep(jobs, tmp / "mt-sweep", executor="inline")
    return tmp, data, weights, manifests, direct, jobs, report


def test_multitask_sweep_fine_tunes_each_task_then_merges_each_method(multitask):
    *_, jobs, report = multitask
    assert [job.kind for job in jobs] == ["mt-finetune"] * 2 + ["mt-merge"] * 2
    finetunes = {job.id for job in jobs if job.kind == "mt-finetune"}
    assert all(set(job.after) == finetunes for job in jobs if job.kind == "mt-merge")
    assert report.ok


def test_multitask_sweep_matches_the_direct_run(multitask):
    tmp, _, _, manifests, direct, jobs, _ = multitask
    for task in MT_TASKS:
        swept = load_state(tmp / "experts-sweep" / "tiny-clip" / f"{task}.safetensors")[1]
        # the same tensors (the files differ in their headers' provenance: creation time)
        assert swept["data_sha256"] == manifests[task]["data_sha256"] and swept["kind"] == "finetuned_task_expert"
        assert swept["hyperparameters"]["epochs"] == 2 and swept["hyperparameters"]["lr"] == 1e-3
    a, b = _store(tmp / "mt-direct", setting="multitask", name="2-tasks"), _store(tmp / "mt-swept", setting="multitask", name="2-tasks")
    assert sorted(a) == sorted(b) == ["task_arithmetic.csv", "weight_average.csv", "zero-shot.csv"]
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name])
    folder = tmp / "mt-swept" / "tiny-clip" / "multitask" / "2-tasks"
    assert {p.name for p in folder.glob("*.provenance.json")} == {"task_arithmetic.provenance.json", "weight_average.provenance.json"}
    record = json.loads(next(job for job in jobs if job.kind == "mt-merge").record_path(tmp / "mt-sweep").read_text())
    test = a["task_arithmetic.csv"].query("split == 'test'")
    assert record["outputs"]["absolute"] == pytest.approx(test["accuracy"].mean())


def test_task_experts_train_on_the_tall_training_part_with_the_released_epochs(multitask):
    tmp, data, _, manifests, *_ = multitask
    for task in MT_TASKS:
        assert manifests[task]["n_train"] == len(load_task(task, data, "train").dataset)
        assert manifests[task]["n_train"] + len(load_task(task, data, "val").dataset) == 40
    from mergelib.data.task_suites import TASKS

    jobs = multitask_sweep(["ViT-B-32"], 8, data_root=data, experts_dir=tmp, results_dir=tmp, finetune=True)
    finetunes = [job for job in jobs if job.kind == "mt-finetune"]
    assert [job.params["task"] for job in finetunes] == list(TASKS)[:8]
    assert all("epochs" not in job.params for job in finetunes)  # each task's released epochs apply


def test_experts_from_other_pretrained_weights_and_imported_files_are_refused(multitask, tmp_path):
    tmp, data, weights, *_ = multitask
    with pytest.raises(CheckpointMismatchError, match="other pretrained weights"):
        replicate_multitask("tiny-clip", MT_TASKS, data_root=data, experts_dir=tmp / "experts-direct", results_dir=tmp_path,
                      methods=["task_arithmetic"], weights=None, device="cpu", num_workers=0,
                      normalize_with="experts", progress=False)
    imported = tmp_path / "experts" / "tiny-clip"
    imported.mkdir(parents=True)
    save_state(imported / "MNIST.safetensors", {"visual.proj": torch.zeros(1)}, {"kind": "imported_checkpoint"})
    with pytest.raises(FileExistsError, match="imported checkpoint"):
        finetune_task_experts("tiny-clip", ["MNIST"], data_root=data, experts_dir=tmp_path / "experts", weights=weights,
                              device="cpu", progress=False, **MT_RECIPE)


# ----------------------------------------------------------------------------- stand-ins

@pytest.mark.parametrize("task", TASK_STANDINS)
def test_task_standins_are_read_by_the_registry_with_balanced_labels(task, tmp_path):
    make_task_standin(task, tmp_path, images_per_class=3, n_classes=4)
    classes = {"EuroSAT": 10, "RESISC45": 45}.get(task, 4)
    test = load_task(task, tmp_path, "test")
    labels = [int(test.dataset[i][1]) for i in range(len(test.dataset))]
    assert sorted(labels) == sorted(list(range(classes)) * 3)
    train, val = load_task(task, tmp_path, "train").dataset, load_task(task, tmp_path, "val").dataset
    if task == "EuroSAT":  # its own val folder
        assert len(train) == len(val) == 30
    else:  # the TALL split of the written train images
        assert len(train) + len(val) == 3 * classes and len(val) == int(0.1 * 3 * classes)
    image = test.dataset[0][0]
    assert image.size in ((32, 32), (28, 28))


def test_standins_are_deterministic_and_refuse_checksummed_tasks(tmp_path):
    first = make_task_standin("GTSRB", tmp_path / "a", images_per_class=2, n_classes=3)
    second = make_task_standin("GTSRB", tmp_path / "b", images_per_class=2, n_classes=3)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files and all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    with pytest.raises(ParameterValueError, match="MD5"):
        make_task_standin("SVHN", tmp_path)
    with pytest.raises(ParameterValueError, match="at most 10"):
        make_task_standin("MNIST", tmp_path, n_classes=11)
