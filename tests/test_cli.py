"""The command line: `mergelib methods` and `mergelib merge` on safetensors checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergelib
from mergelib.io.checkpoints import load_state
from mergelib.cli import main
from mergelib.methods import METHODS
from mergelib.task_vectors import task_vector


@pytest.fixture()
def checkpoints(tmp_path):
    g = torch.Generator().manual_seed(0)
    pretrained = {
        "visual.transformer.resblocks.0.attn.in_proj_weight": torch.randn(12, 4, generator=g),
        "visual.ln_post.weight": torch.randn(4, generator=g),
        "token_embedding.weight": torch.randn(10, 4, generator=g),  # text side, never fine-tuned
        "attn_mask_like_buffer": torch.arange(5),  # integer buffers are copied, never merged
    }
    save_file(pretrained, tmp_path / "pretrained.safetensors")
    experts = []
    for i in range(3):
        state = {k: v + 0.1 * torch.randn(v.shape, generator=g) if k.startswith("visual") else v.clone()
                 for k, v in pretrained.items()}
        save_file(state, tmp_path / f"expert{i}.safetensors")
        experts.append(state)
    return tmp_path, pretrained, experts


def test_methods_lists_every_registered_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in METHODS)
    assert "released code, not the paper: trimming threshold (the paper's version: divide_by_tasks=False)" in out
    assert sum(len(method.code_notes) for method in METHODS.values()) == out.count("released code, not the paper:")


def test_merge_writes_pretrained_plus_the_merged_task_vector_and_a_manifest(checkpoints, capsys):
    folder, pretrained, experts = checkpoints
    out = folder / "merged.safetensors"
    code = main(["merge", "--method", "score", "--pretrained", str(folder / "pretrained.safetensors"),
                 *(str(folder / f"expert{i}.safetensors") for i in range(3)), "-o", str(out),
                 "--param", "keep=diagonal", "--param", "z=1.5", "--alpha", "0.5", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    merged = load_file(out)
    expected = mergelib.apply(pretrained, mergelib.merge("score", [task_vector(e, pretrained) for e in experts],
                                                         device="cpu", keep="diagonal", z=1.5), alpha=0.5)
    assert merged.keys() == pretrained.keys()
    for key in merged:
        torch.testing.assert_close(merged[key], expected[key])
    assert torch.equal(merged["attn_mask_like_buffer"], pretrained["attn_mask_like_buffer"])
    manifest = load_state(out)[1]  # the provenance is in the file's header, no .json beside it
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("merged")) == ["merged.safetensors"]
    assert manifest["method"] == "score" and manifest["parameters"] == {"keep": "diagonal", "z": 1.5}
    assert manifest["alpha"] == 0.5 and len(manifest["experts"]) == 3 and len(manifest["sha256"]) == 64


def test_merge_with_a_prefix_leaves_the_other_tensors_untouched(checkpoints):
    folder, pretrained, _ = checkpoints
    out = folder / "visual_only.safetensors"
    assert main(["merge", "--method", "task_arithmetic", "--pretrained", str(folder / "pretrained.safetensors"),
                 str(folder / "expert0.safetensors"), "-o", str(out), "--prefix", "visual.", "--alpha", "0"]) == 0
    merged = load_file(out)
    assert all(torch.equal(merged[k], pretrained[k]) for k in pretrained)


@pytest.mark.parametrize("arguments, message", [
    (["--method", "nope"], "unknown merge method 'nope'"),
    (["--method", "score", "--param", "kep=1"], "has no parameter"),
    (["--method", "score", "--param", "keep"], "expects NAME=VALUE"),
    (["--method", "score", "--param", "keep=everything"], "keep must be one of"),
])
def test_bad_arguments_fail_with_a_clear_message(checkpoints, capsys, arguments, message):
    folder, _, _ = checkpoints
    code = main(["merge", *arguments, "--pretrained", str(folder / "pretrained.safetensors"),
                 str(folder / "expert0.safetensors"), str(folder / "expert1.safetensors"), "-o", str(folder / "x.safetensors")])
    assert code == 2 and message in capsys.readouterr().err
    assert not (folder / "x.safetensors").exists()


def test_missing_foreign_and_pickled_checkpoints_are_refused(checkpoints, capsys):
    folder, _, _ = checkpoints
    base = ["merge", "--method", "tsv_m", "--pretrained", str(folder / "pretrained.safetensors"), "-o", str(folder / "x.safetensors")]
    assert main([*base, str(folder / "missing.safetensors")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    torch.save({"w": torch.zeros(2)}, folder / "pickled.pt")
    assert main([*base, str(folder / "pickled.pt")]) == 2
    assert "no pickles" in capsys.readouterr().err
    save_file({"visual.other": torch.zeros(2)}, folder / "foreign.safetensors")
    assert main([*base, str(folder / "foreign.safetensors")]) == 2
    assert "does not match" in capsys.readouterr().err
