"""SquareHead through the real trainer, resume and export: per-layer sparsity of the exported weights equals the
target (unstructured), every group of 4 has at most 2 non-zeros (2:4), the report lies beside the merged model, a
resumed run ends with the same weights, and golden losses pin the whole path."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sparseft.methods.squarehead.prune import prune_count
from sparseft.models.arch import ROLES, arch_of
from tests.helpers import cli, records, write_recipe

GOLDEN_24 = [6.09403, 5.94048, 5.81054]  # loss (ce + squarehead) of the 2:4 run's three steps


def block_weights(model) -> dict[str, torch.Tensor]:
    spec = arch_of(model)
    return {spec.proj_path(i, r): spec.proj(model, i, r).weight.detach()
            for i in range(spec.num_layers) for r in ROLES}


def test_2_4_trains_logs_each_term_and_exports_the_pattern(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir("llama"), {"name": "squarehead", "pattern": "2:4"},
                          train={"max_steps": 3, "lr": 1e-3})
    out = cli("train", recipe)
    assert "sparsegpt on 8 calibration batches, 2:4, 14 linears" in out.output
    steps = [r for r in records(tmp_path / "run") if "loss" in r]
    for r in steps:
        assert r["loss"] == pytest.approx(r["ce"] + r["squarehead"], rel=1e-5) and r["squarehead"] > 0
    losses = [round(r["loss"], 5) for r in steps]
    if os.environ.get("GOLDEN_PRINT"):
        print(f"\nGOLDEN_24 = {losses}")
    assert losses == pytest.approx(GOLDEN_24, abs=2e-4)

    cli("export", tmp_path / "run", "--merged", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    for name, w in block_weights(merged).items():
        nonzero = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)  # (out, in / 4)
        assert int(nonzero.max()) <= 2, f"{name}: a group of 4 holds {int(nonzero.max())} non-zeros"
    report = json.loads((tmp_path / "merged" / "sparsity.json").read_text())
    assert report["target"]["pattern"] == "2:4" and report["pruned_linears"]["sparsity"] == 0.5
    assert all(r["nm_violations"] == 0 for r in report["layers"])
    assert "| model.layers.0.self_attn.q_proj | 64x64 | 2,048 | 50.00% | 0 |" in \
        (tmp_path / "merged" / "sparsity.md").read_text()


def test_resume_keeps_the_masks_and_export_has_the_target_sparsity(tmp_path, tiny_model_dir):
    method = {"name": "squarehead", "sparsity": 0.5, "roles": ["q", "v", "o", "up", "down"]}
    train = {"max_steps": 4, "save_every": 2, "lr": 1e-2, "weight_decay": 0.1}
    recipe = write_recipe(tmp_path, tiny_model_dir("llama"), method, train=train)
    cli("train", recipe)
    a = tmp_path / "run"
    uninterrupted = load_file(str(a / "final" / "trainable.safetensors"))
    shutil.rmtree(a / "final")  # as if killed after step 2: resume from its checkpoint (teacher reloaded, masks kept)
    out = cli("train", recipe, "--resume")
    assert "at step 2" in out.output
    resumed = load_file(str(a / "final" / "trainable.safetensors"))
    for k in uninterrupted:
        torch.testing.assert_close(resumed[k], uninterrupted[k], rtol=0, atol=1e-6)

    cli("export", a, "--merged", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    report = {r["name"]: r for r in json.loads((tmp_path / "merged" / "sparsity.json").read_text())["layers"]}
    for name, w in block_weights(merged).items():
        pruned = name.rsplit(".", 1)[-1] in ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")
        zeros = int((w == 0).sum())
        assert zeros == (prune_count(w.numel(), 0.5) if pruned else 0), name
        assert report[name]["zeros"] == zeros and report[name]["pruned"] == pruned
    assert merged.lm_head.weight.count_nonzero() == merged.lm_head.weight.numel()
    assert (tmp_path / "merged" / "sparsity.md").is_file()
