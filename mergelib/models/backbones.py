"""CLIP backbones: the registry, model creation through open_clip, and image preprocessing.

Every backbone, the embedded ``tiny-clip`` included, is an ``open_clip.CLIP`` built by
``open_clip.create_model_and_transforms``, so the miniature runs exactly the code path of the
papers' backbones. The real backbones use OpenAI's weights, which need the QuickGELU activation
(open_clip's ``*-quickgelu`` configs), as in SCORE's and ESM's released code.

``tiny-clip`` has no published weights: :mod:`mergelib.models.pretrain` pretrains it on this machine.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import open_clip
import torch
import torch.nn.functional as F

from mergelib.errors import BackboneUnavailableError, CorruptCheckpointError, ParameterValueError, lookup

CONFIG_DIR = Path(__file__).with_name("model_configs")


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    open_clip_name: str
    pretrained_tag: str | None  # open_clip weight tag; None when the weights are made here
    description: str

    @property
    def needs_network(self) -> bool:
        return self.pretrained_tag is not None


#: The registered backbones, ``tiny-clip`` (pretrained here) and the OpenAI CLIP ViTs.
BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            "tiny-clip",
            "tiny-clip",
            None,
            "Embedded miniature CLIP (ViT 4 layers, width 128, 32x32 images, patch 8), pretrained here.",
        ),
        BackboneSpec("ViT-B-32", "ViT-B-32-quickgelu", "openai", "OpenAI CLIP ViT-B/32 (QuickGELU)."),
        BackboneSpec("ViT-B-16", "ViT-B-16-quickgelu", "openai", "OpenAI CLIP ViT-B/16 (QuickGELU)."),
        BackboneSpec("ViT-L-14", "ViT-L-14-quickgelu", "openai", "OpenAI CLIP ViT-L/14 (QuickGELU)."),
    )
}


def register_embedded_configs() -> None:
    """Make the architectures shipped in ``mergelib/model_configs`` known to open_clip."""
    for path in sorted(CONFIG_DIR.glob("*.json")):
        if path.stem not in open_clip.list_models():
            open_clip.add_model_config(path)


@dataclass
class Clip:
    """An open_clip model with what the pipeline needs beside it."""

    spec: BackboneSpec
    model: open_clip.CLIP
    tokenizer: Callable
    preprocess_train: Callable  # PIL -> tensor (open_clip), for image-folder datasets
    preprocess_val: Callable

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return size[0] if isinstance(size, (tuple, list)) else int(size)

    @property
    def image_mean(self) -> tuple[float, ...]:
        return tuple(self.model.visual.image_mean or open_clip.OPENAI_DATASET_MEAN)

    @property
    def image_std(self) -> tuple[float, ...]:
        return tuple(self.model.visual.image_std or open_clip.OPENAI_DATASET_STD)


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_hub_weights(spec: BackboneSpec) -> str | None:
    """Path of the backbone's weights in the local Hugging Face cache, if they are there."""
    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(spec.open_clip_name, spec.pretrained_tag)
    repo = cfg.get("hf_hub", "").strip("/")
    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        path = try_to_load_from_cache(repo, filename) if repo else None
        if isinstance(path, str):
            return path
    return None


def create_clip(name: str, *, weights: str | Path | None = "published", device: str | torch.device = "cpu") -> Clip:
    """Build backbone ``name``.

    Args:
        name: a key of :data:`BACKBONES`.
        weights: ``"published"`` for the backbone's public weights (real backbones only; they
            need the network once, then come from the Hugging Face cache), ``None`` for a random
            initialisation, or a path to an open_clip checkpoint or a safetensors state dict.
        device: where to put the model.
    """
    spec = lookup(BACKBONES, "backbone", name)
    register_embedded_configs()
    pretrained: str | None = None
    state_path: Path | None = None
    if weights == "published":
        if spec.pretrained_tag is None:
            raise BackboneUnavailableError(
                f"backbone {name!r} has no published weights: it is pretrained on this machine by "
                "mergelib.models.pretrain.pretrained_tiny_clip(...) (the pipeline does this and caches it)."
            )
        pretrained = _cached_hub_weights(spec)
        if pretrained is None:
            if not _hub_reachable():
                raise BackboneUnavailableError(
                    f"backbone {name!r} needs its {spec.pretrained_tag!r} weights from the Hugging Face hub, "
                    "which cannot be reached from this machine (offline), and they are not in the local "
                    "Hugging Face cache. Run once on a machine with a network (the weights are then cached), "
                    "pass weights=PATH to a local open_clip checkpoint, or use the embedded 'tiny-clip'."
                )
            pretrained = spec.pretrained_tag
    elif weights is not None:
        state_path = Path(weights)
        if not state_path.is_file():
            raise FileNotFoundError(f"weights file for backbone {name!r} not found: {state_path}")
        if state_path.suffix != ".safetensors":
            pretrained = str(state_path)  # open_clip loads its own checkpoint formats (weights_only)
            state_path = None
    downloading = pretrained is not None and pretrained == spec.pretrained_tag
    try:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            spec.open_clip_name, pretrained=pretrained, device=device
        )
    except (RuntimeError, OSError) as error:  # ConnectionError and timeouts are OSErrors
        if downloading:
            raise BackboneUnavailableError(
                f"could not obtain the {spec.pretrained_tag!r} weights of backbone {name!r} (the download failed or "
                f"was interrupted: {error}). Run again: the Hugging Face cache keeps only complete files and resumes "
                "a partial download."
            ) from error
        if pretrained is not None:  # a local open_clip checkpoint that does not load
            raise CorruptCheckpointError(f"weights file {pretrained} for backbone {name!r} cannot be read ({error}); "
                                         "it may be truncated by an interrupted download or copy") from error
        raise
    if state_path is not None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(state_path, device=str(device))
        except (SafetensorError, OSError) as error:
            raise CorruptCheckpointError(f"weights file {state_path} for backbone {name!r} cannot be read ({error}); "
                                         "it may be truncated by an interrupted download or copy") from error
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise ParameterValueError(f"weights file {state_path} does not fit backbone {name!r} (another "
                                      f"architecture?): {str(error).splitlines()[0]} ...") from error
    return Clip(spec, model, open_clip.get_tokenizer(spec.open_clip_name), preprocess_train, preprocess_val)


def batch_to_model_input(
    images: torch.Tensor,
    clip: Clip,
    *,
    train: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """uint8 images ``[N, 3, H, W]`` to the normalised float input of ``clip``'s image tower.

    The tensor counterpart of open_clip's PIL transforms, for in-memory datasets: resize to the
    model's image size (bicubic, as open_clip), and for training the same augmentation as
    open_clip's train transform, a random resized crop with scale (0.9, 1.0) and aspect 3/4..4/3.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images of shape [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    x = images.float().div_(255.0)
    size = clip.image_size
    if train:
        x = _random_resized_crop(x, size, generator)
    elif x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
    mean = torch.tensor(clip.image_mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(clip.image_std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _random_resized_crop(x: torch.Tensor, size: int, generator: torch.Generator | None) -> torch.Tensor:
    """Per-image random resized crop (scale 0.9..1, log-uniform aspect 3/4..4/3), batched with grid_sample."""
    n, _, h, w = x.shape
    scale = torch.empty(n).uniform_(0.9, 1.0, generator=generator)
    log_ratio = torch.empty(n).uniform_(-0.2876821, 0.2876821, generator=generator)  # log(3/4), log(4/3)
    ratio = log_ratio.exp()
    crop_w = (scale * ratio).sqrt().clamp(max=1.0)  # fractions of the image side
    crop_h = (scale / ratio).sqrt().clamp(max=1.0)
    cx = (torch.rand(n, generator=generator) * (1 - crop_w) + crop_w / 2) * 2 - 1  # centre in [-1, 1]
    cy = (torch.rand(n, generator=generator) * (1 - crop_h) + crop_h / 2) * 2 - 1
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = crop_w, cx
    theta[:, 1, 1], theta[:, 1, 2] = crop_h, cy
    grid = F.affine_grid(theta.to(x.device), (n, 3, size, size), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
