"""Fine-tuning of CLIP's image tower with a frozen zero-shot head (the papers' recipe).

As in SCORE's and the task-vectors code: cross-entropy, AdamW with weight decay on every
parameter, a linear warm-up of ``warmup_steps`` steps, then cosine decay to zero over the
remaining steps, gradient clipping at global norm 1.0, the head frozen. The papers use lr 1e-5,
batch 128 and 500 warm-up steps on ViT-B/L; :data:`MINIATURE_FINETUNE` scales these to the tiny
model (a from-scratch, 0.8 M-parameter tower moves little at lr 1e-5 in ~50 steps).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .backbones import Clip, batch_to_model_input
from .data import ImageSet
from .heads import ClassificationHead, ImageClassifier
from .task_vectors import StateDict, encoder_state


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-5
    weight_decay: float = 0.1
    warmup_steps: int = 500
    grad_clip: float = 1.0
    seed: int = 5

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
    train: ImageSet,
    config: FinetuneConfig,
    *,
    device: str | torch.device = "cpu",
    description: str = "fine-tune",
    progress: bool = True,
) -> tuple[StateDict, list[float]]:
    """Fine-tune a copy of ``clip``'s image tower on ``train``; return its state and the step losses."""
    if len(head.classnames) and tuple(head.classnames) != tuple(train.classnames):
        raise ValueError(f"head classes {head.classnames} do not match the dataset's {train.classnames}")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    encoder = copy.deepcopy(clip.model.visual).to(device).train()
    classifier = ImageClassifier(encoder, head.to(device))
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, config.warmup_steps)
    )
    labels = train.labels
    losses: list[float] = []
    bar = tqdm(total=total, desc=description, disable=not progress, leave=False, mininterval=1.0)
    for _ in range(config.epochs):
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), config.batch_size):
            index = order[start : start + config.batch_size]
            inputs = batch_to_model_input(train.images[index], clip, train=True, generator=generator).to(device)
            loss = F.cross_entropy(classifier(inputs), labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(encoder.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.update()
    bar.close()
    return encoder_state(encoder), losses
