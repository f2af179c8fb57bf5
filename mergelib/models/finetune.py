"""Fine-tuning of CLIP's image tower with a frozen zero-shot head (the papers' recipe).

As in SCORE's and the task-vectors code: cross-entropy, AdamW with weight decay on every
parameter, a linear warm-up of ``warmup_steps`` steps, then cosine decay to zero over the
remaining steps, gradient clipping at global norm 1.0, the head frozen. The papers use lr 1e-5,
batch 128 and 500 warm-up steps on ViT-B/L; :data:`MINIATURE_FINETUNE` scales these to the tiny
model (a from-scratch, 0.8 M-parameter tower moves little at lr 1e-5 in ~50 steps).

Real datasets (``ImageFileSet``) are read by a ``DataLoader`` with the
backbone's open_clip train transform, shuffled by a seeded generator, the last partial batch
kept, as released. ``precision="bf16"`` or ``"fp16"`` trains under autocast (SCORE's domain
script trains in fp32; the 8-task script uses fp16 with a gradient scaler, and clips the
*scaled* gradients without unscaling them first, which makes its clipping threshold depend on
the scale: here gradients are unscaled before clipping). ``accumulation_steps`` > 1 sums the
gradients of that many batches per optimizer step, as the released code does for ViT-L/14
(batch 64 x 2); the schedule counts optimizer steps.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mergelib.models.backbones import Clip, batch_to_model_input
from mergelib.data import ImageSet
from mergelib.data.files import ImageFileSet
from mergelib.models.evaluation import autocast_context
from mergelib.models.heads import ClassificationHead, ImageClassifier
from mergelib.task_vectors import StateDict, encoder_state


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-5
    weight_decay: float = 0.1
    warmup_steps: int = 500
    grad_clip: float = 1.0
    seed: int = 5
    precision: str = "fp32"
    accumulation_steps: int = 1

    def as_dict(self) -> dict:
        return asdict(self)


#: SCORE's released recipe (the epochs are set per dataset).
PAPER_FINETUNE = FinetuneConfig()
#: The papers' recipe scaled to the tiny CLIP of the miniature.
MINIATURE_FINETUNE = FinetuneConfig(epochs=3, batch_size=128, lr=1e-4, weight_decay=0.1, warmup_steps=5, seed=5)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based): warm-up, then cosine.

    Follows the released schedule: ``(step+1)/warmup`` during warm-up, then
    ``0.5 (1 + cos(pi (step - warmup) / (total - warmup)))``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / span))


def finetune_image_encoder(
    clip: Clip,
    head: ClassificationHead,
    train: ImageSet | ImageFileSet | torch.utils.data.Dataset,
    config: FinetuneConfig,
    *,
    device: str | torch.device = "cpu",
    description: str = "fine-tune",
    progress: bool = True,
    num_workers: int = 0,
) -> tuple[StateDict, list[float]]:
    """Fine-tune a copy of ``clip``'s image tower on ``train``; return its state and the step losses.

    ``train``: an ``ImageSet``, an ``ImageFileSet`` (read with the backbone's train transform), or
    any torch ``Dataset`` of ``(input tensor, label)`` pairs already transformed (a torchvision
    dataset of :mod:`mergelib.data.task_suites` built with ``clip.preprocess_train``).
    """
    classnames = getattr(train, "classnames", None)
    if len(head.classnames) and classnames is not None and tuple(head.classnames) != tuple(classnames):
        raise ValueError(f"head classes {head.classnames} do not match the dataset's {classnames}")
    if config.accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be >= 1, got {config.accumulation_steps}")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    device = torch.device(device)
    encoder = copy.deepcopy(clip.model.visual).to(device).train()
    batches_per_epoch = math.ceil(len(train) / config.batch_size)
    total = math.ceil(batches_per_epoch / config.accumulation_steps) * config.epochs
    step = TrainingStep(encoder, head, config, total, device)
    losses: list[float] = []
    bar = tqdm(total=total, desc=description, disable=not progress, leave=False, mininterval=1.0)
    for _ in range(config.epochs):
        batches = iter(_training_batches(train, clip, config.batch_size, generator, num_workers))
        # one optimizer step per accumulation_steps batches; the epoch's last group may be shorter
        for first in batches:
            losses.append(step(itertools.chain((first,), itertools.islice(batches, config.accumulation_steps - 1))))
            bar.update()
    bar.close()
    return encoder_state(encoder), losses


class TrainingStep:
    """The optimizer of a fine-tuning run and its step, shared by :func:`finetune_image_encoder`
    and the fine-tuning throughput benchmark (``mergelib.experiments.benchmarking``).

    AdamW on every parameter of ``encoder``, the schedule of :func:`lr_factor` over
    ``total_steps`` optimizer steps, autocast at ``config.precision`` with a gradient scaler for
    fp16 (gradients unscaled before clipping), clipping at ``config.grad_clip``. Calling it with
    the micro-batches ``(inputs, labels)`` of one optimizer step (``config.accumulation_steps`` of
    them, or fewer at the end of an epoch) runs forward and backward on each, steps the optimizer
    and the schedule, and returns the step's loss.
    """

    def __init__(self, encoder: torch.nn.Module, head: ClassificationHead, config: FinetuneConfig,
                 total_steps: int, device: torch.device):
        if config.accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {config.accumulation_steps}")
        self.encoder, self.config, self.device = encoder, config, device
        self.classifier = ImageClassifier(encoder, head.to(device))
        self.optimizer = torch.optim.AdamW(encoder.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.autocast = autocast_context(config.precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, total_steps, config.warmup_steps)
        )

    def __call__(self, micro_batches) -> float:
        accumulate = self.config.accumulation_steps
        self.optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for inputs, labels in micro_batches:
            with self.autocast():
                loss = F.cross_entropy(self.classifier(inputs.to(self.device)), labels.to(self.device)) / accumulate
            self.scaler.scale(loss).backward()
            step_loss += loss.item()
        self.scaler.unscale_(self.optimizer)  # clip the true gradients (see the module docstring)
        torch.nn.utils.clip_grad_norm_(self.encoder.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return step_loss


def _training_batches(train: ImageSet | ImageFileSet | torch.utils.data.Dataset, clip: Clip, batch_size: int,
                      generator: torch.Generator, num_workers: int):
    """One epoch of augmented ``(inputs, labels)`` batches in a random order drawn from ``generator``."""
    if isinstance(train, ImageFileSet):
        train = train.with_transform(clip.preprocess_train)
    if isinstance(train, torch.utils.data.Dataset):
        sampler = torch.utils.data.RandomSampler(range(len(train)), generator=generator)
        yield from torch.utils.data.DataLoader(train, batch_size=batch_size, sampler=sampler, num_workers=num_workers)
        return
    order = torch.randperm(len(train), generator=generator)
    for start in range(0, len(train), batch_size):
        index = order[start : start + batch_size]
        yield batch_to_model_input(train.images[index], clip, train=True, generator=generator), train.labels[index]
