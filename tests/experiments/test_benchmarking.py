"""Fine-tuning throughput (mergelib.experiments.benchmarking and benchmarks/finetune_throughput.py) on the CPU,
and the arguments that benchmarks/gpu_checks.sh passes to the benchmark scripts.

No timing thresholds: the tests check what is counted, that optimizer steps really happen, that
the figures are well formed, and that bad arguments fail early with a clear message.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import re
import shlex
import subprocess

import pytest
import torch

from mergelib.experiments import benchmarking
from mergelib.models.backbones import create_clip
from mergelib.experiments.benchmarking import CPU_MEMORY_NOTE, finetune_throughput
from mergelib.errors import ParameterValueError, UnknownNameError
from mergelib.models.finetune import FinetuneConfig, TrainingStep
from mergelib.io.provenance import REPO_ROOT

FAST = FinetuneConfig(lr=1e-3, warmup_steps=1)  # a large enough step that every weight moves


class CountingStep(TrainingStep):
    """TrainingStep that counts what it is fed, and keeps its encoder for inspection."""

    made: list["CountingStep"] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.micro_batches, self.images = 0, 0, 0
        CountingStep.made.append(self)

    def __call__(self, micro_batches):
        def counted():
            for inputs, labels in micro_batches:
                assert inputs.shape[0] == labels.shape[0]
                self.micro_batches += 1
                self.images += inputs.shape[0]
                yield inputs, labels

        self.calls += 1
        return super().__call__(counted())


@pytest.fixture
def counting(monkeypatch):
    CountingStep.made = []
    monkeypatch.setattr(benchmarking, "TrainingStep", CountingStep)
    return CountingStep.made


@pytest.fixture(scope="module")
def random_tiny():
    torch.manual_seed(0)
    return create_clip("tiny-clip", weights=None)


def test_counts_images_and_steps_and_trains(counting, random_tiny):
    pristine = copy.deepcopy(random_tiny.model.visual.state_dict())
    result = finetune_throughput("tiny-clip", batch_size=6, steps=3, warmup=2, device="cpu", config=FAST, clip=random_tiny)
    (step,) = counting
    assert step.calls == 5 and step.micro_batches == 5 and step.images == 5 * 6  # warm-up steps ran, untimed
    assert result["steps"] == 3 and result["images"] == 3 * 6 and result["warmup_steps_untimed"] == 2
    assert len(result["step_seconds"]) == 3 and len(result["losses"]) == 5
    assert step.scheduler.last_epoch == 5  # the schedule advanced once per optimizer step
    # an optimizer step happened: every parameter of the trained copy moved, the given model did not
    trained = step.encoder.state_dict()
    assert all(not torch.equal(trained[k], pristine[k]) for k, _ in step.encoder.named_parameters())
    assert all(torch.equal(v, pristine[k]) for k, v in random_tiny.model.visual.state_dict().items())
    assert result["parameters_changed"] == result["parameter_tensors"] > 0
    assert result["parameter_relative_change"] > 0
    for key in ("seconds", "images_per_second", "seconds_per_step", "seconds_per_step_median", *result["step_seconds"]):
        value = result[key] if isinstance(key, str) else key
        assert math.isfinite(value) and value > 0, key
    assert result["images_per_second"] == pytest.approx(result["images"] / result["seconds"])
    assert all(math.isfinite(loss) for loss in result["losses"])
    assert result["peak_memory_bytes"] is None and result["peak_memory_note"] == CPU_MEMORY_NOTE
    assert result["backbone"] == "tiny-clip" and result["device"] == "cpu" and result["device_description"]
    assert result["config"]["batch_size"] == 6 and result["config"]["precision"] == "fp32"


def test_accumulation_counts_every_micro_batch(counting, random_tiny):
    config = FinetuneConfig(lr=1e-3, warmup_steps=1, accumulation_steps=2)
    result = finetune_throughput("tiny-clip", batch_size=4, steps=2, warmup=0, device="cpu", config=config,
                                 clip=random_tiny)
    (step,) = counting
    assert step.calls == 2 and step.micro_batches == 4 and step.images == 16
    assert result["images"] == 16 and result["accumulation_steps"] == 2


def test_builds_the_backbone_itself_and_trains_in_bf16(counting):
    result = finetune_throughput("tiny-clip", batch_size=4, precision="bf16", steps=1, warmup=1, device="cpu", config=FAST)
    assert result["precision"] == "bf16" and result["images"] == 4 and result["image_size"] == 32
    assert result["parameter_relative_change"] > 0 and math.isfinite(result["images_per_second"])
    assert counting[0].encoder.conv1.weight.dtype == torch.float32  # autocast: the weights stay fp32


@pytest.mark.parametrize("kwargs, message", [
    ({"precision": "fp8"}, "precision must be one of fp32, bf16, fp16"),
    ({"backbone": "ViT-H-99"}, "unknown backbone 'ViT-H-99'; valid backbone names: ViT-B-16"),
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"warmup": -1}, "warmup must be an integer >= 0"),
    ({"device": "tpu-ish"}, "device 'tpu-ish' is not a device name; valid on this machine"),
])
def test_bad_arguments_fail_early_with_a_clear_message(kwargs, message, monkeypatch):
    monkeypatch.setattr(benchmarking, "create_clip", lambda *a, **k: pytest.fail("built a model before checking"))
    arguments = {"backbone": "tiny-clip", "device": "cpu", **kwargs}
    with pytest.raises((ParameterValueError, UnknownNameError), match=message.replace("(", r"\(")):
        finetune_throughput(**arguments)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where CUDA is missing")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ParameterValueError, match="device 'cuda' is not available on this machine; valid here: auto, cpu"):
        finetune_throughput("tiny-clip", device="cuda")


def test_precision_the_device_cannot_autocast_is_refused(monkeypatch):
    class NoAutocast:  # what torch does where autocast does not support a dtype: warns and stays fp32
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch, "autocast", NoAutocast)
    with pytest.raises(ParameterValueError, match="fp16 autocast is not supported on cpu"):
        benchmarking.check_precision("fp16", torch.device("cpu"))
    benchmarking.check_precision("fp32", torch.device("cpu"))  # fp32 needs no autocast


def _load(name):
    """A script of benchmarks/ as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _script():
    return _load("finetune_throughput")


def test_script_writes_both_precisions_with_provenance(tmp_path, capsys):
    output = tmp_path / "finetune-cpu-tiny-clip.json"
    assert _script().main(["--backbone", "tiny-clip", "--batch-size", "4", "--steps", "1", "--warmup", "0",
                           "--device", "cpu", "--output", str(output)]) == 0
    record = json.loads(output.read_text())
    assert record["complete"] and set(record["git"]) == {"commit", "dirty"}
    assert record["parameters"]["backbone"] == "tiny-clip" and record["parameters"]["precisions"] == ["fp32", "bf16"]
    assert record["versions"]["torch"] and record["torch_build"]["torch"] == torch.__version__
    assert record["device_description"] and [r["precision"] for r in record["results"]] == ["fp32", "bf16"]
    ratio = record["ratios"]["bf16/fp32"]
    assert ratio == pytest.approx(record["results"][1]["images_per_second"] / record["results"][0]["images_per_second"])
    printed = capsys.readouterr().out
    assert "throughput bf16/fp32" in printed and "not measured on the CPU" in printed


@pytest.mark.parametrize("argv, message", [
    (["--backbone", "nope"], "invalid choice: 'nope'"),
    (["--precisions", "fp8"], "invalid choice: 'fp8'"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_script_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        _script().main(argv + ["--device", "cpu"])
    assert exited.value.code == 2 and message in capsys.readouterr().err


def _gpu_checks_arguments(variable):
    """The argument arrays ``variable=(...)`` of benchmarks/gpu_checks.sh (dry run and GPU run)."""
    text = (REPO_ROOT / "benchmarks" / "gpu_checks.sh").read_text()
    found = [shlex.split(m) for m in re.findall(rf"^\s*{variable}=\((.*)\)\s*$", text, flags=re.M)]
    assert len(found) == 2, found
    return found


def test_gpu_checks_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(REPO_ROOT / "benchmarks" / "gpu_checks.sh")], check=True)


@pytest.mark.parametrize("argv", _gpu_checks_arguments("THROUGHPUT"))
def test_gpu_checks_throughput_arguments_are_accepted(argv, tmp_path, monkeypatch):
    module = _load("finetune_throughput")
    calls = []
    monkeypatch.setattr(module, "create_clip", lambda name, weights: name)
    monkeypatch.setattr(module, "finetune_throughput", lambda backbone, **kw: calls.append((backbone, kw)) or {
        "backbone": backbone, "precision": kw["precision"], "batch_size": kw["batch_size"], "image_size": 0,
        "encoder_parameters": 0, "images_per_second": 1.0, "seconds_per_step": 1.0, "seconds_per_step_median": 1.0,
        "peak_memory_bytes": None, "peak_memory_note": CPU_MEMORY_NOTE})
    assert module.main(argv + ["--device", "cpu", "--output", str(tmp_path / "t.json")]) == 0
    assert [kw["precision"] for _, kw in calls] == ["fp32", "bf16"]
    if "ViT-B-32" in argv:  # the GPU run: what the issue asks for
        assert all(b == "ViT-B-32" and kw["batch_size"] == 128 for b, kw in calls)


@pytest.mark.parametrize("argv", _gpu_checks_arguments("MERGE"))
def test_gpu_checks_merge_arguments_are_accepted(argv, tmp_path, monkeypatch):
    module = _load("merge_benchmark")
    calls = []
    monkeypatch.setattr(module, "run_configuration", lambda *args: calls.append(args) or {})
    monkeypatch.setattr(module, "print_summary", lambda *args: None)
    assert module.main(argv + ["--device", "cpu", "--output", str(tmp_path / "m.json")]) == 0
    assert all(not with_reference for *_, with_reference in calls)  # the CPU-only reference never runs here
    if "ViT-L-14" in argv:  # the GPU run: every method at ViT-L-14 shapes, T = 3 first
        assert [(b, t) for b, t, *_ in calls] == [("ViT-L-14", 3), ("ViT-L-14", 5)]
        assert set(calls[0][2]) == set(module.METHODS)
