"""`sparseft bench` end to end on a tiny model: one process per entry, LoRA's rank matched to S2FT's trainable count,
a table, bench.json with ratios, and a plot."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sparseft.bench.runner import lora_rank_matching
from sparseft.cli import app
from sparseft.recipe import load_recipe
from tests.helpers import write_recipe

S2FT = {"name": "s2ft", "projections": ["o", "down"], "heads": {"count": 1}, "channels": {"ratio": 0.25}}


@pytest.mark.slow
def test_bench_entries(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir("mistral"), S2FT)
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", str(recipe), "--methods", "floor,full,lora,s2ft,serve", "--steps", "2",
                                      "--warmup", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "s2ft_time_over_floor" in result.output and "serving:" in result.output
    report = json.loads((out / "bench.json").read_text())
    res = report["results"]
    assert set(res) == {"floor", "full", "lora", "s2ft", "serve"}
    assert res["floor"]["trainable_params"] == 64  # one RMSNorm weight of the first block
    full, s2ft, lora = (res[k]["trainable_params"] for k in ("full", "s2ft", "lora"))
    assert s2ft < full and abs(lora - s2ft) / s2ft < 0.5, (s2ft, lora)
    for k in ("floor", "full", "lora", "s2ft"):
        assert len(res[k]["step_s"]) == 2 and res[k]["peak_rss_mb"] > 0
    r = report["ratios"]
    assert r["s2ft_time_over_full"] == pytest.approx(res["s2ft"]["median_step_s"] / res["full"]["median_step_s"])
    assert res["serve"]["n_adapters"] == 8 and res["serve"]["mixed_forward_s"] > 0
    assert (out / "bench.png").stat().st_size > 10_000


def test_lora_rank_matches_the_count(tmp_path, tiny_model_dir):
    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir("mistral"), S2FT))
    # mistral tiny: hidden 64, 2 layers, 4 heads of 16, 2 kv heads, FFN 128; all seven projections:
    # per layer and rank: q 64+64, k 64+32, v 64+32, o 64+64, up 64+128, gate 64+128, down 128+64 = 960
    assert lora_rank_matching(recipe, 2 * 960 * 3, ["q", "k", "v", "o", "up", "gate", "down"]) == 3
    assert lora_rank_matching(recipe, 10, ["o"]) == 1


def test_bench_rejects_unknown_entries(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir("mistral"), S2FT)
    result = CliRunner().invoke(app, ["bench", str(recipe), "--methods", "full,turbo"])
    assert result.exit_code == 2 and "turbo" in result.output


@pytest.mark.slow
def test_hift_is_measured_after_a_whole_cycle(tmp_path, tiny_model_dir):
    """Issue 17, item 6: before a whole cycle some HiFT groups have no optimizer state, so the bench warms up (and
    times) at least one cycle whatever --warmup / --steps say."""
    from sparseft.bench.worker import train_steps

    recipe = write_recipe(tmp_path, tiny_model_dir("mistral"), {"name": "hift"})  # 2 blocks, untied: 4 groups
    out = train_steps(str(recipe), "hift", 2, 1, {})
    assert out["warmup_steps"] == 4 and out["timed_steps"] == 4 and len(out["step_s"]) == 4
    full = train_steps(str(recipe), "full", 2, 1, {})
    assert full["warmup_steps"] == 1 and full["timed_steps"] == 2
