"""S2FT end to end through the real CLI: train with a calibrated strategy, export both forms, apply the adapter."""

from __future__ import annotations

import itertools
import json

import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from sparseft.cli import app
from sparseft.data import build_datasets, micro_batches
from sparseft.export.sparse_adapters import apply_adapters
from sparseft.models import load_tokenizer
from sparseft.recipe import load_recipe
from tests.helpers import write_recipe
from tests.methods.s2ft.s2ft_reference import gradient_scores, top

runner = CliRunner()


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def test_train_export_apply(tmp_path, tiny_model_dir):
    base_dir = tiny_model_dir("qwen3")
    method = {"name": "s2ft", "projections": ["q", "v", "o", "gate", "down"], "heads": {"count": 1},
              "channels": {"ratio": 0.1}, "strategy": "gradient", "calibration_batches": 2}
    recipe = write_recipe(tmp_path, base_dir, method, train={"max_steps": 4, "lr": 1e-2})
    result = cli("train", recipe)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "layer 1: heads [" in result.output and "channels 12 of 128" in result.output
    selection = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert selection["strategy"] == "gradient"
    # Which units: the plain gradient scores on the trainer's calibration batches (its first two micro-batches).
    r = load_recipe(recipe)
    tokenizer = load_tokenizer(base_dir)
    data = build_datasets(r.data, tokenizer, seed=r.train.seed)
    batches = list(itertools.islice(micro_batches(data.train, r.train.micro_batch_size, r.train.seed, 0,
                                                  tokenizer.pad_token_id), 2))
    heads, chans = gradient_scores(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                   method["projections"], batches)
    assert selection["heads"] == top(heads, 1) and selection["channels"] == top(chans, 12)

    result = cli("export", tmp_path / "run", "--adapter", tmp_path / "adapter", "--merged", tmp_path / "merged")
    assert result.exit_code == 0, result.output + repr(result.exception)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["method"] == "s2ft" and cfg["format_version"] == 1 and cfg["unit"] == "kv_group"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    base = apply_adapters(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), [tmp_path / "adapter"])
    merged_sd = merged.state_dict()
    assert all(torch.equal(p, merged_sd[n]) for n, p in base.state_dict().items())


def test_budget_error_exits_2(tmp_path, tiny_model_dir):
    method = {"name": "s2ft", "heads": {"count": 9}}
    result = cli("train", write_recipe(tmp_path, tiny_model_dir("mistral"), method, train={"max_steps": 1}))
    assert result.exit_code == 2
    assert "method.heads.count=9: the model has 2 kv groups per layer" in result.output
