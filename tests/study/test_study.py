"""`sparseft study`: the bundled SmolLM2 study and recipes validate; `--quick` runs the whole pipeline on a tiny model
built here (train, score, table, plot, claims), caches finished points and resumes; the claims' reading and the
Pareto front follow their rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sparseft.cli import app
from sparseft.recipe import load_recipe
from sparseft.study.report import pareto, read_claims
from sparseft.study.spec import grid_points, load_study

ROOT = Path(__file__).resolve().parents[2]
STUDY = ROOT / "studies" / "smollm2.yaml"
SMOL = sorted((ROOT / "recipes" / "smollm2").glob("*.yaml"))


@pytest.mark.parametrize("path", SMOL, ids=[p.stem for p in SMOL])
def test_smollm2_recipes_validate(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(path)
    assert recipe.data.format == "chat" and recipe.model.path == "models/smollm2-135m"
    assert path.read_text().startswith("#") and "sparseft train recipes/smollm2/" in path.read_text()


def test_default_grid_and_its_order(monkeypatch):
    monkeypatch.chdir(ROOT)
    study = load_study(STUDY)
    points = grid_points(study, quick=False)
    by_method = {}
    for p in points:
        by_method.setdefault(p.method, set()).add((p.budget, p.lr))
    assert set(by_method) == {"full", "lora", "s2ft", "hift", "lamda", "lamda_pp", "squarehead"}
    for m, combos in by_method.items():
        budgets = {b for b, _ in combos}
        assert len({lr for _, lr in combos}) >= 3, m
        assert len(budgets) == (2 if m in ("lora", "s2ft", "lamda", "squarehead") else 1), m
    # every row's middle learning rate comes first, so a study stopped early has every method and budget
    first = points[:11]
    assert {(p.method, p.budget) for p in first} == {(p.method, p.budget) for p in points}
    for p in points:  # each point's recipe resolves with its overrides
        load_recipe(p.recipe, list(p.overrides))
    quick = grid_points(study, quick=True)
    assert [p.method for p in quick] == list(by_method) and all("model.path=demo/tiny-llama" in p.overrides
                                                                for p in quick)


def _r(method, budget, lr, gain, retention, ppl=10.0, trainable=100):
    return {"id": f"{method}.{budget}.{lr}", "method": method, "budget": budget, "lr": lr, "gain": gain,
            "retention": retention, "perplexity": ppl, "trainable": trainable}


def test_claims_and_pareto_follow_their_rules():
    base = {"gain": 0.0, "retention": 0.7, "perplexity": 10.0}
    rows = [_r("s2ft", "a", 1, 0.8, 0.7), _r("s2ft", "a", 2, 0.9, 0.5), _r("lora", "a", 1, 0.6, 0.6),
            _r("full", "-", 1, 0.9, 0.4, trainable=1000), _r("hift", "-", 1, 0.7, 0.6, trainable=1000),
            _r("lamda", "a", 1, 0.58, 0.6, trainable=10), _r("squarehead", "50%", 1, 0.88, 0.1),
            _r("squarehead", "2:4", 1, 0.5, 0.1)]
    claims = {c["claim"].split()[0]: c for c in read_claims(base, rows)}
    # best s2ft point is lr 2 (gain 0.9 > 0.6) but its retention 0.5 < lora's 0.6: better gain, more forgetting
    assert claims["S2FT"]["verdict"] == "partly"
    assert claims["HiFT"]["verdict"] == "does not hold"  # 0.7 vs 0.9
    assert claims["LaMDA"]["verdict"] == "holds"  # 0.58 >= 0.6 - 0.05 with 10 / 100 of LoRA's weights
    assert claims["SquareHead"]["verdict"] == "partly"  # 50% within 0.05 of full FT, 2:4 not
    front = {r["id"] for r in pareto(rows)}
    assert front == {"s2ft.a.1", "s2ft.a.2"}  # full FT (0.9, 0.4) is beaten by s2ft lr 2 (0.9, 0.5)
    rows[1]["retention"] = 0.64  # within the tolerance of LoRA's 0.6: the same, not better
    assert read_claims(base, rows)[0]["verdict"] == "partly"
    rows[1]["retention"] = 0.7
    assert read_claims(base, rows)[0]["verdict"] == "holds"
    rows[1]["gain"] = 0.62
    rows[0]["gain"] = 0.5
    assert read_claims(base, rows)[0]["verdict"] == "partly"


@pytest.mark.slow
def test_study_quick_runs_caches_and_resumes(tmp_path, monkeypatch):
    """The bundled study, --quick, on a tiny chat model built here: 7 points (one a method), then a rerun that
    trains nothing, then a resume that trains only the point whose result went missing."""
    from sparseft.models.tiny import build_tiny_model

    monkeypatch.chdir(ROOT)
    corpus = [json.loads(line)["messages"][0]["content"] for line in
              (ROOT / "recipes/smollm2/data/skill_train.jsonl").read_text().splitlines()[:200]]
    model = build_tiny_model(tmp_path / "tiny", "llama", corpus=corpus, vocab_size=400)
    out = tmp_path / "study"
    args = ["study", str(STUDY), "--quick", f"quick.model={model}", f"output_dir={out}"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output + repr(first.exception)
    q = out / "quick"
    report = json.loads((q / "study.json").read_text())
    assert report["finished"] == 7 and report["failed"] == 0, report
    assert (q / "pareto.png").stat().st_size > 10_000
    table = (q / "study.md").read_text()
    points = {p["method"]: p for p in report["points"]}
    for m, p in points.items():
        assert f"| {m} | {p['budget']} |" in table
        assert 0 <= p["gain"] <= 1 and 0 <= p["retention"] <= 1 and p["perplexity"] > 1
        assert p["steps"] == 3 and p["step_s"] > 0 and p["peak_mib"] > 0
    total = points["full"]["trainable"]
    assert points["hift"]["trainable"] == total  # every weight is trainable, a group a step
    assert 0 < points["lamda"]["trainable"] < points["lora"]["trainable"] < total
    assert 0 < points["s2ft"]["trainable"] < total
    assert len(report["claims"]) == 4
    assert first.output.count(": training") == 7

    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and again.output.count(": cached") == 7 and ": training" not in again.output
    (q / "points" / points["lora"]["id"] / "result.json").unlink()  # as if killed while training this point
    resumed = CliRunner().invoke(app, args)
    assert resumed.output.count(": training") == 1 and f"{points['lora']['id']}: training" in resumed.output
    assert json.loads((q / "study.json").read_text())["finished"] == 7


def test_bad_study_files_name_the_key(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text(yaml.safe_dump({"output_dir": "x", "tasks": {"gain": "a", "perplexity": "b", "retention": "c"},
                                   "grid": [{"method": "full", "recipe": "r.yaml", "lrs": []}], "colour": 1}))
    res = CliRunner().invoke(app, ["study", str(bad)])
    assert res.exit_code == 2 and "grid.0.lrs" in res.output and "colour" in res.output
    res = CliRunner().invoke(app, ["study", str(STUDY), "--quick", "quick=null"])
    assert res.exit_code == 2


TASKS = sorted((ROOT / "recipes" / "smollm2" / "tasks").glob("*.yaml"))


@pytest.mark.parametrize("path", TASKS, ids=[p.stem for p in TASKS])
def test_smollm2_tasks_validate(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    res = CliRunner().invoke(app, ["validate", str(path)])
    assert res.exit_code == 0 and f"eval task {path.stem}" in res.output, res.output
