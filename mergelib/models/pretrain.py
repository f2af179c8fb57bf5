"""Contrastive pretraining of the embedded ``tiny-clip`` on generated domains of real images.

No CLIP weights can be downloaded here, so the miniature's "pretrained CLIP" is trained on this
machine: a CLIP loss on Fashion-MNIST rendered in a few *seen* domains (the other domains stay
unseen, as the held-out domains of a domain-generalisation benchmark) and on the training images
of the mini multi-task suite, with captions from templates ("a negative photo of a coat.").

Only a fraction (``fine_caption_fraction``) of the Fashion-MNIST images are captioned with their
class; the others carry a coarse category ("a photo of a top."). Real CLIP models know the visual
world but not every fine distinction of a benchmark's classes, which is what fine-tuning teaches
and merging combines. Pretrained on fine captions only, the tiny CLIP already knows the task on
the seen domains, the experts can only learn domain-specific adaptations, and merging them does
not beat zero-shot on average (the study behind the defaults is in the book's first chapter).

Two details make this work at this scale (see the book's first chapter): many images share a
caption, so each batch encodes its unique captions only and treats every image with the same
caption as a positive (soft targets); and weight decay applies only to >= 2-D non-embedding
weights, with a warm-up then cosine ("one-cycle") schedule. The result is cached, keyed by a
hash of the configuration and of the pool's content.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mergelib.models.backbones import Clip, batch_to_model_input, create_clip
from mergelib.io.checkpoints import cached_state, config_hash, expect_shapes
from mergelib.models.finetune import lr_factor
from mergelib.data import MINI_SUITE_TASKS, caption_for, make_pretraining_pool, make_task

BACKBONE = "tiny-clip"

# Coarse categories of the Fashion-MNIST classes: pool images not captioned with their fine class
# are captioned with these, so the pretrained model knows the visual world and the coarse
# semantics but not every fine distinction, which the domain experts then learn.
FASHION_COARSE = {
    "t-shirt": "top", "pullover": "top", "coat": "top", "shirt": "top", "dress": "dress",
    "trouser": "trouser", "sandal": "shoe", "sneaker": "shoe", "ankle boot": "shoe", "bag": "bag",
}


@dataclass(frozen=True)
class PretrainConfig:
    pool_domains: tuple[str, ...] = ("photo", "negative", "texture")
    n_per_domain: int = 6000
    tasks: tuple[str, ...] = ("digits", "animals", "textures")
    n_per_task: int = 1000
    epochs: int = 3
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    fine_caption_fraction: float = 0.25  # share of pool images captioned with their fine class name
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def pretraining_corpus(config: PretrainConfig) -> tuple[torch.Tensor, list[str], list[str]]:
    """The pool's images ``[N, 3, 32, 32]`` (uint8), their captions, and their sources."""
    pool, pool_domains = make_pretraining_pool(config.pool_domains, config.n_per_domain, config.seed)
    images = [pool.images]
    fine = torch.rand(len(pool), generator=torch.Generator().manual_seed(config.seed)) < config.fine_caption_fraction
    captions = [
        caption_for(d, name if keep else FASHION_COARSE[name])
        for d, name, keep in zip(pool_domains, (pool.classnames[int(y)] for y in pool.labels), fine.tolist())
    ]
    sources = list(pool_domains)
    for task in config.tasks:
        spec = MINI_SUITE_TASKS[task]
        n_train = min(config.n_per_task, spec.max_train)
        train, _ = make_task(task, n_train=n_train, n_test=1, seed=config.seed)
        templates = spec.caption_templates
        images.append(train.images)
        captions += [templates[i % len(templates)].format(train.classnames[int(y)]) for i, y in enumerate(train.labels)]
        sources += [task] * len(train)
    return torch.cat(images), captions, sources


def _fingerprint(images: torch.Tensor, captions: list[str]) -> str:
    import hashlib

    digest = hashlib.sha256(images.numpy().tobytes())
    digest.update("\n".join(captions).encode())
    return digest.hexdigest()


def pretrain_tiny_clip(
    config: PretrainConfig, *, device: str | torch.device = "cpu", progress: bool = True
) -> tuple[Clip, list[float]]:
    """Pretrain ``tiny-clip`` from scratch; return the model and the loss of every step."""
    images, captions, _ = pretraining_corpus(config)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    clip = create_clip(BACKBONE, weights=None, device=device)
    model = clip.model.train()

    unique_captions = sorted(set(captions))
    caption_index = {c: i for i, c in enumerate(unique_captions)}
    caption_ids = torch.tensor([caption_index[c] for c in captions])
    tokens = clip.tokenizer(unique_captions)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )
    steps_per_epoch = math.ceil(len(images) / config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup = max(1, int(config.warmup_fraction * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup))
    losses: list[float] = []
    bar = tqdm(total=total, desc="pretrain tiny-clip", disable=not progress, mininterval=2.0)
    for _ in range(config.epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), config.batch_size):
            index = order[start : start + config.batch_size]
            inputs = batch_to_model_input(images[index], clip, train=True, generator=generator).to(device)
            batch_captions, targets = torch.unique(caption_ids[index], return_inverse=True)
            image_features = F.normalize(model.encode_image(inputs), dim=-1)
            text_features = F.normalize(model.encode_text(tokens[batch_captions].to(device)), dim=-1)
            logits = model.logit_scale.exp() * image_features @ text_features.T  # [images, unique captions]
            targets = targets.to(device)
            image_loss = F.cross_entropy(logits, targets)
            # text -> image: every image carrying the caption is a positive (uniform soft target)
            positives = F.one_hot(targets, len(batch_captions)).T.float()
            text_loss = -(positives / positives.sum(1, keepdim=True) * F.log_softmax(logits.T, dim=1)).sum(1).mean()
            loss = (image_loss + text_loss) / 2
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
            bar.update()
    bar.close()
    model.eval()
    return clip, losses


def pretrained_tiny_clip(
    config: PretrainConfig, cache_dir: Path, *, device: str | torch.device = "cpu", progress: bool = True
) -> tuple[Clip, dict]:
    """The pretrained ``tiny-clip`` for ``config``, from the cache or trained now (then cached).

    Returns the model and its checkpoint manifest (with ``key``, the cache key, and ``losses``).
    """
    images, captions, _ = pretraining_corpus(config)
    key = config_hash({"backbone": BACKBONE, "config": config.as_dict(), "data": _fingerprint(images, captions)})
    path = Path(cache_dir) / "pretrained" / f"{BACKBONE}-{key[:16]}.safetensors"

    def build():
        start = time.perf_counter()
        clip, losses = pretrain_tiny_clip(config, device=device, progress=progress)
        fields = {
            "backbone": BACKBONE,
            "config": config.as_dict(),
            "pool_size": len(images),
            "seconds": round(time.perf_counter() - start, 1),
            "losses": [round(x, 5) for x in losses],
        }
        return clip.model.state_dict(), fields

    clip = create_clip(BACKBONE, weights=None, device=device)
    # a cached file of another tiny-clip architecture is rebuilt, not a crash in load_state_dict
    fits = expect_shapes({k: v.shape for k, v in clip.model.state_dict().items()}, f"the {BACKBONE} architecture")
    state, manifest = cached_state(path, key, build, check=fits)
    clip.model.load_state_dict(state)
    clip.model.eval()
    return clip, manifest

