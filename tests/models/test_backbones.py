"""Backbone registry, offline behaviour, and tensor preprocessing against open_clip's own transform."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from mergelib.models.backbones import BACKBONES, batch_to_model_input, create_clip
from mergelib.errors import BackboneUnavailableError, UnknownNameError


def test_registry_has_the_papers_backbones():
    assert {"tiny-clip", "ViT-B-32", "ViT-B-16", "ViT-L-14"} <= set(BACKBONES)
    assert all(BACKBONES[n].open_clip_name.endswith("-quickgelu") for n in ("ViT-B-32", "ViT-B-16", "ViT-L-14"))


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(UnknownNameError) as info:
        create_clip("ViT-X-99", weights=None)
    assert "ViT-B-32" in str(info.value) and "tiny-clip" in str(info.value)


def test_real_backbone_offline_fails_fast_and_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(BackboneUnavailableError) as info:
        create_clip("ViT-B-32", weights="published")
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "ViT-B-32" in message and "offline" in message and "tiny-clip" in message


def test_tiny_clip_has_no_published_weights():
    with pytest.raises(BackboneUnavailableError, match="pretrained on this machine"):
        create_clip("tiny-clip", weights="published")


def test_tiny_clip_architecture():
    clip = create_clip("tiny-clip", weights=None)
    assert clip.image_size == 32
    assert sum(p.numel() for p in clip.model.visual.parameters()) == 836_864
    features = clip.model.encode_image(torch.zeros(2, 3, 32, 32))
    assert features.shape == (2, 128)


def test_tensor_preprocessing_matches_open_clip_val_transform():
    clip = create_clip("tiny-clip", weights=None)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ours = batch_to_model_input(images, clip)
    theirs = torch.stack([clip.preprocess_val(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in images])
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_training_augmentation_is_seeded_and_close_to_identity():
    clip = create_clip("tiny-clip", weights=None)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    first = batch_to_model_input(images, clip, train=True, generator=torch.Generator().manual_seed(3))
    second = batch_to_model_input(images, clip, train=True, generator=torch.Generator().manual_seed(3))
    other = batch_to_model_input(images, clip, train=True, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, second) and not torch.equal(first, other)
    assert first.shape == (8, 3, 32, 32)
    # crops keep >= 90 % of the area: the augmented image stays correlated with the original
    plain = batch_to_model_input(images, clip)
    smooth = torch.nn.functional.avg_pool2d(plain, 4)
    smooth_aug = torch.nn.functional.avg_pool2d(first, 4)
    corr = np.corrcoef(smooth.flatten().numpy(), smooth_aug.flatten().numpy())[0, 1]
    assert corr > 0.5


def test_preprocessing_rejects_float_images():
    clip = create_clip("tiny-clip", weights=None)
    with pytest.raises(ValueError, match="uint8"):
        batch_to_model_input(torch.zeros(1, 3, 32, 32), clip)


def test_a_failed_or_interrupted_download_is_reported_with_the_remedy(monkeypatch):
    import open_clip

    from mergelib.models import backbones

    monkeypatch.setattr(backbones, "_cached_hub_weights", lambda spec: None)
    monkeypatch.setattr(backbones, "_hub_reachable", lambda timeout=3.0: True)

    def reset(*args, **kwargs):
        raise ConnectionError("Connection reset by peer")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", reset)
    with pytest.raises(BackboneUnavailableError, match="interrupted.*Run again"):
        create_clip("ViT-B-32")


def test_truncated_or_foreign_weights_files_are_named_in_the_error(tmp_path):
    from safetensors.torch import save_file

    from mergelib.errors import CorruptCheckpointError, ParameterValueError

    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in create_clip("tiny-clip", weights=None).model.state_dict().items()}
    whole = tmp_path / "tiny.safetensors"
    save_file(state, str(whole))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])  # an interrupted copy
    with pytest.raises(CorruptCheckpointError, match="truncated.safetensors.*interrupted"):
        create_clip("tiny-clip", weights=truncated)
    foreign = tmp_path / "foreign.safetensors"
    save_file({**state, "visual.conv1.weight": torch.zeros(3, 3, 3, 3)}, str(foreign))
    with pytest.raises(ParameterValueError, match="does not fit backbone 'tiny-clip'"):
        create_clip("tiny-clip", weights=foreign)
    assert torch.equal(create_clip("tiny-clip", weights=whole).model.state_dict()["visual.conv1.weight"],
                       state["visual.conv1.weight"])
