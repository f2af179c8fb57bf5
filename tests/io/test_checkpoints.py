"""Checkpoint cache: provenance in the safetensors header, hash verification, rebuild of corrupted
files, atomic writes, refusal to replace files mergelib did not write."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from mergelib.io.checkpoints import (
    METADATA_KEY,
    cached_state,
    config_hash,
    expect_shapes,
    load_state,
    read_header,
    read_manifest,
    save_state,
    sha256_file,
)
from mergelib.errors import CorruptCheckpointError, OutputRefusedError, TensorError


def _builder(calls, value=1.0):
    def build():
        calls.append(1)
        return {"w": torch.full((4, 4), value)}, {"backbone": "tiny-clip", "domain": "sketch"}
    return build


def test_config_hash_ignores_key_order_and_sees_values():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_save_and_load_round_trip(tmp_path):
    path = tmp_path / "x.safetensors"
    manifest = save_state(path, {"w": torch.arange(6.0).view(2, 3)}, {"key": "k", "seed": 5})
    state, loaded = load_state(path, key="k")
    assert torch.equal(state["w"], torch.arange(6.0).view(2, 3))
    assert loaded == manifest and len(manifest["sha256"]) == 64 and loaded["seed"] == 5
    assert manifest["sha256"] == sha256_file(path)  # the whole file's hash, computed on load
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]  # no sidecar, no temporary
    header, start = read_header(path)
    assert json.loads(header["__metadata__"][METADATA_KEY]) == {k: v for k, v in manifest.items() if k != "sha256"}
    data = path.read_bytes()[start:]
    assert manifest["data_sha256"] == hashlib.sha256(data).hexdigest()  # the tensor data section
    assert read_manifest(path) == {k: v for k, v in manifest.items() if k != "sha256"}


def test_cache_reuses_a_valid_checkpoint(tmp_path):
    calls = []
    path = tmp_path / "expert.safetensors"
    cached_state(path, "key-1", _builder(calls))
    state, manifest = cached_state(path, "key-1", _builder(calls, value=2.0))
    assert len(calls) == 1 and torch.equal(state["w"], torch.ones(4, 4)) and manifest["key"] == "key-1"


@pytest.mark.parametrize("damage", ["truncate", "flip", "header", "delete_weights"])
def test_corrupted_checkpoint_is_detected_and_rebuilt(tmp_path, damage, capsys):
    calls = []
    path = tmp_path / "expert.safetensors"
    cached_state(path, "key-1", _builder(calls))
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-20])
    elif damage == "flip":
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "header":  # the recorded data hash edited by hand (same length)
        recorded = read_manifest(path)["data_sha256"].encode()
        path.write_bytes(path.read_bytes().replace(recorded, recorded[::-1], 1))
    else:
        path.unlink()
    with pytest.raises(CorruptCheckpointError):
        load_state(path, key="key-1")
    state, manifest = cached_state(path, "key-1", _builder(calls, value=3.0))
    assert len(calls) == 2 and torch.equal(state["w"], torch.full((4, 4), 3.0))
    assert load_state(path, key="key-1")[1]["sha256"] == manifest["sha256"]
    assert ("rebuilding" in capsys.readouterr().err) == (damage != "delete_weights")  # a missing file is just built


def test_a_different_configuration_is_not_reused(tmp_path):
    calls = []
    path = tmp_path / "expert.safetensors"
    cached_state(path, "key-1", _builder(calls))
    cached_state(path, "key-2", _builder(calls, value=5.0))
    assert len(calls) == 2
    assert read_manifest(path)["key"] == "key-2"


def test_a_cached_state_that_fails_its_check_is_rebuilt(tmp_path, capsys):
    calls = []
    path = tmp_path / "expert.safetensors"
    cached_state(path, "key-1", _builder(calls))  # 4x4
    check = expect_shapes({"w": (2, 2)}, "the architecture")
    state, _ = cached_state(path, "key-1", lambda: (calls.append(1), ({"w": torch.zeros(2, 2)}, {}))[1], check=check)
    assert len(calls) == 2 and state["w"].shape == (2, 2)
    err = capsys.readouterr().err
    assert f"checkpoint {path}: its tensors do not fit the architecture" in err and "w has shape (4, 4), expected (2, 2)" in err
    assert "rebuilding it" in err


def test_the_cache_never_replaces_a_file_mergelib_did_not_write(tmp_path):
    path = tmp_path / "expert.safetensors"
    save_file({"w": torch.ones(2)}, path)  # someone else's safetensors file
    before = path.read_bytes()
    with pytest.raises(OutputRefusedError, match="was not written by mergelib.*--overwrite"):
        cached_state(path, "key-1", _builder([]))
    assert path.read_bytes() == before


def test_a_damaged_cache_entry_is_rebuilt_with_a_notice(tmp_path, capsys):
    path = tmp_path / "expert.safetensors"
    cached_state(path, "key-1", _builder([]))
    path.write_bytes(path.read_bytes()[:100])  # cut inside its header: no longer readable as safetensors
    calls = []
    state, manifest = cached_state(path, "key-1", _builder(calls, value=3.0))
    assert calls and torch.equal(state["w"], torch.full((4, 4), 3.0))
    assert load_state(path, key="key-1")[1]["data_sha256"] == manifest["data_sha256"]
    assert "rebuilding it" in capsys.readouterr().err


def test_an_older_cache_entry_with_a_sidecar_manifest_is_rebuilt_and_its_manifest_removed(tmp_path, capsys):
    path = tmp_path / "expert.safetensors"
    save_file({"w": torch.ones(4, 4)}, path)
    sidecar = path.with_suffix(".json")
    sidecar.write_text(json.dumps({"format": 1, "file": path.name, "sha256": sha256_file(path), "key": "key-1"}))
    unrelated = tmp_path / "notes.json"
    unrelated.write_text("{}")
    state, manifest = cached_state(path, "key-1", _builder([], value=2.0))
    assert torch.equal(state["w"], torch.full((4, 4), 2.0)) and manifest["format"] == 2
    assert not sidecar.exists() and unrelated.read_text() == "{}"
    assert "older mergelib" in capsys.readouterr().err


def test_a_json_beside_that_mergelib_did_not_write_is_kept(tmp_path):
    path = tmp_path / "report.safetensors"
    report = tmp_path / "report.json"
    report.write_text('{"mine": true}')
    save_state(path, {"w": torch.ones(2)}, {"key": "k"})
    assert report.read_text() == '{"mine": true}'


def test_non_finite_tensors_are_never_written(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(TensorError, match=r"x\.safetensors: tensor 'b' holds 2 NaN or Inf values; nothing was written"):
        save_state(path, {"a": torch.ones(2), "b": torch.tensor([1.0, float("nan"), float("inf")])}, {})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [b"", b"abc", b"hello, I am text and not safetensors",
                                     b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94."])
def test_unreadable_files_are_named(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CorruptCheckpointError, match=str(path)):
        read_header(path)
    with pytest.raises(CorruptCheckpointError, match=str(path)):
        load_state(path)


def test_a_truncated_safetensors_file_is_named_as_truncated(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.ones(100)}, path)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(CorruptCheckpointError, match=r"t\.safetensors is truncated"):
        read_header(path)


def test_a_cached_pretrained_clip_of_another_architecture_is_rebuilt_with_a_notice(tmp_path, tiny_config, monkeypatch, capsys):
    from mergelib.models import pretrain
    from mergelib.models.backbones import create_clip

    built = []

    def fake_pretraining(config, device="cpu", progress=True):  # the real one takes minutes
        built.append(1)
        return create_clip(pretrain.BACKBONE, weights=None), [0.5]

    monkeypatch.setattr(pretrain, "pretrain_tiny_clip", fake_pretraining)
    _, manifest = pretrain.pretrained_tiny_clip(tiny_config.pretrain, tmp_path, progress=False)
    (path,) = (tmp_path / "pretrained").glob("*.safetensors")
    state, _ = load_state(path)
    state["visual.proj"] = state["visual.proj"][:, :3].contiguous()  # same key, tensors of another architecture
    save_state(path, state, {k: v for k, v in manifest.items() if k not in ("sha256", "data_sha256", "format", "file")})
    clip, _ = pretrain.pretrained_tiny_clip(tiny_config.pretrain, tmp_path, progress=False)
    assert len(built) == 2 and clip.model.visual.proj.shape[1] != 3
    err = capsys.readouterr().err
    assert f"checkpoint {path}: its tensors do not fit the tiny-clip architecture" in err and "visual.proj has shape" in err
    assert "rebuilding it" in err
