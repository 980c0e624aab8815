"""Golden losses: a fixed tiny run of each method must reproduce these per-step losses. A change in data order,
initialisation, selection, masking or the optimizer step shows up here first. Recompute only on purpose:
    GOLDEN_PRINT=1 pytest tests/methods/test_golden_loss.py -s
"""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from sparseft.cli import app
from tests.helpers import write_recipe

GOLDEN = {
    "full": [6.03244, 5.53161, 5.06729, 4.74747, 4.32267, 4.02791],
    "lora": [6.03244, 6.04354, 5.86733, 5.77682, 5.66996, 5.55669],
    "s2ft": [6.03244, 5.85928, 5.54285, 5.51882, 5.47977, 5.40055],
}
METHODS = {
    "full": {"name": "full"},
    "lora": {"name": "lora", "r": 4, "alpha": 8},
    "s2ft": {"name": "s2ft", "projections": ["v", "o", "up", "down"], "heads": {"count": 1},
             "channels": {"ratio": 0.1}, "strategy": "weight"},
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_golden_loss(name, tiny_model_dir, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model_dir("qwen2"), METHODS[name],
                          train={"max_steps": 6, "lr": 5e-3, "warmup_steps": 2, "schedule": "linear"})
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    losses = [round(json.loads(x)["loss"], 5) for x in lines]
    if os.environ.get("GOLDEN_PRINT"):
        print(f'\n    "{name}": {losses},')
    assert GOLDEN[name] is not None, f"no golden losses for {name}: run with GOLDEN_PRINT=1 and record them"
    assert losses == pytest.approx(GOLDEN[name], abs=2e-4)
