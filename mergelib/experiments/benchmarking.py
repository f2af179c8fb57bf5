"""Fine-tuning throughput: timed optimizer steps of the real training step on synthetic batches.

:func:`finetune_throughput` builds a backbone's image tower with a frozen head and runs
optimizer steps of :class:`mergelib.models.finetune.TrainingStep`, the step of
:func:`mergelib.models.finetune.finetune_image_encoder` (AdamW, warm-up then cosine, clipping, autocast
at the chosen precision, gradient scaler for fp16). The batches are random tensors already on the
device, made once before timing, so the figures measure the model's forward and backward passes
and the optimizer, not image decoding or augmentation. The first ``warmup`` steps (allocator
growth, kernel selection, optimizer state creation) are not timed; on CUDA every timed step ends
with ``torch.cuda.synchronize``. Throughput does not depend on the weights' values, so a random
initialisation of the real architecture (``weights=None``) measures what the published weights
would, with no network.
"""

from __future__ import annotations

import copy
import itertools
import math
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mergelib.models.backbones import BACKBONES, Clip, create_clip
from mergelib.errors import ParameterValueError, lookup
from mergelib.models.evaluation import check_precision_name
from mergelib.models.finetune import PAPER_FINETUNE, FinetuneConfig, TrainingStep
from mergelib.models.heads import ClassificationHead
from mergelib.methods.common import resolve_device

#: What the result says about peak memory where it is not measured.
CPU_MEMORY_NOTE = "not measured on the CPU (torch.cuda.max_memory_allocated exists only on CUDA)"


def resolve_benchmark_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/``None``: CUDA when available, else the CPU; :func:`resolve_device` refuses unknown
    and unavailable devices; the benchmark runs on the CPU or CUDA only."""
    resolved = resolve_device(device)
    if resolved.type not in ("cpu", "cuda"):
        raise ParameterValueError(f"device {device!r}: only cpu and cuda are supported")
    return resolved


def device_description(device: torch.device) -> str:
    """The GPU's name (CUDA), or the CPU's model name and the number of threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        name = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1).strip()
    except (OSError, AttributeError):
        name = platform.processor() or platform.machine() or "unknown CPU"
    threads = torch.get_num_threads()
    return f"{name}, {threads} thread{'s' if threads > 1 else ''}"


def check_precision(precision: str, device: torch.device) -> None:
    """Raise :class:`~mergelib.errors.ParameterValueError` unless ``device`` can train at ``precision``.

    fp32 is always possible; bf16 and fp16 need autocast to produce that dtype on the device
    (probed with one small matrix product), and bf16 on CUDA a GPU that supports it.
    """
    check_precision_name(precision)
    if precision == "fp32":
        return
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ParameterValueError(f"{torch.cuda.get_device_name(device)} does not support bf16; use fp32 or fp16")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    try:
        with torch.autocast(device_type=device.type, dtype=dtype):
            probe = torch.ones(4, 4, device=device) @ torch.ones(4, 4, device=device)
    except (RuntimeError, AssertionError) as error:
        raise ParameterValueError(f"{precision} autocast is not supported on {device.type} by torch {torch.__version__}: {error}") from None
    if probe.dtype != dtype:
        raise ParameterValueError(
            f"{precision} autocast is not supported on {device.type} by torch {torch.__version__} "
            f"(a matrix product under autocast stays {probe.dtype})"
        )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _relative_change(before: list[torch.Tensor], after: list[torch.Tensor]) -> tuple[float, int]:
    """Relative Frobenius change of a list of tensors, and how many of them changed at all."""
    num = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(after, before))
    den = sum(float(b.double().pow(2).sum()) for b in before)
    changed = sum(not torch.equal(a, b) for a, b in zip(after, before))
    return (num / den) ** 0.5 if den else math.inf, changed


def finetune_throughput(
    backbone: str = "ViT-B-32",
    *,
    batch_size: int = 128,
    precision: str = "fp32",
    steps: int = 20,
    warmup: int = 3,
    device: str | torch.device = "auto",
    config: FinetuneConfig | None = None,
    classes: int = 10,
    distinct_batches: int = 2,
    seed: int = 0,
    clip: Clip | None = None,
) -> dict[str, Any]:
    """Time ``steps`` optimizer steps of fine-tuning ``backbone``'s image tower after ``warmup`` untimed ones.

    Args:
        backbone: a key of :data:`mergelib.models.backbones.BACKBONES`, built with ``weights=None``
            (unless ``clip`` is given: then its image tower is used, a copy of it trained).
        batch_size: images per batch (per micro-batch when ``config.accumulation_steps`` > 1).
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast; fp16 with the gradient scaler).
        steps: timed optimizer steps; ``warmup``: untimed steps before them.
        device: ``cpu``, ``cuda`` (or ``cuda:N``) or ``auto``.
        config: the fine-tuning recipe; default the papers' (:data:`mergelib.models.finetune.PAPER_FINETUNE`).
            Its ``batch_size`` and ``precision`` are replaced by the arguments; the learning-rate
            schedule spans ``warmup + steps`` optimizer steps.
        classes: classes of the frozen head (random unit prototypes times CLIP's logit scale, 100).
        distinct_batches: how many different random batches are made and cycled through.

    Returns:
        A dict of plain numbers: images and optimizer steps timed, seconds, images per second,
        seconds per step (mean and median), peak CUDA memory (``None`` on the CPU, with a note),
        the losses, and the relative change of the tower's parameters (proof that it trained).
    """
    if clip is None:
        lookup(BACKBONES, "backbone", backbone)  # an unknown name fails before anything is built
    for name, value, least in (("batch_size", batch_size, 1), ("steps", steps, 1), ("warmup", warmup, 0),
                               ("classes", classes, 1), ("distinct_batches", distinct_batches, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ParameterValueError(f"{name} must be an integer >= {least}, got {value!r}")
    device = resolve_benchmark_device(device)
    check_precision(precision, device)
    base = config or PAPER_FINETUNE
    config = FinetuneConfig(**{**base.as_dict(), "batch_size": batch_size, "precision": precision})
    if config.accumulation_steps < 1:
        raise ParameterValueError(f"accumulation_steps must be >= 1, got {config.accumulation_steps}")

    torch.manual_seed(seed)
    if clip is None:
        clip = create_clip(backbone, weights=None)
    encoder = copy.deepcopy(clip.model.visual).to(device).train()
    generator = torch.Generator().manual_seed(seed)
    prototypes = F.normalize(torch.randn(classes, encoder.output_dim, generator=generator), dim=-1)
    head = ClassificationHead(100.0 * prototypes, [f"class {i}" for i in range(classes)])
    size = clip.image_size
    batches = [(torch.randn(batch_size, 3, size, size, generator=generator).to(device),
                torch.randint(0, classes, (batch_size,), generator=generator).to(device))
               for _ in range(distinct_batches)]
    accumulate = config.accumulation_steps
    step = TrainingStep(encoder, head, config, warmup + steps, device)
    before = [p.detach().clone() for p in encoder.parameters()]
    counter = itertools.count()

    def micro_batches():
        for _ in range(accumulate):
            yield batches[next(counter) % distinct_batches]

    if device.type == "cuda":
        _synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    losses = [step(micro_batches()) for _ in range(warmup)]
    _synchronize(device)
    step_seconds = []
    start = time.perf_counter()
    for _ in range(steps):
        began = time.perf_counter()
        losses.append(step(micro_batches()))
        _synchronize(device)
        step_seconds.append(time.perf_counter() - began)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    reserved = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None
    change, changed = _relative_change(before, [p.detach() for p in encoder.parameters()])
    images = steps * accumulate * batch_size
    result = {
        "backbone": clip.spec.name,
        "precision": precision,
        "device": str(device),
        "device_description": device_description(device),
        "batch_size": batch_size,
        "accumulation_steps": accumulate,
        "image_size": size,
        "encoder_parameters": sum(p.numel() for p in encoder.parameters()),
        "warmup_steps_untimed": warmup,
        "steps": steps,
        "images": images,
        "seconds": seconds,
        "images_per_second": images / seconds,
        "seconds_per_step": seconds / steps,
        "seconds_per_step_median": statistics.median(step_seconds),
        "step_seconds": step_seconds,
        "peak_memory_bytes": peak,
        "peak_memory_reserved_bytes": reserved,
        "peak_memory_note": "torch.cuda.max_memory_allocated over warm-up and timed steps" if peak is not None else CPU_MEMORY_NOTE,
        "losses": losses,
        "parameter_relative_change": change,
        "parameters_changed": changed,
        "parameter_tensors": len(before),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "config": config.as_dict(),
    }
    del step, encoder, batches, before
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result
