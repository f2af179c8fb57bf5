"""Importing public checkpoint formats (open_clip state dicts, pickled task_vectors modules, Hugging
Face CLIP) into safetensors: exact tensors, HF parity, architecture checks, safety, idempotence."""

from __future__ import annotations

import copy
import importlib
import json
import pickle
import sys
import textwrap

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from mergelib.models import importers
from mergelib.models.backbones import create_clip
from mergelib.io.checkpoints import sha256_file
from mergelib.errors import CorruptCheckpointError
from mergelib.models.importers import (
    CheckpointFormatError,
    CheckpointMismatchError,
    UntrustedPickleError,
    check_architecture,
    expected_visual_shapes,
    hf_to_open_clip,
    import_checkpoint,
    import_directory,
    load_imported,
    normalize_open_clip_keys,
    open_clip_to_hf,
)
from mergelib.task_vectors import encoder_state, load_encoder_state

TEXT_KEYS = ("token_embedding.weight", "positional_embedding", "text_projection", "ln_final.weight", "logit_scale")

FAKE_MODELING = textwrap.dedent(
    """
    import torch

    class ImageEncoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.cache_dir = "/nonexistent"
            delattr(self.model, "transformer")  # as the task_vectors code does without keep_lang

    class ClassificationHead(torch.nn.Linear):
        def __init__(self, normalize, weights):
            super().__init__(weights.shape[1], weights.shape[0])
            self.normalize = normalize
            self.weight = torch.nn.Parameter(weights.clone())

    class ImageClassifier(torch.nn.Module):
        def __init__(self, image_encoder, classification_head):
            super().__init__()
            self.image_encoder = image_encoder
            self.classification_head = classification_head
    """
)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return create_clip("tiny-clip", weights=None)


@pytest.fixture(scope="module")
def visual(clip):
    return encoder_state(clip.model.visual)


def _perturbed(state, seed):
    generator = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in state.items()}


def _assert_same_state(actual, expected):
    assert set(actual) == set(expected)
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def _text_side(prefix):
    return {prefix + k: torch.full((3,), 7.0) for k in TEXT_KEYS}


# ---------------------------------------------------------------- open_clip state dicts


@pytest.mark.parametrize(
    "prefix", ["visual.", "model.visual.", "image_encoder.model.visual.", "module.visual.", "module.model.visual."]
)
def test_plain_state_dict_with_each_prefix_imports_identical_tensors(tmp_path, visual, prefix):
    outer = prefix[: -len("visual.")]
    raw = {prefix + k[len("visual."):]: v for k, v in visual.items()} | _text_side(outer)
    source = tmp_path / "finetuned.pt"
    torch.save(raw, source)
    destination = tmp_path / "out" / "task.safetensors"

    manifest = import_checkpoint(source, destination, backbone="tiny-clip")

    state, loaded = load_imported(destination, "tiny-clip")
    _assert_same_state(state, visual)
    assert loaded == manifest
    assert manifest["source_sha256"] == sha256_file(source) and manifest["source_format"] == "open_clip"
    assert manifest["container"] == "state_dict" and manifest["backbone"] == "tiny-clip"
    assert manifest["filled_keys"] == [] and manifest["dropped_keys"] == len(TEXT_KEYS)
    assert manifest["provenance"]["parameters"]["source_sha256"] == manifest["source_sha256"]
    assert {"mergelib", "torch", "open_clip_torch"} <= set(manifest["provenance"]["versions"])
    assert sorted(p.name for p in destination.parent.iterdir()) == ["task.safetensors"]  # provenance in its header


def test_training_checkpoint_wrapper_and_half_precision_are_read(tmp_path, visual):
    source = tmp_path / "epoch_10.pt"
    torch.save({"epoch": 10, "state_dict": {"module." + k: v.half() for k, v in visual.items()}}, source)
    manifest = import_checkpoint(source, tmp_path / "x.safetensors", backbone="tiny-clip")
    state, _ = load_imported(tmp_path / "x.safetensors", "tiny-clip")
    assert all(v.dtype == torch.float32 for v in state.values())
    assert torch.equal(state["visual.proj"], visual["visual.proj"].half().float())
    assert manifest["cast_from_dtypes"]["visual.proj"] == "float16" and len(manifest["cast_from_dtypes"]) == len(visual)


def test_key_normalisation_rejects_two_encoders_and_text_only_files(tmp_path):
    with pytest.raises(CheckpointFormatError, match="model.visual.proj.*visual.proj|both map"):
        normalize_open_clip_keys({"model.visual.proj": torch.zeros(1), "visual.proj": torch.zeros(1)})
    source = tmp_path / "text.pt"
    torch.save(_text_side("model."), source)
    with pytest.raises(CheckpointFormatError, match=r"no image-encoder keys.*model\.logit_scale"):
        import_checkpoint(source, tmp_path / "x.safetensors", backbone="tiny-clip")
    assert not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------- pickled modules


@pytest.fixture(scope="module")
def pickled_modules(tmp_path_factory, clip):
    """Whole pickled modules of classes ``src.modeling.*``, written with a fake ``src`` package that
    is gone again before any test imports them (the shim must make them load)."""
    repo = tmp_path_factory.mktemp("fake_task_vectors_repo")
    (repo / "src").mkdir()
    (repo / "src" / "__init__.py").write_text("")
    (repo / "src" / "modeling.py").write_text(FAKE_MODELING)
    out = tmp_path_factory.mktemp("pickled")
    assert "src" not in sys.modules
    sys.path.insert(0, str(repo))
    try:
        modeling = importlib.import_module("src.modeling")
        encoder = modeling.ImageEncoder(copy.deepcopy(clip.model))
        torch.save(encoder, out / "zeroshot.pt")
        head = modeling.ClassificationHead(True, torch.randn(5, 128))
        torch.save(modeling.ImageClassifier(encoder, head), out / "classifier.pt")
        with open(out / "legacy.pkl", "wb") as handle:  # plain pickle.dump, as old task_vectors files
            pickle.dump(encoder, handle)
    finally:
        sys.path.remove(str(repo))
        for name in [n for n in sys.modules if n == "src" or n.startswith("src.")]:
            del sys.modules[name]
        importlib.invalidate_caches()
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("src.modeling")
    return out


@pytest.mark.parametrize("name", ["zeroshot.pt", "classifier.pt", "legacy.pkl"])
def test_pickled_module_is_refused_without_trust_and_loads_through_the_shim(tmp_path, pickled_modules, visual, name):
    source = pickled_modules / name
    destination = tmp_path / "out" / "zeroshot.safetensors"
    with pytest.raises(UntrustedPickleError) as refused:
        import_checkpoint(source, destination, backbone="tiny-clip")
    message = str(refused.value)
    assert "trust_pickle=True" in message and "arbitrary code" in message
    if name != "legacy.pkl":  # torch's weights-only loader names the class it refused
        assert "src.modeling.Image" in message
    assert not destination.parent.exists()

    manifest = import_checkpoint(source, destination, backbone="tiny-clip", trust_pickle=True)

    assert "src" not in sys.modules  # the stand-ins replaced the classes; nothing was imported
    state, _ = load_imported(destination, "tiny-clip")
    _assert_same_state(state, visual)
    assert manifest["container"] == "pickled_object"
    expected_dropped = 6 + (1 if name == "classifier.pt" else 0) * 2  # text leftovers (+ head weight, bias)
    assert manifest["dropped_keys"] == expected_dropped


def test_shim_stand_ins_only_hold_attributes(pickled_modules):
    tensors, container = importers.import_pickled_checkpoint(pickled_modules / "classifier.pt", trust_pickle=True)
    assert container == "pickled_object"
    assert tensors["classification_head.weight"].shape == (5, 128) and "classification_head.bias" in tensors
    assert "image_encoder.model.visual.conv1.weight" in tensors
    assert "image_encoder.model.transformer.resblocks.0.ln_1.weight" not in tensors  # the deleted text tower
    stand_in = importers.stand_in_class("src.modeling", "ImageEncoder")
    assert issubclass(stand_in, importers.PickledStandIn) and not issubclass(stand_in, torch.nn.Module)
    assert stand_in.original_name == "src.modeling.ImageEncoder"


def test_numpy_state_dict_pickle_needs_trust(tmp_path, visual):
    source = tmp_path / "old.pkl"
    with open(source, "wb") as handle:
        pickle.dump({"model." + k: v.numpy() for k, v in visual.items()}, handle)
    with pytest.raises(UntrustedPickleError, match="trust_pickle=True"):
        import_checkpoint(source, tmp_path / "x.safetensors", backbone="tiny-clip")
    import_checkpoint(source, tmp_path / "x.safetensors", backbone="tiny-clip", trust_pickle=True)
    _assert_same_state(load_imported(tmp_path / "x.safetensors", "tiny-clip")[0], visual)


# ---------------------------------------------------------------- Hugging Face names


def test_open_clip_to_hf_to_open_clip_round_trip_is_exact(visual):
    hf = open_clip_to_hf(visual)
    width = visual["visual.class_embedding"].shape[0]
    in_bias = visual["visual.transformer.resblocks.3.attn.in_proj_bias"]
    assert torch.equal(hf["vision_model.encoder.layers.3.self_attn.v_proj.bias"], in_bias[2 * width:])
    assert torch.equal(hf["vision_model.encoder.layers.3.self_attn.q_proj.bias"], in_bias[:width])
    assert torch.equal(hf["visual_projection.weight"], visual["visual.proj"].t())
    assert torch.equal(hf["vision_model.embeddings.patch_embedding.weight"], visual["visual.conv1.weight"])
    assert torch.equal(hf["vision_model.pre_layrnorm.bias"], visual["visual.ln_pre.bias"])
    assert torch.equal(hf["vision_model.encoder.layers.0.mlp.fc2.weight"], visual["visual.transformer.resblocks.0.mlp.c_proj.weight"])
    assert len(hf) == len(visual) + 4 * 2 * 2  # in_proj weight and bias split in three per layer
    back, dropped = hf_to_open_clip(hf)
    _assert_same_state(back, visual)
    assert dropped == []
    bare, _ = hf_to_open_clip(open_clip_to_hf(visual, prefix="") | {"embeddings.position_ids": torch.arange(17)[None]})
    _assert_same_state(bare, visual)


def test_hf_clip_model_drops_the_text_side(visual):
    hf = {"clip." + k: v for k, v in open_clip_to_hf(visual).items()}
    hf |= {"clip.text_model.embeddings.token_embedding.weight": torch.zeros(4, 2), "clip.logit_scale": torch.tensor(1.0)}
    hf |= {"clip.text_projection.weight": torch.zeros(2, 2)}
    back, dropped = hf_to_open_clip(hf)
    _assert_same_state(back, visual)
    assert sorted(dropped) == ["clip.logit_scale", "clip.text_model.embeddings.token_embedding.weight", "clip.text_projection.weight"]


def test_unknown_hf_vision_key_is_an_error(visual):
    hf = open_clip_to_hf(visual) | {"vision_model.encoder.layers.0.self_attn.rel_pos.weight": torch.zeros(1)}
    with pytest.raises(CheckpointFormatError, match="rel_pos"):
        hf_to_open_clip(hf)


def _tiny_hf_config(clip):
    transformers = pytest.importorskip("transformers")
    vit = clip.model.visual
    return transformers, transformers.CLIPVisionConfig(
        hidden_size=vit.class_embedding.shape[0],
        intermediate_size=vit.transformer.resblocks[0].mlp.c_fc.out_features,
        num_hidden_layers=len(vit.transformer.resblocks),
        num_attention_heads=vit.transformer.resblocks[0].attn.num_heads,
        image_size=32,
        patch_size=8,
        projection_dim=vit.output_dim,
        hidden_act="gelu",  # tiny-clip's config has quick_gelu false: open_clip's exact nn.GELU
        layer_norm_eps=1e-5,
    )


def _randomise(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():  # also moves LayerNorm affines away from 1/0
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def _open_clip_visual(state):
    torch.manual_seed(0)
    visual = create_clip("tiny-clip", weights=None).model.visual.eval()
    load_encoder_state(visual, state)
    return visual


def test_hf_vision_model_with_projection_gives_the_same_features(tmp_path, clip):
    transformers, config = _tiny_hf_config(clip)
    torch.manual_seed(3)
    hf = _randomise(transformers.CLIPVisionModelWithProjection(config), 4)
    source = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(source))

    manifest = import_checkpoint(tmp_path, tmp_path / "imported.safetensors", backbone="tiny-clip")

    assert manifest["source_format"] == "hf" and manifest["filled_keys"] == []
    visual = _open_clip_visual(load_imported(tmp_path / "imported.safetensors", "tiny-clip")[0])
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = hf(pixel_values=images)
        projected = visual(images)
        visual.proj = None  # open_clip returns the pooled token after ln_post when there is no projection
        pooled = visual(images)
        hf_pooled = hf.vision_model(pixel_values=images).pooler_output
    torch.testing.assert_close(projected, reference.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, hf_pooled, atol=1e-5, rtol=0)


def test_hf_vision_model_without_projection_needs_fill_from(tmp_path, clip, visual):
    transformers, config = _tiny_hf_config(clip)
    torch.manual_seed(6)
    hf = _randomise(transformers.CLIPVisionModel(config), 7)
    source = tmp_path / "pytorch_model.bin"
    torch.save(hf.state_dict(), source)  # transformers 5 names it without the vision_model. prefix
    destination = tmp_path / "out" / "expert.safetensors"
    with pytest.raises(CheckpointMismatchError, match=r"visual\.proj missing.*fill_from="):
        import_checkpoint(source, destination, backbone="tiny-clip")
    assert not destination.parent.exists()

    manifest = import_checkpoint(source, destination, backbone="tiny-clip", fill_from=visual)

    assert manifest["filled_keys"] == ["visual.proj"] and manifest["fill_from"] == "<state dict passed in memory>"
    state, _ = load_imported(destination, "tiny-clip")
    assert torch.equal(state["visual.proj"], visual["visual.proj"])
    model = _open_clip_visual(state)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        model.proj = None
        torch.testing.assert_close(model(images), hf(pixel_values=images).pooler_output, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- architecture, corruption, safety


def test_other_architecture_is_rejected_naming_keys_and_shapes(tmp_path):
    torch.manual_seed(0)
    narrow = open_clip.transformer.VisionTransformer(
        image_size=32, patch_size=8, width=64, layers=4, heads=2, mlp_ratio=4.0, output_dim=128
    )
    source = tmp_path / "narrow.pt"
    torch.save(encoder_state(narrow), source)
    destination = tmp_path / "out" / "x.safetensors"
    with pytest.raises(CheckpointMismatchError) as error:
        import_checkpoint(source, destination, backbone="tiny-clip")
    message = str(error.value)
    assert "visual.class_embedding has shape (64,), expected (128,)" in message
    assert "match none of the registered backbones" in message and str(source) in message
    assert not destination.parent.exists()


def test_mismatch_names_the_backbone_the_shapes_fit():
    b32 = {k: torch.empty(shape) for k, shape in expected_visual_shapes("ViT-B-32").items()}
    with pytest.raises(CheckpointMismatchError, match=r"match the registered backbone 'ViT-B-32'.*backbone='ViT-B-32'"):
        check_architecture(b32, "tiny-clip")
    b16 = expected_visual_shapes("ViT-B-16")
    assert b16["visual.conv1.weight"] == (768, 3, 16, 16) and b16["visual.positional_embedding"] == (197, 768)
    check_architecture(b32, "ViT-B-32")  # and it fits its own backbone


@pytest.mark.parametrize("kind", ["torch-zip", "pickle"])
def test_truncated_source_is_a_clear_error_and_writes_nothing(tmp_path, visual, kind):
    source = tmp_path / "finetuned.pt"
    if kind == "torch-zip":
        torch.save({"model." + k: v for k, v in visual.items()}, source)
    else:
        with open(source, "wb") as handle:
            pickle.dump({"model." + k: v.numpy() for k, v in visual.items()}, handle)
    source.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    destination = tmp_path / "out" / "x.safetensors"
    with pytest.raises(CorruptCheckpointError, match=r"finetuned\.pt.*truncated"):
        import_checkpoint(source, destination, backbone="tiny-clip", trust_pickle=True)
    assert not destination.parent.exists()


def _write_layout(root, visual, cars_seed=2):
    model_dir = root / "tiny-clip"
    for task, seed in (("MNISTVal", 1), ("CarsVal", cars_seed)):
        (model_dir / task).mkdir(parents=True, exist_ok=True)
        torch.save({"model." + k: v for k, v in _perturbed(visual, seed).items()}, model_dir / task / "nonlinear_finetuned.pt")
    # every task folder has a zero-shot copy; the released code uses MNISTVal's
    torch.save({"model." + k: v for k, v in visual.items()}, model_dir / "MNISTVal" / "nonlinear_zeroshot.pt")
    torch.save({"model." + k: v for k, v in _perturbed(visual, 99).items()}, model_dir / "CarsVal" / "nonlinear_zeroshot.pt")
    (model_dir / "head_MNISTVal.pt").write_bytes(b"not imported")


def _snapshot(directory):
    return {p.name: p.stat().st_mtime_ns for p in sorted(directory.iterdir())}


def test_directory_import_is_complete_and_idempotent(tmp_path, visual):
    root, destination = tmp_path / "checkpoints", tmp_path / "imported"
    _write_layout(root, visual)

    first = import_directory(root, destination, backbone="tiny-clip")

    assert [(r.name, r.imported) for r in first] == [("Cars", True), ("MNIST", True), ("zeroshot", True)]
    out = destination / "tiny-clip"
    assert sorted(_snapshot(out)) == ["Cars.safetensors", "MNIST.safetensors", "zeroshot.safetensors"]
    _assert_same_state(load_imported(out / "MNIST.safetensors", "tiny-clip")[0], _perturbed(visual, 1))
    _assert_same_state(load_imported(out / "zeroshot.safetensors", "tiny-clip")[0], visual)
    assert importers.load_manifest(out / "zeroshot.safetensors")["source"].endswith("MNISTVal/nonlinear_zeroshot.pt")
    before = _snapshot(out)

    second = import_directory(root, destination, backbone="tiny-clip")

    assert [r.imported for r in second] == [False, False, False]
    assert _snapshot(out) == before
    assert [r.manifest["sha256"] for r in second] == [r.manifest["sha256"] for r in first]

    _write_layout(root, visual, cars_seed=3)  # a new Cars checkpoint (the others rewritten identically)
    third = import_directory(root, destination, backbone="tiny-clip")
    assert [(r.name, r.imported) for r in third] == [("Cars", True), ("MNIST", False), ("zeroshot", False)]
    _assert_same_state(load_imported(out / "Cars.safetensors", "tiny-clip")[0], _perturbed(visual, 3))


def test_directory_import_redoes_a_damaged_destination(tmp_path, visual):
    root, destination = tmp_path / "checkpoints", tmp_path / "imported"
    _write_layout(root, visual)
    import_directory(root, destination, backbone="tiny-clip", tasks=["MNIST"])
    target = destination / "tiny-clip" / "MNIST.safetensors"
    target.write_bytes(target.read_bytes()[:-10])
    with pytest.raises(CorruptCheckpointError):
        load_imported(target, "tiny-clip")
    again = import_directory(root, destination, backbone="tiny-clip", tasks=["MNIST"])
    assert [(r.name, r.imported) for r in again] == [("MNIST", True), ("zeroshot", False)]
    _assert_same_state(load_imported(target, "tiny-clip")[0], _perturbed(visual, 1))


def test_loading_never_unpickles(tmp_path, visual, monkeypatch):
    source = tmp_path / "finetuned.pt"
    torch.save({"model." + k: v for k, v in visual.items()}, source)
    import_checkpoint(source, tmp_path / "x.safetensors", backbone="tiny-clip")
    importers._reference_visual.cache_clear()  # rebuild the reference shapes under the guard too

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling outside the import step")

    class ForbiddenUnpickler(pickle.Unpickler):
        def __init__(self, *args, **kwargs):
            forbidden()

    monkeypatch.setattr(pickle, "Unpickler", ForbiddenUnpickler)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)

    state, manifest = load_imported(tmp_path / "x.safetensors", "tiny-clip")

    _assert_same_state(state, visual)
    with pytest.raises(CheckpointMismatchError, match="imported for backbone 'tiny-clip', not 'ViT-B-32'"):
        load_imported(tmp_path / "x.safetensors", "ViT-B-32")
