"""End to end through the real CLI on tiny models: full FT and LoRA train, resume exactly, export and reload."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from sparseft.cli import app
from sparseft.export.run import load_run
from sparseft.train import loop
from tests.helpers import cli, write_recipe

runner = CliRunner()


def _ids():
    return torch.tensor([[5, 9, 13, 40, 41, 42, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]])


@pytest.mark.parametrize("method", [{"name": "full"}, {"name": "lora", "r": 8, "alpha": 16, "target_modules": ["all-linear"]}])
def test_loss_falls_and_outputs_exist(tmp_path, tiny_model_dir, method):
    recipe = write_recipe(tmp_path, tiny_model_dir("llama"), method,
                          train={"max_steps": 40, "lr": 1e-2 if method["name"] == "lora" else 3e-3,
                                 "eval_every": 20, "log_every": 10})
    cli("train", recipe)
    run = tmp_path / "run"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 40
    # A random-init base: full FT learns the task fast; LoRA's low-rank updates of a random model learn slower.
    factor = 0.6 if method["name"] == "full" else 0.96
    assert sum(losses[-5:]) / 5 < factor * sum(losses[:5]) / 5, losses
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(vals) == 2 and vals[1] < vals[0]
    for name in ("recipe.yaml", "selection.json", "loss.png", "final/trainable.safetensors", "summary.json"):
        assert (run / name).is_file(), name
    assert (run / "loss.png").stat().st_size > 5000  # a real plot, not an empty canvas


def _final_weights(run):
    return load_file(str(run / "final" / "trainable.safetensors"))


S2FT = {"name": "s2ft", "projections": ["v", "o", "up", "down"], "heads": {"count": 1}, "channels": {"ratio": 0.1}}


@pytest.mark.parametrize("method", [{"name": "full"}, {"name": "lora", "r": 4, "dropout": 0.1}, S2FT])
def test_resume_gives_the_same_weights(tmp_path, tiny_model_dir, method, monkeypatch):
    # Something in every step draws from Python's and NumPy's global generators (as a data transform or a method
    # might): a resumed run must continue their streams too, not restart them from the seed.
    draws = []
    real_eval_step = loop.eval_step

    def eval_step(*args, **kwargs):
        draws.append((random.random(), float(np.random.rand())))
        return real_eval_step(*args, **kwargs)

    monkeypatch.setattr(loop, "eval_step", eval_step)
    model = tiny_model_dir("llama")
    train = {"max_steps": 12, "save_every": 4, "keep_checkpoints": 3, "grad_accum_steps": 2,
             "schedule": "cosine", "warmup_steps": 3}
    a = tmp_path / "a"
    a.mkdir()
    cli("train", write_recipe(a, model, method, train=train))
    b = tmp_path / "b"
    b.mkdir()
    recipe_b = write_recipe(b, model, method, train=train)
    cli("train", recipe_b)
    # Simulate a run killed after step 4: only the step-4 checkpoint is left.
    shutil.rmtree(b / "run" / "final")
    shutil.rmtree(b / "run" / "checkpoints" / "step-00000008")
    uninterrupted = draws[:12]
    assert len(draws) == 24 and draws[12:] == uninterrupted
    del draws[:]
    out = cli("train", recipe_b, "--resume")
    assert "resumed from" in out.output and "at step 4" in out.output
    assert draws == uninterrupted[4:]
    wa, wb = _final_weights(a / "run"), _final_weights(b / "run")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    steps = [json.loads(x)["step"] for x in (b / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13)), "metrics after resume have no gaps or duplicates"


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("method", [{"name": "full"}, {"name": "lora", "r": 4}, S2FT])
def test_export_merged_loads_in_plain_transformers(tmp_path, tiny_model_dir, arch, method):
    recipe = write_recipe(tmp_path, tiny_model_dir(arch), method, train={"max_steps": 3, "lr": 1e-2})
    cli("train", recipe)
    cli("export", tmp_path / "run", "--merged", tmp_path / "merged")
    trained = load_run(tmp_path / "run")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(merged).__module__.startswith("transformers.")
    with torch.no_grad():
        torch.testing.assert_close(merged(_ids()).logits, trained.model(_ids()).logits, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    desc = json.loads((tmp_path / "merged" / "sparseft_export.json").read_text())
    assert desc["method"] == method["name"] and desc["format_version"] == 1


def test_lora_adapter_loads_with_peft(tmp_path, tiny_model_dir):
    from peft import PeftModel

    base_dir = tiny_model_dir("mistral")
    recipe = write_recipe(tmp_path, base_dir, {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
                          train={"max_steps": 3, "lr": 1e-2})
    cli("train", recipe)
    cli("export", tmp_path / "run", "--adapter", tmp_path / "adapter", "--merged", tmp_path / "merged")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and "method" not in cfg  # exactly PEFT's file (issue 17)
    meta = json.loads((tmp_path / "adapter" / "sparseft_adapter.json").read_text())
    assert meta["method"] == "lora" and meta["format_version"] == 1
    assert meta["base_model"] == base_dir
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(_ids()).logits, merged(_ids()).logits, rtol=1e-5, atol=1e-5)


def test_full_has_no_adapter_form(tmp_path, tiny_model_dir):
    cli("train", write_recipe(tmp_path, tiny_model_dir("llama"), train={"max_steps": 1}))
    result = runner.invoke(app, ["export", str(tmp_path / "run"), "--adapter", str(tmp_path / "ad")])
    assert result.exit_code == 2 and "no adapter form" in result.output
    assert not (tmp_path / "ad").exists()


@pytest.mark.parametrize("method", [{"name": "full"}, {"name": "lora", "r": 4}, S2FT])
def test_gradient_checkpointing_gives_the_same_run(tmp_path, tiny_model_dir, method):
    runs = []
    for gc in (False, True):
        d = tmp_path / f"gc-{gc}"
        d.mkdir()
        cli("train", write_recipe(d, tiny_model_dir("qwen3"), method,
                                  train={"max_steps": 3, "gradient_checkpointing": gc}))
        runs.append(_final_weights(d / "run"))
    for k in runs[0]:
        torch.testing.assert_close(runs[0][k], runs[1][k], rtol=1e-6, atol=1e-6)
