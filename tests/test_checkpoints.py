"""Checkpoint cache: manifests, hash verification, rebuild of corrupted files, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch

from mergelib.checkpoints import cached_state, config_hash, load_state, manifest_path, save_state
from mergelib.errors import CorruptCheckpointError


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
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave nothing behind


def test_cache_reuses_a_valid_checkpoint(tmp_path):
    calls = []
    path = tmp_path / "expert.safetensors"
    cached_state(path, "key-1", _builder(calls))
    state, manifest = cached_state(path, "key-1", _builder(calls, value=2.0))
    assert len(calls) == 1 and torch.equal(state["w"], torch.ones(4, 4)) and manifest["key"] == "key-1"


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest", "delete_weights"])
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
    elif damage == "manifest":
        manifest_path(path).write_text("{not json")
    else:
        path.unlink()
    with pytest.raises(CorruptCheckpointError):
        load_state(path, key="key-1")
    state, manifest = cached_state(path, "key-1", _builder(calls, value=3.0))
    assert len(calls) == 2 and torch.equal(state["w"], torch.full((4, 4), 3.0))
    assert load_state(path, key="key-1")[1]["sha256"] == manifest["sha256"]
    assert "rebuilding" in capsys.readouterr().err


def test_a_different_configuration_is_not_reused(tmp_path):
    calls = []
    path = tmp_path / "expert.safetensors"
    cached_state(path, "key-1", _builder(calls))
    cached_state(path, "key-2", _builder(calls, value=5.0))
    assert len(calls) == 2
    assert json.loads(manifest_path(path).read_text())["key"] == "key-2"
